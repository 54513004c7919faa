"""Shared helpers: building torch.nn / fused_rnn module pairs from one seed, comparing nested
outputs, computing every gradient of a fixed non-trivial loss, and arguments for the raw ops."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

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


@pytest.fixture
def torch_test_state():
    """Used by every test module here (through pytestmark): a fixed global seed, and one
    intra-op thread -- tiny shapes gain nothing from threads, and on a busy 2-core machine
    spinning OpenMP workers make them many times slower (test_parity has a dedicated
    multi-thread test). Thread count and default dtype are restored afterwards."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def make_pair(class_name, *args, seed=0, **kwargs):
    """torch.nn.<class_name>(*args, **kwargs) and fused_rnn.<class_name>(...), each built right
    after torch.manual_seed(seed)."""
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


def assert_close_nested(actual, expected, dtype=None, path="out"):
    """Recursive torch.testing.assert_close over tensors, tuples/lists, dicts, None and
    PackedSequence (data, batch_sizes, indices and the padded form)."""
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


def output_tensors(out):
    """The tensors of a (possibly nested) module output; a PackedSequence contributes .data."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in output_tensors(item)]
    if out is None:
        return []
    return [out]


def weighted_loss(out):
    """sum_k <out_k, W_k> with fixed pseudo-random W_k, so every output element (output, h_n
    and c_n alike) gets its own non-trivial upstream gradient."""
    loss = 0
    for k, t in enumerate(output_tensors(out)):
        g = torch.Generator().manual_seed(100 + k)
        loss = loss + (t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()
    return loss


def run_with_grads(module, leaves, call, module_params=True):
    """Runs `call(module)`, backpropagates weighted_loss, and returns (output, grads) where
    grads maps each name in `leaves` (input, h0, ...) and, if module_params, each parameter
    name to its gradient."""
    out = call(module)
    params = dict(module.named_parameters()) if module_params else {}
    names = list(leaves) + [f"param.{n}" for n in params]
    tensors = list(leaves.values()) + list(params.values())
    grads = torch.autograd.grad(weighted_loss(out), tensors)
    return out, dict(zip(names, grads))


def assert_same_outputs_and_grads(ref, ours, leaves, call, dtype, module_params=True):
    """The fused module matches torch.nn on the outputs of `call` and on every gradient.
    Returns (our output, torch.nn output)."""
    ref_out, ref_grads = run_with_grads(ref, leaves, call, module_params)
    our_out, our_grads = run_with_grads(ours, leaves, call, module_params)
    assert_close_nested(our_out, ref_out, dtype)
    assert_close_nested(our_grads, ref_grads, dtype, path="grad")
    return our_out, ref_out


def leaf(*shape, dtype=torch.float64, requires_grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


# ---- raw ops -------------------------------------------------------------------------------

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
PACKED_BATCH_SIZES = [3, 3, 2, 1]  # four steps, batch 3, mixed lengths (4, 3, 2)


def layer_op_tensors(kind, packed, bias, proj, requires_grad=True, dtype=torch.float64,
                     input_size=3, hidden=5, proj_size=3, batch=3, steps=4):
    """Random tensors for one layer op as a dict: input, batch_sizes, hx, cx (LSTM), w_ih,
    w_hh, b_ih, b_hh, w_hr (None where absent)."""
    assert not proj or kind == "LSTM"
    gates, h_out = GATES[kind], (proj_size if proj else hidden)
    mk = lambda *shape: leaf(*shape, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
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


def layer_op_args(kind, t, reverse):
    """Positional args of LAYER_OPS[kind] from a layer_op_tensors dict."""
    common = (t["input"], t["batch_sizes"], t["hx"])
    weights = (t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"])
    if kind == "LSTM":
        return (*common, t["cx"], *weights, t["w_hr"], reverse)
    if kind == "GRU":
        return (*common, *weights, reverse)
    return (*common, *weights, kind == "RNN_RELU", reverse)


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
