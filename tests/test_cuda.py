"""The CUDA backend: parity with torch.nn on cuDNN (outputs and every gradient, per dtype) and
with the CPU backend, gradcheck and opcheck on CUDA tensors, CUDA-graph capture, long
sequences, large steps, streams, devices and autocast. Skipped without a GPU or without the
CUDA backend compiled in."""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.library import opcheck
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn
import fused_rnn.autocast  # noqa: F401  (registers the ops' autocast rules)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (or a CPU-only torch)"),
    pytest.mark.skipif(not fused_rnn.backends()["cuda"], reason="fused_rnn was built without its CUDA backend"),
]

CUDA = torch.device("cuda")
INPUT_SIZE, HIDDEN, PROJ_SIZE, STEPS, BATCH = 4, 10, 3, 4, 3
KINDS = {
    "LSTM": ("LSTM", {}),
    "GRU": ("GRU", {}),
    "RNN_TANH": ("RNN", {"nonlinearity": "tanh"}),
    "RNN_RELU": ("RNN", {"nonlinearity": "relu"}),
}
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
FORMS = ["3d", "unbatched", "packed_sorted", "packed_unsorted"]
PACKED_LENGTHS = {"packed_sorted": [4, 3, 1], "packed_unsorted": [2, 4, 3]}
# Per dtype: elementwise |actual - expected| <= tol * (max(1, max |expected|) + |expected|).
# The absolute part follows the whole tensor's magnitude because a gradient is a sum whose
# rounding error does, however small one of its elements.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Autocast (float16) against the same module in float32.
AUTOCAST_TOLERANCE = 2e-2


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN (and cuBLAS, if allowed) would run float32 in TF32, far from a 1e-5 comparison."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ---- helpers -------------------------------------------------------------------------------------

def make_modules(kind, dtype, input_size=INPUT_SIZE, hidden_size=HIDDEN, device=CUDA, **kwargs):
    """(torch.nn module, fused_rnn module) of one kind on `device`, with the same weights."""
    class_name, extra = KINDS[kind]
    reference = getattr(nn, class_name)(input_size, hidden_size, **extra, **kwargs, device=device, dtype=dtype)
    fused = getattr(fused_rnn, class_name)(input_size, hidden_size, **extra, **kwargs, device=device, dtype=dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def leaf(*shape, dtype, device=CUDA):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()


def layer_leaves(kind, module, form, with_h0, dtype, steps=STEPS, device=CUDA):
    """Random leaf tensors input, h0[, c0] shaped for `module` and the input form."""
    h_out = module.proj_size or module.hidden_size
    states = module.num_layers * (2 if module.bidirectional else 1)
    batch = () if form == "unbatched" else (BATCH,)
    if form == "unbatched":
        x_shape = (steps, module.input_size)
    else:
        x_shape = (BATCH, steps, module.input_size) if module.batch_first else (steps, BATCH, module.input_size)
    leaves = {"input": leaf(*x_shape, dtype=dtype, device=device)}
    if with_h0:
        leaves["h0"] = leaf(states, *batch, h_out, dtype=dtype, device=device)
        if kind == "LSTM":
            leaves["c0"] = leaf(states, *batch, module.hidden_size, dtype=dtype, device=device)
    return leaves


def layer_call(kind, form):
    """call(module, leaves): runs the module on the leaves in `form`, with h0 (and c0) if given."""
    def call(module, leaves):
        x = leaves["input"]
        if form in PACKED_LENGTHS:
            x = pack_padded_sequence(x, PACKED_LENGTHS[form], batch_first=module.batch_first,
                                     enforce_sorted=form == "packed_sorted")
        if "h0" not in leaves:
            return module(x)
        return module(x, (leaves["h0"], leaves["c0"]) if kind == "LSTM" else leaves["h0"])

    return call


def tensors_of(output):
    """The tensors of a nested module output, in order; a PackedSequence contributes its data."""
    if isinstance(output, PackedSequence):
        return [output.data]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors_of(item)]
    return [output]


