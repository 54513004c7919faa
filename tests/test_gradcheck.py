"""torch.autograd.gradcheck in float64 through the raw ops and through whole modules, and second
derivatives: gradgradcheck of the ops and double backward against torch.nn."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from helpers import (CELL_KINDS, LAYER_KINDS, OP_KIND_IDS, OP_KINDS, assert_all_close, assert_layer_op_gradcheck_passes,
                     layer_backward_op_args, layer_op_tensors, leaf, make_pair, module_gradcheck)

pytestmark = pytest.mark.usefixtures("torch_test_state")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("kind,proj", OP_KINDS, ids=OP_KIND_IDS)
def test_layer_op_gradcheck(kind, proj, packed, reverse, bias):
    assert_layer_op_gradcheck_passes(kind, proj, packed, reverse, bias)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_bidirectional_two_layer_module_gradcheck_packed(kind):
    class_name, extra = LAYER_KINDS[kind]
    module = getattr(fused_rnn, class_name)(3, 4, 2, bidirectional=True, dtype=torch.float64, **extra)
    leaves = {"input": leaf(4, 3, 3), "h0": leaf(4, 3, 4)}
    if kind == "LSTM":
        leaves["c0"] = leaf(4, 3, 4)

    def call(forward, t):
        packed = pack_padded_sequence(t["input"], [2, 4, 3], enforce_sorted=False)
        out, h_n = forward(packed, (t["h0"], t["c0"]) if kind == "LSTM" else t["h0"])
        return (out.data, *h_n) if kind == "LSTM" else (out.data, h_n)

    module_gradcheck(module, leaves, call)


def test_projected_lstm_module_gradcheck_batch_first():
    module = fused_rnn.LSTM(3, 4, 2, batch_first=True, bidirectional=True, proj_size=2, dtype=torch.float64)
    leaves = {"input": leaf(2, 3, 3), "h0": leaf(4, 2, 2), "c0": leaf(4, 2, 4)}

    def call(forward, t):
        out, (h_n, c_n) = forward(t["input"], (t["h0"], t["c0"]))
        return out, h_n, c_n

    module_gradcheck(module, leaves, call)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_gradcheck(kind):
    class_name, extra = CELL_KINDS[kind]
    module = getattr(fused_rnn, class_name)(3, 4, dtype=torch.float64, **extra)
    leaves = {"input": leaf(2, 3), "h0": leaf(2, 4)}
    if kind == "LSTMCell":
        leaves["c0"] = leaf(2, 4)

    def call(forward, t):
        return forward(t["input"], (t["h0"], t["c0"]) if kind == "LSTMCell" else t["h0"])

    module_gradcheck(module, leaves, call)


# ---- gradients of gradients (create_graph=True: the backward runs fused_rnn.composite) -------------

@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("kind,proj", OP_KINDS, ids=OP_KIND_IDS)
def test_layer_op_gradgradcheck(kind, proj, packed, reverse):
    assert_layer_op_gradcheck_passes(kind, proj, packed, reverse, True, second_order=True)


DOUBLE_BACKWARD_CASES = [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"}),
                         ("RNN", {}), ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {})]


DOUBLE_BACKWARD_PARAMS = [
    pytest.param(name, kwargs, packed,
                 id=name + "".join(f"-{k}={v}" for k, v in kwargs.items()) + ("-packed" if packed else ""))
    for name, kwargs in DOUBLE_BACKWARD_CASES for packed in ([False] if name.endswith("Cell") else [False, True])]


@pytest.mark.parametrize("class_name, kwargs, packed", DOUBLE_BACKWARD_PARAMS)
def test_double_backward_matches_nn(class_name, kwargs, packed):
    """A gradient penalty, d/dθ |dL/dx|^2, through a 2-layer bidirectional layer (or a cell): the
    same penalty gradients for the input and every parameter as torch.nn's, and the same first-order
    gradient on the way."""
    cell = class_name.endswith("Cell")
    layer_kwargs = {} if cell else dict(num_layers=2, bidirectional=True)
    results = []
    for module in make_pair(class_name, 3, 4, **kwargs, **layer_kwargs, dtype=torch.float64):
        torch.manual_seed(1)
        x = leaf(2, 3) if cell else leaf(5, 3, 3)
        run_on = pack_padded_sequence(x, [5, 3, 2]) if packed else x
        out = module(run_on)
        out = out[0] if isinstance(out, tuple) else out
        out = out.data if packed else out
        grad_x, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        penalty_grads = torch.autograd.grad(grad_x.pow(2).sum(), [x, *module.parameters()])
        results.append([grad_x.detach(), *penalty_grads])
    assert_all_close(results[1], results[0], rtol=1e-10, atol=1e-10)


def test_create_graph_first_order_matches_the_fused_backward():
    module = fused_rnn.LSTM(3, 4, 2, bidirectional=True, proj_size=2, dtype=torch.float64)
    x = leaf(4, 2, 3)
    recomputed = torch.autograd.grad(module(x)[0].pow(2).sum(), [x, *module.parameters()], create_graph=True)
    fused = torch.autograd.grad(module(x)[0].pow(2).sum(), [x, *module.parameters()])
    assert_all_close([g.detach() for g in recomputed], list(fused), rtol=1e-12, atol=1e-12)


def test_backward_op_itself_is_not_differentiable():
    tensors = layer_op_tensors("GRU", False, True, False)
    args = layer_backward_op_args("GRU", tensors, False)
    grad_output = args[0].detach().requires_grad_()
    grads = torch.ops.fused_rnn.gru_layer_backward(grad_output, *args[1:])
    with pytest.raises(NotImplementedError, match="create_graph=True"):
        grads[0].sum().backward()
