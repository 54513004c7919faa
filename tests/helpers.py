"""Helpers shared by every test module (CPU and CUDA alike): torch.nn / fused_rnn module pairs
built from one seed, comparisons of nested outputs and of tensor lists, outputs plus gradients
of a fixed non-trivial loss, inputs for the layer modules, arguments for the raw ops, and
gradcheck / opcheck drivers. Tensors are created on `device` (None: the CPU).

A plain module rather than conftest.py, so that test modules (and any process they spawn)
import it by name; conftest.py holds only the fixtures."""
import itertools

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call
from torch.library import opcheck
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fused_rnn

TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}

# Layer kind -> (class name, constructor kwargs that select it).
LAYER_KINDS = {
    "LSTM": ("LSTM", {}),
    "GRU": ("GRU", {}),
    "RNN_TANH": ("RNN", {"nonlinearity": "tanh"}),
    "RNN_RELU": ("RNN", {"nonlinearity": "relu"}),
}
CELL_KINDS = {
    "LSTMCell": ("LSTMCell", {}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell_TANH": ("RNNCell", {"nonlinearity": "tanh"}),
    "RNNCell_RELU": ("RNNCell", {"nonlinearity": "relu"}),
}
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


# ---- module pairs --------------------------------------------------------------------------------

def make_pair(class_name, *args, seed=0, **kwargs):
    """(torch.nn.<class_name>(*args, **kwargs), fused_rnn.<class_name>(...)), each built right
    after torch.manual_seed(seed), so both draw the same initial weights (on any device: pass
    device= and dtype= through kwargs)."""
    torch.manual_seed(seed)
    ref = getattr(nn, class_name)(*args, **kwargs)
    torch.manual_seed(seed)
    ours = getattr(fused_rnn, class_name)(*args, **kwargs)
    return ref, ours


def make_kind_pair(kind, *args, seed=0, **kwargs):
    """make_pair for a LAYER_KINDS / CELL_KINDS key, e.g. 'RNN_RELU' or 'GRUCell'."""
    class_name, extra = {**LAYER_KINDS, **CELL_KINDS}[kind]
    return make_pair(class_name, *args, seed=seed, **extra, **kwargs)


def assert_state_dicts_identical(ref, ours):
    """Same keys in the same order, bitwise-equal values of the same dtype and shape."""
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for name, value in ref_sd.items():
        assert our_sd[name].dtype == value.dtype, name
        assert torch.equal(our_sd[name], value), name


# ---- comparisons ---------------------------------------------------------------------------------

def assert_close_nested(actual, expected, dtype=None, path="out"):
    """Recursive torch.testing.assert_close (TOLERANCES[dtype], NaNs equal) over tensors,
    tuples/lists, dicts, None and PackedSequence (data, batch_sizes, indices and the padded
    form)."""
    tol = TOLERANCES[dtype] if dtype is not None else {}
    if isinstance(expected, PackedSequence):
        assert isinstance(actual, PackedSequence), f"{path}: expected a PackedSequence, got {type(actual)}"
        assert_close_nested(actual.data, expected.data, dtype, path + ".data")
        assert torch.equal(actual.batch_sizes, expected.batch_sizes), path + ".batch_sizes"
        for field in ("sorted_indices", "unsorted_indices"):
            a, e = getattr(actual, field), getattr(expected, field)
            assert (a is None) == (e is None), f"{path}.{field}"
            if e is not None:
                assert torch.equal(a, e), f"{path}.{field}"
        padded_actual, lengths_actual = pad_packed_sequence(actual)
        padded_expected, lengths_expected = pad_packed_sequence(expected)
        assert torch.equal(lengths_actual, lengths_expected), path + ".lengths"
        assert_close_nested(padded_actual, padded_expected, dtype, path + ".padded")
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), path
        for k, (a, e) in enumerate(zip(actual, expected)):
            assert_close_nested(a, e, dtype, f"{path}[{k}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), path
        for key in expected:
            assert_close_nested(actual[key], expected[key], dtype, f"{path}[{key!r}]")
    elif expected is None:
        assert actual is None, path
    else:
        assert actual.shape == expected.shape, f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        torch.testing.assert_close(actual, expected, **tol, equal_nan=True, msg=lambda m: f"{path}: {m}")


def assert_all_close(actual, expected, **tolerance):
    """Pairwise torch.testing.assert_close over two equally long lists of tensors."""
    assert len(actual) == len(expected), f"{len(actual)} tensors != {len(expected)}"
    for k, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **tolerance, msg=lambda message, k=k: f"tensor {k}: {message}")


