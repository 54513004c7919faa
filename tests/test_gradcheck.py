"""torch.autograd.gradcheck in float64 through the raw ops and through whole modules."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from helpers import (CELL_KINDS, LAYER_KINDS, OP_KIND_IDS, OP_KINDS, assert_layer_op_gradcheck_passes, leaf,
                     module_gradcheck)

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


@pytest.mark.parametrize("cls", [fused_rnn.LSTM, fused_rnn.GRU, fused_rnn.RNN])
def test_create_graph_works_and_double_backward_raises_clearly(cls):
    module = cls(3, 4, 2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(module(x)[0].pow(2).sum(), x, create_graph=True)
    reference, = torch.autograd.grad(module(x)[0].pow(2).sum(), x)
    torch.testing.assert_close(grad, reference, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(grad.pow(2).sum(), x)