def weighted_loss(tensors):
    """sum_k <t_k, W_k> in float64 with fixed pseudo-random W_k: every output element gets its
    own upstream gradient."""
    loss = 0
    for k, t in enumerate(tensors):
        weight = torch.randn(t.shape, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
        loss = loss + (t.double() * weight.to(t.device)).sum()
    return loss


def outputs_and_grads(module, leaves, call):
    """The output tensors of `call(module, leaves)` and the gradients of weighted_loss with
    respect to each leaf and each parameter, by name."""
    outputs = tensors_of(call(module, leaves))
    params = dict(module.named_parameters())
    names = list(leaves) + [f"param.{n}" for n in params]
    grads = torch.autograd.grad(weighted_loss(outputs), [*leaves.values(), *params.values()])
    return outputs, dict(zip(names, grads))


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def assert_same_results(actual, expected, tol, same_dtypes=True):
    """Compares two outputs_and_grads results."""
    (outputs_a, grads_a), (outputs_e, grads_e) = actual, expected
    assert len(outputs_a) == len(outputs_e) and list(grads_a) == list(grads_e)
    for k, (a, e) in enumerate(zip(outputs_a, outputs_e)):
        assert not same_dtypes or a.dtype == e.dtype, f"output[{k}]: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, tol, f"output[{k}]")
    for name in grads_e:
        assert_close(grads_a[name], grads_e[name], tol, f"grad of {name}")


def to_cuda_leaves(leaves):
    return {name: t.detach().to(CUDA).requires_grad_() for name, t in leaves.items()}


# ---- parity with torch.nn on CUDA (cuDNN; torch's own kernels for bfloat16) ----------------------

def grid(num_layers, bidirectional, batch_first, bias, proj, with_h0, forms):
    for case in itertools.product(KINDS, num_layers, bidirectional, batch_first, bias, proj, with_h0, forms):
        kind, layers, bidir, bf, has_bias, has_proj, h0, form = case
        if has_proj and kind != "LSTM":
            continue
        name = (f"{kind}-L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-"
                f"{'bias' if has_bias else 'nobias'}-{'proj' if has_proj else 'noproj'}-"
                f"{'h0' if h0 else 'noh0'}-{form}")
        yield pytest.param(*case, id=name)


GRID_ARGS = "kind,num_layers,bidirectional,batch_first,bias,proj,with_h0,form"
FULL_GRID = list(grid([1, 2], [False, True], [False, True], [True, False], [False, True], [False, True], FORMS))
HALF_PRECISION_GRID = list(grid([2], [False, True], [False], [True, False], [False, True], [True],
                                ["3d", "unbatched", "packed_unsorted"]))


def check_parity_with_nn(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, dtype):
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    if proj:
        kwargs["proj_size"] = PROJ_SIZE
    reference, fused = make_modules(kind, dtype, **kwargs)
    leaves, call = layer_leaves(kind, fused, form, with_h0, dtype), layer_call(kind, form)
    assert_same_results(outputs_and_grads(fused, leaves, call), outputs_and_grads(reference, leaves, call),
                        TOLERANCE[dtype])


@pytest.mark.parametrize(GRID_ARGS, FULL_GRID)
def test_matches_nn_float64(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form):
    check_parity_with_nn(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, torch.float64)


@pytest.mark.parametrize(GRID_ARGS, FULL_GRID)
def test_matches_nn_float32(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form):
    check_parity_with_nn(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(GRID_ARGS, HALF_PRECISION_GRID)
def test_matches_nn_half_precision(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form,
                                   dtype):
    check_parity_with_nn(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_long_sequence_matches_nn(kind, dtype):
    """T = 4096: state carried across thousands of steps, forward and backward."""
    reference, fused = make_modules(kind, dtype, hidden_size=16, bidirectional=True)
    leaves, call = layer_leaves(kind, fused, "3d", True, dtype, steps=4096), layer_call(kind, "3d")
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]
    assert_same_results(outputs_and_grads(fused, leaves, call), outputs_and_grads(reference, leaves, call), tol)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_step_larger_than_one_grid_matches_nn(kind):
    """batch * hidden = 2^25 elements per step, beyond the 2^24 threads of the largest launch:
    the kernels' grid-stride loop covers the rest."""
    reference, fused = make_modules(kind, torch.float64, input_size=8, hidden_size=4096)
    leaves = {"input": leaf(1, 8192, 8, dtype=torch.float64)}
    call = layer_call(kind, "3d")
    assert_same_results(outputs_and_grads(fused, leaves, call), outputs_and_grads(reference, leaves, call),
                        TOLERANCE[torch.float64])


# ---- parity with the CPU backend -----------------------------------------------------------------

@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_cpu_backend(kind, form):
    kwargs = dict(num_layers=2, bidirectional=True)
    if kind == "LSTM":
        kwargs["proj_size"] = PROJ_SIZE
    _, on_cpu = make_modules(kind, torch.float64, device="cpu", **kwargs)
    on_cuda = copy.deepcopy(on_cpu).to(CUDA)
    cpu_leaves = layer_leaves(kind, on_cpu, form, True, torch.float64, device="cpu")
    call = layer_call(kind, form)
    assert_same_results(outputs_and_grads(on_cuda, to_cuda_leaves(cpu_leaves), call),
                        outputs_and_grads(on_cpu, cpu_leaves, call), TOLERANCE[torch.float64])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("kind", list(KINDS))
def test_runs_on_a_device_that_is_not_the_current_one(kind):
    """The ops make the tensors' device current (kernels, cuBLAS handle and stream alike)."""
    _, on_cpu = make_modules(kind, torch.float64, device="cpu", bidirectional=True)
    device = torch.device("cuda", 1)
    on_device = copy.deepcopy(on_cpu).to(device)
    cpu_leaves = layer_leaves(kind, on_cpu, "3d", True, torch.float64, device="cpu")
    device_leaves = {name: t.detach().to(device).requires_grad_() for name, t in cpu_leaves.items()}
    call = layer_call(kind, "3d")
    with torch.cuda.device(0):
        on_device_results = outputs_and_grads(on_device, device_leaves, call)
    assert_same_results(on_device_results, outputs_and_grads(on_cpu, cpu_leaves, call), TOLERANCE[torch.float64])


@pytest.mark.parametrize("kind", list(KINDS))
def test_runs_on_the_current_stream(kind):
    """On a side stream whose inputs are still being produced, every kernel and GEMM must wait
    for them: work sent to another stream would read them too early."""
    _, fused = make_modules(kind, torch.float32, num_layers=2, bidirectional=True)
    leaves, call = layer_leaves(kind, fused, "3d", True, torch.float32), layer_call(kind, "3d")
    expected = outputs_and_grads(fused, leaves, call)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy for tens of milliseconds
        late_leaves = {name: (t.detach() * 1).requires_grad_() for name, t in leaves.items()}
        actual = outputs_and_grads(fused, late_leaves, call)
    torch.cuda.current_stream().wait_stream(side)
    assert_same_results(actual, expected, TOLERANCE[torch.float32])


# ---- the raw ops: gradcheck and opcheck ----------------------------------------------------------

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
DIFFERENTIABLE = ("input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
PACKED_BATCH_SIZES = [3, 3, 2, 1]


def op_tensors(kind, packed, bias, proj, requires_grad=True, hidden=5):
    """Random float64 CUDA tensors for one layer op, None where absent; batch_sizes (packed
    only) stays on the CPU, as in PackedSequence."""
    gates, h_out = GATES[kind], (PROJ_SIZE if proj else hidden)

    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=CUDA, requires_grad=requires_grad)

    batch_sizes = torch.tensor(PACKED_BATCH_SIZES) if packed else None
    x = make(sum(PACKED_BATCH_SIZES), INPUT_SIZE) if packed else make(STEPS, BATCH, INPUT_SIZE)
    return {
        "input": x, "batch_sizes": batch_sizes, "hx": make(BATCH, h_out),
        "cx": make(BATCH, hidden) if kind == "LSTM" else None,
        "w_ih": make(gates * hidden, INPUT_SIZE), "w_hh": make(gates * hidden, h_out),
        "b_ih": make(gates * hidden) if bias else None, "b_hh": make(gates * hidden) if bias else None,
        "w_hr": make(PROJ_SIZE, hidden) if proj else None,
    }


def op_args(kind, t, reverse):
    """Positional args of LAYER_OPS[kind] from an op_tensors dict."""
    head = (t["input"], t["batch_sizes"], t["hx"])
    weights = (t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"])
    if kind == "LSTM":
        return (*head, t["cx"], *weights, t["w_hr"], reverse)
    if kind == "GRU":
        return (*head, *weights, reverse)
    return (*head, *weights, kind == "RNN_RELU", reverse)


def backward_op_args(kind, t, reverse):
    """Positional args of BACKWARD_OPS[kind]: the forward op's output and reserve, random
    upstream gradients."""
    with torch.no_grad():
        results = LAYER_OPS[kind](*op_args(kind, t, reverse))
    output, hy, reserve = results[0], results[1], results[-1]
    grad_output, grad_hy = torch.randn_like(output), torch.randn_like(hy)
    has_bias = t["b_ih"] is not None
    x, batch_sizes, hx, w_ih, w_hh = t["input"], t["batch_sizes"], t["hx"], t["w_ih"], t["w_hh"]
    if kind == "LSTM":
        return (grad_output, grad_hy, torch.randn_like(results[2]), x, batch_sizes, hx, t["cx"], w_ih, w_hh,
                t["w_hr"], output, reserve, has_bias, reverse)
    if kind == "GRU":
        return (grad_output, grad_hy, x, batch_sizes, hx, w_ih, w_hh, output, reserve, has_bias, reverse)
    return (grad_output, grad_hy, x, batch_sizes, hx, w_ih, w_hh, output, reserve, has_bias, kind == "RNN_RELU",
            reverse)


OP_KINDS = [(kind, proj) for kind in KINDS for proj in ([False, True] if kind == "LSTM" else [False])]
OP_KIND_IDS = [kind + ("-proj" if proj else "") for kind, proj in OP_KINDS]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("kind,proj", OP_KINDS, ids=OP_KIND_IDS)
def test_layer_op_gradcheck(kind, proj, packed, reverse, bias):
    tensors = op_tensors(kind, packed, bias, proj)
    names = [n for n in DIFFERENTIABLE if tensors[n] is not None]

    def differentiable_outputs(*values):
        return LAYER_OPS[kind](*op_args(kind, {**tensors, **dict(zip(names, values))}, reverse))[:-1]

    assert gradcheck(differentiable_outputs, [tensors[n] for n in names])


@pytest.mark.parametrize("kind", list(KINDS))
def test_stacked_bidirectional_module_gradcheck_packed(kind):
    """gradcheck w.r.t. input, h0 (c0) and every parameter, swapped in by functional_call."""
    kwargs = dict(num_layers=2, bidirectional=True)
    if kind == "LSTM":
        kwargs["proj_size"] = 2
    _, module = make_modules(kind, torch.float64, input_size=3, hidden_size=4, **kwargs)
    leaves = layer_leaves(kind, module, "packed_unsorted", True, torch.float64)
    param_names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def run(*values):
        inputs = dict(zip(leaves, values[:len(leaves)]))
        replaced = dict(zip(param_names, values[len(leaves):]))
        x = pack_padded_sequence(inputs["input"], PACKED_LENGTHS["packed_unsorted"], enforce_sorted=False)
        hidden = (inputs["h0"], inputs["c0"]) if kind == "LSTM" else inputs["h0"]
        return tuple(tensors_of(functional_call(module, replaced, (x, hidden))))

    assert gradcheck(run, [*leaves.values(), *params])


# (packed, reverse, bias, proj) per op; proj only for LSTM.
OPCHECK_VARIANTS = [(False, False, True, False), (True, True, True, False), (False, True, False, False),
                    (True, False, False, False)]
OPCHECK_CASES = [(kind, *variant) for kind in KINDS
                 for variant in OPCHECK_VARIANTS + ([(False, False, True, True), (True, True, False, True)]
                                                    if kind == "LSTM" else [])]


def opcheck_id(case):
    kind, packed, reverse, bias, proj = case
    return "-".join([kind, "packed" if packed else "unpacked", "reverse" if reverse else "forward",
                     "bias" if bias else "nobias"] + (["proj"] if proj else []))


def assert_opcheck_passes(op, args):
    results = opcheck(op, args)
    assert results and all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("kind,packed,reverse,bias,proj", OPCHECK_CASES, ids=map(opcheck_id, OPCHECK_CASES))
def test_forward_op_opcheck(kind, packed, reverse, bias, proj, requires_grad):
    tensors = op_tensors(kind, packed, bias, proj, requires_grad=requires_grad)
    assert_opcheck_passes(LAYER_OPS[kind], op_args(kind, tensors, reverse))


@pytest.mark.parametrize("kind,packed,reverse,bias,proj", OPCHECK_CASES, ids=map(opcheck_id, OPCHECK_CASES))
def test_backward_op_opcheck(kind, packed, reverse, bias, proj):
    tensors = op_tensors(kind, packed, bias, proj, requires_grad=False)
    assert_opcheck_passes(BACKWARD_OPS[kind], backward_op_args(kind, tensors, reverse))


# ---- CUDA graphs ---------------------------------------------------------------------------------

def graph_module(kind):
    """A two-layer bidirectional float32 module (LSTM with a projection) on CUDA."""
    kwargs = dict(num_layers=2, bidirectional=True)
    if kind == "LSTM":
        kwargs["proj_size"] = PROJ_SIZE
    return make_modules(kind, torch.float32, **kwargs)[1]


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_captured_in_a_cuda_graph_replays_like_eager(kind):
    module = graph_module(kind)
    static_input = torch.randn(STEPS, BATCH, INPUT_SIZE, device=CUDA)
    with torch.no_grad():
        # Warm up on a side stream, as capture requires (cuBLAS handle, workspace, allocator).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                module(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = tensors_of(module(static_input))
        for _ in range(3):
            fresh = torch.randn_like(static_input)
            static_input.copy_(fresh)
            graph.replay()
            for k, (replayed, eager) in enumerate(zip(static_output, tensors_of(module(fresh)))):
                assert_close(replayed, eager, TOLERANCE[torch.float32], f"output[{k}]")


class FlatOutputs(nn.Module):
    """A recurrent module whose output is a flat tuple of tensors, as make_graphed_callables needs."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return tuple(tensors_of(self.rnn(x)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_and_backward_graphed_match_eager(kind):
    module = graph_module(kind)
    eager = copy.deepcopy(module)
    sample = torch.randn(STEPS, BATCH, INPUT_SIZE, device=CUDA, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(FlatOutputs(module), (sample,))
    call = lambda m, leaves: m(leaves["input"])  # noqa: E731
    for _ in range(2):
        leaves = {"input": torch.randn_like(sample).requires_grad_()}
        assert_same_results(outputs_and_grads(graphed, leaves, call),
                            outputs_and_grads(FlatOutputs(eager), leaves, call), TOLERANCE[torch.float32])


# ---- autocast ------------------------------------------------------------------------------------

@pytest.mark.parametrize("region_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_autocast_runs_in_float16_like_cudnn(kind, form, region_dtype):
    """Like torch.nn's cuDNN RNNs, the ops run in float16 in any CUDA autocast region, close to
    float32; gradients reach the float32 parameters in float32."""
    reference, fused = make_modules(kind, torch.float32, num_layers=2, bidirectional=True)
    leaves, call = layer_leaves(kind, fused, form, True, torch.float32), layer_call(kind, form)
    with torch.autocast("cuda", dtype=region_dtype):
        autocast = outputs_and_grads(fused, leaves, call)
        reference_autocast = outputs_and_grads(reference, leaves, call)
    assert all(t.dtype == torch.float16 for t in autocast[0])
    assert all(g.dtype == torch.float32 for g in autocast[1].values())
    assert_same_results(autocast, reference_autocast, TOLERANCE[torch.float16])
    assert_same_results(autocast, outputs_and_grads(fused, leaves, call), AUTOCAST_TOLERANCE, same_dtypes=False)


def test_autocast_leaves_float64_alone():
    _, fused = make_modules("LSTM", torch.float64)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64, device=CUDA)
    with torch.autocast("cuda"):
        output, (h_n, c_n) = fused(x)
    assert output.dtype == h_n.dtype == c_n.dtype == torch.float64
