"""Bad inputs and constructor arguments raise what torch.nn raises (same exception type) with a
message that names what was expected and what was got.

Each case is a function of `lib`, which is either torch.nn or fused_rnn: both expose the same
class names, so one call site describes the same misuse of either library."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn

from helpers import BACKWARD_OPS, layer_backward_op_args, layer_op_tensors

pytestmark = pytest.mark.usefixtures("torch_test_state")

LAYERS = ["LSTM", "GRU", "RNN"]
CELLS = ["LSTMCell", "GRUCell", "RNNCell"]


def x3d(steps=5, batch=3, features=4, dtype=torch.float32):
    return torch.randn(steps, batch, features, dtype=dtype)


def hidden_for(name, h, c=None):
    """hx argument for layer/cell `name`: (h, c) for LSTMs, h otherwise."""
    return (h, h if c is None else c) if name.startswith("LSTM") else h


# (id, call(lib), substrings fused_rnn's message must contain: the expected and the actual value)
LAYER_CASES = []
for L in LAYERS:
    LAYER_CASES += [
        (f"{L}-feature-size", lambda lib, L=L: getattr(lib, L)(7, 6)(x3d()), ["7", "4"]),
        (f"{L}-feature-size-packed", lambda lib, L=L: getattr(lib, L)(7, 6)(
            pack_padded_sequence(x3d(), [5, 3, 2])), ["7", "4"]),
        (f"{L}-input-1d", lambda lib, L=L: getattr(lib, L)(4, 6)(torch.randn(4)), ["2D or 3D", "1D"]),
        (f"{L}-input-4d", lambda lib, L=L: getattr(lib, L)(4, 6)(torch.randn(2, 5, 3, 4)), ["2D or 3D", "4D"]),
        (f"{L}-hx-2d-for-batched-input", lambda lib, L=L: getattr(lib, L)(4, 6)(
            x3d(), hidden_for(L, torch.randn(3, 6))), ["3-D", "2-D"]),
        (f"{L}-hx-3d-for-unbatched-input", lambda lib, L=L: getattr(lib, L)(4, 6)(
            torch.randn(5, 4), hidden_for(L, torch.randn(1, 1, 6))), ["2-D", "3-D"]),
        (f"{L}-input-dtype", lambda lib, L=L: getattr(lib, L)(4, 6)(x3d(dtype=torch.float64)),
         ["torch.float64", "torch.float32"]),
        (f"{L}-zero-steps", lambda lib, L=L: getattr(lib, L)(4, 6)(x3d(steps=0)), ["larger than 0"]),
        (f"{L}-zero-steps-batch-first", lambda lib, L=L: getattr(lib, L)(4, 6, batch_first=True)(
            torch.randn(3, 0, 4)), ["larger than 0"]),
        (f"{L}-zero-steps-unbatched", lambda lib, L=L: getattr(lib, L)(4, 6)(torch.randn(0, 4)),
         ["larger than 0"]),
        (f"{L}-h0-batch", lambda lib, L=L: getattr(lib, L)(4, 6)(
            x3d(), hidden_for(L, torch.randn(1, 2, 6), torch.randn(1, 3, 6))), ["1, 3, 6", "1, 2, 6"]),
        (f"{L}-h0-layers", lambda lib, L=L: getattr(lib, L)(4, 6, 2)(
            x3d(), hidden_for(L, torch.randn(1, 3, 6), torch.randn(2, 3, 6))), ["2, 3, 6", "1, 3, 6"]),
        (f"{L}-h0-directions", lambda lib, L=L: getattr(lib, L)(4, 6, bidirectional=True)(
            x3d(), hidden_for(L, torch.randn(1, 3, 6), torch.randn(2, 3, 6))), ["2, 3, 6", "1, 3, 6"]),
        (f"{L}-h0-batch-packed", lambda lib, L=L: getattr(lib, L)(4, 6)(
            pack_padded_sequence(x3d(), [5, 3, 2]), hidden_for(L, torch.randn(1, 2, 6), torch.randn(1, 3, 6))),
         ["1, 3, 6", "1, 2, 6"]),
        # Constructor arguments.
        (f"{L}-dropout-above-1", lambda lib, L=L: getattr(lib, L)(4, 6, 2, dropout=1.5), ["dropout", "[0, 1]"]),
        (f"{L}-dropout-negative", lambda lib, L=L: getattr(lib, L)(4, 6, 2, dropout=-0.1), ["dropout", "[0, 1]"]),
        (f"{L}-dropout-bool", lambda lib, L=L: getattr(lib, L)(4, 6, 2, dropout=True), ["dropout", "[0, 1]"]),
        (f"{L}-dropout-str", lambda lib, L=L: getattr(lib, L)(4, 6, 2, dropout="0.5"), ["dropout", "[0, 1]"]),
        (f"{L}-hidden-size-float", lambda lib, L=L: getattr(lib, L)(4, 6.0), ["hidden_size", "int", "float"]),
        (f"{L}-hidden-size-zero", lambda lib, L=L: getattr(lib, L)(4, 0), ["hidden_size", "greater than zero"]),
        (f"{L}-input-size-zero", lambda lib, L=L: getattr(lib, L)(0, 6), ["input_size", "greater than zero"]),
        (f"{L}-input-size-float", lambda lib, L=L: getattr(lib, L)(4.0, 6), ["input_size", "int", "float"]),
        (f"{L}-num-layers-zero", lambda lib, L=L: getattr(lib, L)(4, 6, 0), ["num_layers", "greater than zero"]),
        (f"{L}-bias-not-bool", lambda lib, L=L: getattr(lib, L)(4, 6, bias=1), ["bias", "bool", "int"]),
        (f"{L}-batch-first-not-bool", lambda lib, L=L: getattr(lib, L)(4, 6, batch_first="yes"),
         ["batch_first", "bool", "str"]),
    ]
LAYER_CASES += [
    ("LSTM-c0-batch", lambda lib: lib.LSTM(4, 6)(x3d(), (torch.randn(1, 3, 6), torch.randn(1, 2, 6))),
     ["hidden[1]", "1, 3, 6", "1, 2, 6"]),
    ("LSTM-c0-hidden", lambda lib: lib.LSTM(4, 6)(x3d(), (torch.randn(1, 3, 6), torch.randn(1, 3, 5))),
     ["hidden[1]", "1, 3, 6", "1, 3, 5"]),
    ("LSTM-h0-hidden", lambda lib: lib.LSTM(4, 6)(x3d(), (torch.randn(1, 3, 5), torch.randn(1, 3, 6))),
     ["hidden[0]", "1, 3, 6", "1, 3, 5"]),
    ("LSTM-h0-is-not-projected", lambda lib: lib.LSTM(4, 6, proj_size=2)(
        x3d(), (torch.randn(1, 3, 6), torch.randn(1, 3, 6))), ["hidden[0]", "1, 3, 2", "1, 3, 6"]),
    ("LSTM-c0-is-projected", lambda lib: lib.LSTM(4, 6, proj_size=2)(
        x3d(), (torch.randn(1, 3, 2), torch.randn(1, 3, 2))), ["hidden[1]", "1, 3, 6", "1, 3, 2"]),
    ("LSTM-c0-rank-only", lambda lib: lib.LSTM(4, 6)(x3d(), (torch.randn(1, 3, 6), torch.randn(3, 6))),
     ["3-D", "2-D"]),
    ("LSTM-proj-equals-hidden", lambda lib: lib.LSTM(4, 6, proj_size=6), ["proj_size", "hidden_size"]),
    ("LSTM-proj-above-hidden", lambda lib: lib.LSTM(4, 6, proj_size=9), ["proj_size", "hidden_size"]),
    ("LSTM-proj-negative", lambda lib: lib.LSTM(4, 6, proj_size=-1), ["proj_size"]),
    ("GRU-proj", lambda lib: lib.GRU(4, 6, proj_size=2), ["proj_size", "LSTM"]),
    ("RNN-proj", lambda lib: lib.RNN(4, 6, proj_size=2), ["proj_size", "LSTM"]),
    ("RNN-unknown-nonlinearity", lambda lib: lib.RNN(4, 6, nonlinearity="sigmoid"), ["sigmoid", "tanh", "relu"]),
    ("RNN-unknown-nonlinearity-positional", lambda lib: lib.RNN(4, 6, 1, "gelu"), ["gelu", "tanh", "relu"]),
]

CELL_CASES = []
for C in CELLS:
    CELL_CASES += [
        (f"{C}-input-3d", lambda lib, C=C: getattr(lib, C)(4, 6)(torch.randn(2, 3, 4)), ["1D or 2D", "3D"]),
        (f"{C}-input-0d", lambda lib, C=C: getattr(lib, C)(4, 6)(torch.tensor(1.0)), ["1D or 2D", "0D"]),
        (f"{C}-hx-3d", lambda lib, C=C: getattr(lib, C)(4, 6)(torch.randn(3, 4), hidden_for(C, torch.randn(1, 3, 6))),
         ["1D or 2D", "3D"]),
        (f"{C}-input-size", lambda lib, C=C: getattr(lib, C)(7, 6)(torch.randn(3, 4)), ["7", "4"]),
        (f"{C}-input-size-unbatched", lambda lib, C=C: getattr(lib, C)(7, 6)(torch.randn(4)), ["7", "4"]),
        (f"{C}-batch", lambda lib, C=C: getattr(lib, C)(4, 6)(torch.randn(9, 4), hidden_for(C, torch.randn(8, 6))),
         ["9", "8"]),
        (f"{C}-hidden-size", lambda lib, C=C: getattr(lib, C)(4, 6)(torch.randn(3, 4), hidden_for(C, torch.randn(3, 5))),
         ["6", "5"]),
    ]
CELL_CASES += [
    ("LSTMCell-cx-batch", lambda lib: lib.LSTMCell(4, 6)(torch.randn(9, 4), (torch.randn(9, 6), torch.randn(8, 6))),
     ["hidden1", "9", "8"]),
    ("LSTMCell-cx-hidden", lambda lib: lib.LSTMCell(4, 6)(torch.randn(3, 4), (torch.randn(3, 6), torch.randn(3, 5))),
     ["hidden1", "6", "5"]),
    ("RNNCell-unknown-nonlinearity", lambda lib: lib.RNNCell(4, 6, nonlinearity="gelu")(torch.randn(3, 4)),
     ["gelu"]),
]


def raised_by(call, lib):
    with pytest.raises(Exception) as info:
        call(lib)
    return info.value


@pytest.mark.parametrize("call,tokens", [pytest.param(c, t, id=i) for i, c, t in LAYER_CASES + CELL_CASES])
def test_same_exception_as_nn(call, tokens):
    ref_error, our_error = raised_by(call, nn), raised_by(call, fused_rnn)
    assert type(our_error) is type(ref_error), f"nn raised {ref_error!r}, fused_rnn raised {our_error!r}"
    for token in tokens:
        assert token in str(our_error), f"{token!r} missing from {our_error}"


# torch.nn raises internal errors here (e.g. "get_mkldnn_dtype: unsupported data type"); fused_rnn
# must raise a RuntimeError that names both dtypes.
DTYPE_CASES = {
    "LSTM-h0": lambda: fused_rnn.LSTM(4, 6)(x3d(), (torch.randn(1, 3, 6, dtype=torch.float64), torch.randn(1, 3, 6))),
    "LSTM-c0": lambda: fused_rnn.LSTM(4, 6)(x3d(), (torch.randn(1, 3, 6), torch.randn(1, 3, 6, dtype=torch.float64))),
    "GRU-h0": lambda: fused_rnn.GRU(4, 6)(x3d(), torch.randn(1, 3, 6, dtype=torch.float64)),
    "RNN-h0": lambda: fused_rnn.RNN(4, 6)(x3d(), torch.randn(1, 3, 6, dtype=torch.float64)),
    "LSTM-h0-packed": lambda: fused_rnn.LSTM(4, 6)(
        pack_padded_sequence(x3d(), [5, 3, 2]), (torch.randn(1, 3, 6, dtype=torch.float64), torch.randn(1, 3, 6))),
    "LSTMCell-input": lambda: fused_rnn.LSTMCell(4, 6)(torch.randn(3, 4, dtype=torch.float64)),
    "GRUCell-input": lambda: fused_rnn.GRUCell(4, 6)(torch.randn(3, 4, dtype=torch.float64)),
    "RNNCell-input": lambda: fused_rnn.RNNCell(4, 6)(torch.randn(3, 4, dtype=torch.float64)),
    "LSTMCell-hx": lambda: fused_rnn.LSTMCell(4, 6)(
        torch.randn(3, 4), (torch.randn(3, 6), torch.randn(3, 6, dtype=torch.float64))),
    "GRUCell-hx": lambda: fused_rnn.GRUCell(4, 6)(torch.randn(3, 4), torch.randn(3, 6, dtype=torch.float64)),
    "RNNCell-hx": lambda: fused_rnn.RNNCell(4, 6)(torch.randn(3, 4), torch.randn(3, 6, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(DTYPE_CASES))
def test_state_or_cell_dtype_mismatch_names_both_dtypes(name):
    with pytest.raises(RuntimeError) as info:
        DTYPE_CASES[name]()
    assert "float32" in str(info.value) and "float64" in str(info.value), str(info.value)


# ---- warnings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAYERS)
def test_dropout_with_one_layer_warns_like_nn(name):
    messages = []
    for lib in (nn, fused_rnn):
        with pytest.warns(UserWarning) as record:
            getattr(lib, name)(4, 6, 1, dropout=0.3)
        messages.append([str(w.message) for w in record if issubclass(w.category, UserWarning)])
    assert messages[1] == messages[0]
    assert any("num_layers=1" in m and "dropout=0.3" in m for m in messages[1])


@pytest.mark.parametrize("name", LAYERS)
def test_dropout_with_two_layers_does_not_warn(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(fused_rnn, name)(4, 6, 2, dropout=0.3)


# ---- the raw ops (what the modules' checks leave to them) ----------------------------------------

@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_backward_op_refuses_tensors_of_another_dtype(kind):
    """A direct backward op call with a tensor of another dtype than the input (which the op would
    read with the wrong element size), the reserve included, raises a RuntimeError naming both
    dtypes instead of reading out of bounds."""
    args = list(layer_backward_op_args(kind, layer_op_tensors(kind, False, True, False, requires_grad=False), False))
    hx_at = 5 if kind == "LSTM" else 4
    for position in (0, hx_at):  # grad_output, hx
        bad = list(args)
        bad[position] = bad[position].float()
        with pytest.raises(RuntimeError, match=r"expected all tensors to be Double, got Float"):
            BACKWARD_OPS[kind](*bad)
    half = list(layer_backward_op_args(kind, layer_op_tensors(kind, False, True, False, requires_grad=False,
                                                              dtype=torch.bfloat16), False))
    reserve_at = 11 if kind == "LSTM" else 8
    half[reserve_at] = half[reserve_at].float()
    with pytest.raises(RuntimeError, match=r"expected all tensors to be BFloat16, got Float"):
        BACKWARD_OPS[kind](*half)