def assert_all_equal(actual, expected):
    """Pairwise bitwise equality (values, shapes and dtypes) of two lists of tensors."""
    assert len(actual) == len(expected), f"{len(actual)} tensors != {len(expected)}"
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert (a.dtype, a.shape) == (e.dtype, e.shape), f"tensor {k}: {a.dtype} {a.shape} != {e.dtype} {e.shape}"
        assert torch.equal(a, e), f"tensor {k} differs, max abs diff {(a - e).abs().max().item()}"


# ---- outputs and gradients -----------------------------------------------------------------------

def output_tensors(out):
    """The tensors of a (possibly nested) module output, in order; a PackedSequence contributes
    .data."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in output_tensors(item)]
    if out is None:
        return []
    return [out]


def weighted_loss(out, dtype=None):
    """sum_k <out_k, W_k> over output_tensors(out) with fixed pseudo-random W_k, so every output
    element (output, h_n and c_n alike) gets its own non-trivial upstream gradient, and a swapped
    or misplaced gradient cannot cancel out. Computed in `dtype` (None: each tensor's own)."""
    loss = 0
    for k, t in enumerate(output_tensors(out)):
        g = torch.Generator().manual_seed(100 + k)
        weight = torch.randn(t.shape, generator=g, dtype=t.dtype if dtype is None else dtype).to(t.device)
        loss = loss + (t.to(weight.dtype) * weight).sum()
    return loss


def weighted_loss_grads(out, wrt, loss_dtype=None):
    """The gradients of weighted_loss(out, loss_dtype) with respect to `wrt`: a list for a list
    of tensors, a dict with the same keys for a dict of them."""
    tensors = list(wrt.values()) if isinstance(wrt, dict) else list(wrt)
    grads = torch.autograd.grad(weighted_loss(out, loss_dtype), tensors)
    return dict(zip(wrt, grads)) if isinstance(wrt, dict) else list(grads)


def outputs_and_grads(function, wrt, loss_dtype=None):
    """Runs `function()` and returns (its output tensors, as output_tensors lists them, and
    weighted_loss_grads of them with respect to `wrt`)."""
    outputs = output_tensors(function())
    return outputs, weighted_loss_grads(outputs, wrt, loss_dtype)


def leaves_and_params(module, leaves):
    """The named leaf tensors (input, h0, ...) followed by each parameter of `module`, named
    'param.<name>'."""
    return {**leaves, **{f"param.{n}": p for n, p in module.named_parameters()}}


def assert_same_outputs_and_grads(ref, ours, leaves, call, dtype, module_params=True):
    """The fused module matches torch.nn on the (nested) outputs of `call(module)` and on every
    gradient of weighted_loss: with respect to each of the named `leaves` and, if module_params,
    each parameter. Returns (our output, torch.nn output)."""
    results = []
    for module in (ref, ours):
        out = call(module)
        results.append((out, weighted_loss_grads(out, leaves_and_params(module, leaves) if module_params else leaves)))
    (ref_out, ref_grads), (our_out, our_grads) = results
    assert_close_nested(our_out, ref_out, dtype)
    assert_close_nested(our_grads, ref_grads, dtype, path="grad")
    return our_out, ref_out


# Per dtype, for assert_same_results: elementwise
# |actual - expected| <= tol * (max(1, max |expected|) + |expected|). The absolute part follows the
# whole tensor's magnitude because a gradient is a sum whose rounding error does, however small one
# of its elements.
SCALED_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def named_outputs_and_grads(module, leaves, call):
    """The output tensors of `call(module, leaves)` and the gradients of a float64 weighted_loss
    (so that half-precision outputs lose nothing in the loss) with respect to each leaf and each
    parameter, by name."""
    return outputs_and_grads(lambda: call(module, leaves), leaves_and_params(module, leaves),
                             loss_dtype=torch.float64)


def assert_close_scaled(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def assert_same_results(actual, expected, tol, same_dtypes=True):
    """Compares two named_outputs_and_grads results (values within SCALED_TOLERANCE-style `tol`,
    and dtypes unless same_dtypes is False)."""
    (outputs_a, grads_a), (outputs_e, grads_e) = actual, expected
    assert len(outputs_a) == len(outputs_e) and list(grads_a) == list(grads_e)
    for k, (a, e) in enumerate(zip(outputs_a, outputs_e)):
        assert not same_dtypes or a.dtype == e.dtype, f"output[{k}]: dtype {a.dtype} != {e.dtype}"
        assert_close_scaled(a, e, tol, f"output[{k}]")
    for name in grads_e:
        assert not same_dtypes or grads_a[name].dtype == grads_e[name].dtype, \
            f"grad of {name}: dtype {grads_a[name].dtype} != {grads_e[name].dtype}"
        assert_close_scaled(grads_a[name], grads_e[name], tol, f"grad of {name}")


def assert_twins_agree(reference, fused, call, leaves, **tolerance):
    """`call(module)` gives the same output tensors and the same gradients (with respect to the
    list `leaves` and to every parameter) for the torch.nn module and its fused twin."""
    results = []
    for module in (reference, fused):
        results.append(outputs_and_grads(lambda: call(module), [*leaves, *module.parameters()]))
    (ref_outputs, ref_grads), (fused_outputs, fused_grads) = results
    assert_all_close(fused_outputs, ref_outputs, **tolerance)
    assert_all_close(fused_grads, ref_grads, **tolerance)


# ---- accuracy against a float64 truth ------------------------------------------------------------

def relative_error(a, e):
    """max |a - e| / max(1, max |e|), on e's device."""
    return ((a.detach().to(e.device, torch.float64) - e).abs().max() / max(1.0, e.abs().max().item())).item()


def relative_errors(result, exact):
    """relative_error over the outputs, and over the gradients (0 where there are none), of two
    named_outputs_and_grads results."""
    (outputs, grads), (exact_outputs, exact_grads) = result, exact
    return (max(relative_error(a, e) for a, e in zip(outputs, exact_outputs)),
            max((relative_error(grads[name], exact_grads[name]) for name in exact_grads), default=0.0))


def rounding_floor(dtype):
    """An error that two correct results in `dtype` can both have from rounding alone, below which
    the ratio of their errors says nothing: half a unit of `dtype`'s rounding of the results
    (relative_error divides by max(1, max |truth|)) plus 8 units of float32 rounding for the
    arithmetic, which fused_rnn does in float32 for every type (its float32 errors at the CUDA
    tests' sizes: 2.1-2.4 units on the first GPU run; its CPU kernels': 0.5-6.6 units). So 1.0e-6
    for float32, 4.9e-4 for float16, 3.9e-3 for bfloat16; a wrong term, or products in a lower
    precision (TF32: 1e-3), are orders of magnitude above."""
    return torch.finfo(dtype).eps / 2 + 8 * torch.finfo(torch.float32).eps


def assert_results_at_least_as_accurate(ours, theirs, exact, floor=0.0, factor=1.5):
    """Of two named_outputs_and_grads results, `ours` has the dtypes of `theirs` and is within
    `factor` times their error against `exact` plus `floor` (relative_errors: outputs, and
    gradients, apart). Returns their errors (outputs, gradients)."""
    (our_outputs, our_grads), (their_outputs, their_grads) = ours, theirs
    assert [t.dtype for t in our_outputs] == [t.dtype for t in their_outputs], "output dtypes differ"
    assert {n: g.dtype for n, g in our_grads.items()} == {n: g.dtype for n, g in their_grads.items()}, \
        "gradient dtypes differ"
    their_errors = relative_errors(theirs, exact)
    for what, our_error, their_error in zip(("outputs", "gradients"), relative_errors(ours, exact), their_errors):
        assert our_error <= factor * their_error + floor, \
            f"{what}: error {our_error:.2e}, torch.nn's {their_error:.2e} (allowed: {factor} x that + {floor:.1e})"
    return their_errors


def exact_outputs_and_grads(exact, leaves, call):
    """named_outputs_and_grads of `exact` (a float64 reference) on float64 copies of `leaves` on
    its own device."""
    device = next(exact.parameters()).device
    exact_leaves = {name: t.detach().to(device, torch.float64).requires_grad_() for name, t in leaves.items()}
    return named_outputs_and_grads(exact, exact_leaves, call)


def assert_at_least_as_accurate(fused, reference, exact, leaves, call, floor=0.0):
    """fused's outputs and gradients are within 1.5x of torch.nn's error, plus `floor`, against
    `exact` (a float64 reference) run on the same inputs in float64 on its own device (on single
    elements the two round differently). Returns the exact outputs and torch.nn's output error."""
    exact_result = exact_outputs_and_grads(exact, leaves, call)
    their_errors = assert_results_at_least_as_accurate(named_outputs_and_grads(fused, leaves, call),
                                                       named_outputs_and_grads(reference, leaves, call),
                                                       exact_result, floor)
    return exact_result[0], their_errors[0]


def rounded(t, dtype):
    """t with its values rounded to `dtype` (kept in t's dtype) and t's gradient: the rounding is
    not differentiated, so gradients through it stay exact."""
    return t + (t.detach().to(dtype).to(t.dtype) - t.detach())


class Float64Truth(nn.Module):
    """The float64 truth for a torch.nn recurrent layer (LSTM, GRU or RNN) that computes in
    `dtype`: a float64 CPU copy run one layer at a time, exactly, on the values each layer receives
    rounded to `dtype`, as the module under test receives them: its inputs, states and weights
    (already in `dtype`, unless autocast casts them) and, past the first layer, the previous
    layer's output, which a module in `dtype` hands on as a `dtype` tensor. Without that rounding
    a ReLU unit whose pre-activation lies within a rounding of 0 has its gradient on in the module
    and off in the truth by chance, a whole gradient step of error in a half type; with it, what is
    left is each implementation's own error. Parameters: the module's, as float64 copies, by name."""

    def __init__(self, module, dtype):
        super().__init__()
        self.dtype, self.batch_first, self.lstm = dtype, module.batch_first, isinstance(module, nn.LSTM)
        self.directions = 2 if module.bidirectional else 1
        for name, p in module.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().to("cpu", torch.float64, copy=True)))
        options = dict(hidden_size=module.hidden_size, bias=module.bias, batch_first=module.batch_first,
                       bidirectional=module.bidirectional, dtype=torch.float64)
        if self.lstm:
            options["proj_size"] = module.proj_size
        if isinstance(module, nn.RNN):
            options["nonlinearity"] = module.nonlinearity
        layer_output = (module.proj_size or module.hidden_size) * self.directions
        # One single-layer module per layer, run with that layer's parameters swapped in; listed
        # rather than registered, so that their own parameters are not the truth's.
        self._layers = [type(module)(module.input_size if k == 0 else layer_output, **options)
                        for k in range(module.num_layers)]

    def _rounded_input(self, x):
        if isinstance(x, PackedSequence):
            return PackedSequence(rounded(x.data, self.dtype), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
        return rounded(x, self.dtype)

    def forward(self, input, hx=None):
        states = hx if self.lstm else (hx,)
        x, h_n, c_n = input, [], []
        for k, layer in enumerate(self._layers):
            params = {name: rounded(getattr(self, name.replace("_l0", f"_l{k}")), self.dtype)
                      for name, _ in layer.named_parameters()}
            hidden = None
            if hx is not None:  # this layer's directions' states
                own = [rounded(s[k * self.directions:(k + 1) * self.directions], self.dtype) for s in states]
                hidden = tuple(own) if self.lstm else own[0]
            x, state = functional_call(layer, params, (self._rounded_input(x), hidden))
            h_n.append(state[0] if self.lstm else state)
            c_n.append(state[1] if self.lstm else None)
        h_n = torch.cat(h_n)
        return (x, (h_n, torch.cat(c_n))) if self.lstm else (x, h_n)


# ---- CUDA graphs ---------------------------------------------------------------------------------

def capture_cuda_graph(run, *args):
    """(graph, outputs): run(*args) captured into a CUDA graph, whose replays rewrite `outputs`,
    after two warm-up calls on a side stream, as capture requires (cuBLAS handle, workspace,
    allocator)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run(*args)
    return graph, outputs


# ---- layer inputs ------------------------------------------------------------------------------

def leaf(*shape, dtype=torch.float64, device=None, requires_grad=True):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


INPUT_SIZE, STEPS, BATCH, PROJ_SIZE = 4, 4, 3, 3
INPUT_FORMS = ["3d", "unbatched", "packed_sorted", "packed_unsorted"]
PACKED_LENGTHS = {"packed_sorted": [4, 3, 1], "packed_unsorted": [2, 4, 3]}
LAYER_GRID_ARGS = "kind,num_layers,bidirectional,batch_first,bias,proj,with_h0,form"


def layer_grid(kinds, num_layers, bidirectional, batch_first, bias, proj, with_h0, forms):
    """pytest.params for LAYER_GRID_ARGS over the product of the given values (proj for LSTM only)."""
    for case in itertools.product(kinds, num_layers, bidirectional, batch_first, bias, proj, with_h0, forms):
        kind, layers, bidir, bf, has_bias, has_proj, h0, form = case
        if has_proj and kind != "LSTM":
            continue
        name = (f"{kind}-L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-"
                f"{'bias' if has_bias else 'nobias'}-{'proj' if has_proj else 'noproj'}-"
                f"{'h0' if h0 else 'noh0'}-{form}")
        yield pytest.param(*case, id=name)


def layer_leaves(kind, module, form, with_h0, dtype, steps=STEPS, batch=BATCH, device=None):
    """Random leaf tensors input, h0[, c0] shaped for `module` and the input form (an INPUT_FORMS
    entry; the packed forms take PACKED_LENGTHS[form] for the lengths of the `batch` sequences)."""
    h_out = module.proj_size or module.hidden_size
    states = module.num_layers * (2 if module.bidirectional else 1)
    batch_shape = () if form == "unbatched" else (batch,)
    if form == "unbatched":
        x_shape = (steps, module.input_size)
    else:
        x_shape = (batch, steps, module.input_size) if module.batch_first else (steps, batch, module.input_size)
    leaves = {"input": leaf(*x_shape, dtype=dtype, device=device)}
    if with_h0:
        leaves["h0"] = leaf(states, *batch_shape, h_out, dtype=dtype, device=device)
        if kind == "LSTM":
            leaves["c0"] = leaf(states, *batch_shape, module.hidden_size, dtype=dtype, device=device)
    return leaves


def layer_call(kind, form):
    """call(module, leaves): runs the module on layer_leaves in `form`, with h0 (and c0) if given."""
    def call(module, leaves):
        x = leaves["input"]
        if form in PACKED_LENGTHS:
            x = pack_padded_sequence(x, PACKED_LENGTHS[form], batch_first=module.batch_first,
                                     enforce_sorted=form == "packed_sorted")
        if "h0" not in leaves:
            return module(x)
        return module(x, (leaves["h0"], leaves["c0"]) if kind == "LSTM" else leaves["h0"])

    return call


# ---- raw ops -------------------------------------------------------------------------------------

LAYER_OPS = {
    "LSTM": torch.ops.fused_rnn.lstm_layer.default,
    "GRU": torch.ops.fused_rnn.gru_layer.default,
    "RNN_TANH": torch.ops.fused_rnn.rnn_layer.default,
    "RNN_RELU": torch.ops.fused_rnn.rnn_layer.default,
}
BACKWARD_OPS = {
    "LSTM": torch.ops.fused_rnn.lstm_layer_backward.default,
    "GRU": torch.ops.fused_rnn.gru_layer_backward.default,
    "RNN_TANH": torch.ops.fused_rnn.rnn_layer_backward.default,
    "RNN_RELU": torch.ops.fused_rnn.rnn_layer_backward.default,
}
DIFFERENTIABLE_OP_INPUTS = ("input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
PACKED_BATCH_SIZES = [3, 3, 2, 1]  # four steps, batch 3, mixed lengths (4, 3, 2)
# (kind, proj) for the layer ops; proj only for LSTM.
OP_KINDS = [(kind, proj) for kind in LAYER_KINDS for proj in ([False, True] if kind == "LSTM" else [False])]
OP_KIND_IDS = [kind + ("-proj" if proj else "") for kind, proj in OP_KINDS]


def layer_op_tensors(kind, packed, bias, proj, requires_grad=True, dtype=torch.float64, device=None,
                     input_size=3, hidden=5, proj_size=3, batch=3, steps=4):
    """Random tensors for one layer op as a dict: input, batch_sizes, hx, cx (LSTM), w_ih,
    w_hh, b_ih, b_hh, w_hr (None where absent). batch_sizes (packed only) stays on the CPU, as
    in PackedSequence."""
    assert not proj or kind == "LSTM"
    gates, h_out = GATES[kind], (proj_size if proj else hidden)
    mk = lambda *shape: leaf(*shape, dtype=dtype, device=device, requires_grad=requires_grad)  # noqa: E731
    if packed:
        batch_sizes = torch.tensor(PACKED_BATCH_SIZES, dtype=torch.int64)
        batch, x = int(batch_sizes[0]), mk(int(batch_sizes.sum()), input_size)
    else:
        batch_sizes, x = None, mk(steps, batch, input_size)
    return {
        "input": x, "batch_sizes": batch_sizes, "hx": mk(batch, h_out),
        "cx": mk(batch, hidden) if kind == "LSTM" else None,
        "w_ih": mk(gates * hidden, input_size), "w_hh": mk(gates * hidden, h_out),
        "b_ih": mk(gates * hidden) if bias else None, "b_hh": mk(gates * hidden) if bias else None,
        "w_hr": mk(proj_size, hidden) if proj else None,
    }


def layer_op_args(kind, t, reverse, save_reserve=True):
    """Positional args of LAYER_OPS[kind] from a layer_op_tensors dict."""
    common = (t["input"], t["batch_sizes"], t["hx"])
    weights = (t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"])
    if kind == "LSTM":
        return (*common, t["cx"], *weights, t["w_hr"], reverse, save_reserve)
    if kind == "GRU":
        return (*common, *weights, reverse, save_reserve)
    return (*common, *weights, kind == "RNN_RELU", reverse, save_reserve)


def layer_backward_op_args(kind, t, reverse):
    """Valid positional args of BACKWARD_OPS[kind]: runs the forward op for output and reserve,
    and draws random upstream gradients."""
    with torch.no_grad():
        results = LAYER_OPS[kind](*layer_op_args(kind, t, reverse))
    output, hy, reserve = results[0], results[1], results[-1]
    grad_out, grad_hy = torch.randn_like(output), torch.randn_like(hy)
    has_bias = t["b_ih"] is not None
    x, bs, hx, w_ih, w_hh = t["input"], t["batch_sizes"], t["hx"], t["w_ih"], t["w_hh"]
    if kind == "LSTM":
        grad_cy = torch.randn_like(results[2])
        return (grad_out, grad_hy, grad_cy, x, bs, hx, t["cx"], w_ih, w_hh, t["w_hr"], output, reserve,
                has_bias, reverse)
    if kind == "GRU":
        return (grad_out, grad_hy, x, bs, hx, w_ih, w_hh, output, reserve, has_bias, reverse)
    return (grad_out, grad_hy, x, bs, hx, w_ih, w_hh, output, reserve, has_bias, kind == "RNN_RELU", reverse)


# ---- gradcheck and opcheck -----------------------------------------------------------------------

def assert_layer_op_gradcheck_passes(kind, proj, packed, reverse, bias, second_order=False, **tensor_options):
    """gradcheck (gradgradcheck if second_order) of LAYER_OPS[kind] (every output but the reserve)
    with respect to each of its differentiable inputs; tensor_options go to layer_op_tensors
    (device=, input_size=, ...)."""
    tensors = layer_op_tensors(kind, packed, bias, proj, **tensor_options)
    names = [n for n in DIFFERENTIABLE_OP_INPUTS if tensors[n] is not None]

    def differentiable_outputs(*values):
        args = layer_op_args(kind, {**tensors, **dict(zip(names, values))}, reverse)
        return LAYER_OPS[kind](*args)[:-1]  # everything but the reserve

    assert (gradgradcheck if second_order else gradcheck)(differentiable_outputs, [tensors[n] for n in names])


def module_gradcheck(module, leaves, call):
    """gradcheck of `call(forward, leaves)` w.r.t. the leaf tensors and every parameter, where
    forward(*args) runs the module with the parameters swapped in through functional_call."""
    param_names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]

    def run(*values):
        inputs = dict(zip(leaves, values[:len(leaves)]))
        replaced = dict(zip(param_names, values[len(leaves):]))
        return call(lambda *a: functional_call(module, replaced, a), inputs)

    assert gradcheck(run, [*leaves.values(), *params])


# (kind, packed, reverse, bias, proj) for opcheck: four variants per op, two more with proj for LSTM.
OPCHECK_VARIANTS = [
    (False, False, True, False),
    (True, True, True, False),
    (False, True, False, False),
    (True, False, False, False),
]
LSTM_PROJ_OPCHECK_VARIANTS = [(False, False, True, True), (True, True, False, True)]
OPCHECK_CASES = [(kind, *v) for kind in LAYER_KINDS
                 for v in OPCHECK_VARIANTS + (LSTM_PROJ_OPCHECK_VARIANTS if kind == "LSTM" else [])]
OPCHECK_CASE_ARGS = "kind,packed,reverse,bias,proj"


def opcheck_case_id(case):
    kind, packed, reverse, bias, proj = case
    return "-".join([kind, "packed" if packed else "unpacked", "reverse" if reverse else "forward",
                     "bias" if bias else "nobias"] + (["proj"] if proj else []))


OPCHECK_CASE_IDS = [opcheck_case_id(case) for case in OPCHECK_CASES]


def assert_opcheck_passes(op, args):
    results = opcheck(op, args)
    assert results and all(v == "SUCCESS" for v in results.values()), results


def assert_layer_op_opcheck_passes(kind, packed, reverse, bias, proj, requires_grad=True, **tensor_options):
    """opcheck of LAYER_OPS[kind]; tensor_options go to layer_op_tensors (device=, input_size=, ...).
    Without requires_grad the op runs as in inference, keeping no reserve."""
    tensors = layer_op_tensors(kind, packed, bias, proj, requires_grad=requires_grad, **tensor_options)
    assert_opcheck_passes(LAYER_OPS[kind], layer_op_args(kind, tensors, reverse, save_reserve=requires_grad))


def assert_backward_op_opcheck_passes(kind, packed, reverse, bias, proj, **tensor_options):
    """opcheck of BACKWARD_OPS[kind]; tensor_options go to layer_op_tensors (device=, input_size=, ...)."""
    tensors = layer_op_tensors(kind, packed, bias, proj, requires_grad=False, **tensor_options)
    assert_opcheck_passes(BACKWARD_OPS[kind], layer_backward_op_args(kind, tensors, reverse))
