"""Steps of a single row (batch 1: streaming, small-batch inference) read W_hh where it lies, one dot
product per gate value (csrc/cpu/weight_rows.h), instead of the panels or MKL that larger batches
take. The sizes cover whole vectors of hidden units and of W_hh's columns and their tails (8 floats
or 4 doubles a vector with AVX2, 16 / 8 with AVX-512), including k below one vector (an LSTM
projected to 3), in every form a layer takes: both directions, two layers, initial states, packed
input of one sequence, a single step, training and inference."""
import pytest
import torch

from helpers import assert_close_nested, assert_same_outputs_and_grads, leaf, make_kind_pair

pytestmark = pytest.mark.usefixtures("torch_test_state")

INPUT = 7


def one_row_call(kind, hidden, steps, dtype, packed=False, proj_size=0, layers=4):
    """(leaves, call): input of `steps` steps of one row with initial states (of `layers` layers
    and directions), and a call of a module on it."""
    h_out = proj_size or hidden
    leaves = {"input": leaf(steps, 1, INPUT, dtype=dtype), "h0": leaf(layers, 1, h_out, dtype=dtype)}
    if kind == "LSTM":
        leaves["c0"] = leaf(layers, 1, hidden, dtype=dtype)
    state = (leaves["h0"], leaves["c0"]) if kind == "LSTM" else leaves["h0"]

    def call(module):
        x = leaves["input"]
        if packed:
            x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([steps]))
        return module(x, state)

    return leaves, call


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [1, 9])
@pytest.mark.parametrize("hidden", [5, 16, 37])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_one_row_matches_nn(kind, hidden, steps, dtype):
    ref, ours = make_kind_pair(kind, INPUT, hidden, num_layers=2, bidirectional=True, dtype=dtype)
    leaves, call = one_row_call(kind, hidden, steps, dtype)
    assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)
    with torch.no_grad():
        assert_close_nested(call(ours), call(ref), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,proj_size", [("LSTM", 3), ("LSTM", 0), ("GRU", 0)])
def test_one_packed_row_matches_nn(kind, proj_size, dtype):
    extra = {"proj_size": proj_size} if proj_size else {}
    ref, ours = make_kind_pair(kind, INPUT, 21, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    leaves, call = one_row_call(kind, 21, 6, dtype, packed=True, proj_size=proj_size)
    assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)


# The dot products add a row's products in another order than the panels (and MKL) do, so the
# results of one row alone differ in the last bits from those of the same row computed beside
# another: that tells that the row ran on the in-place kernel. Both match torch.nn.
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_one_row_runs_on_its_own_kernel(kind):
    ref, ours = make_kind_pair(kind, INPUT, 40, dtype=torch.float64)
    x = torch.randn(9, 2, INPUT, dtype=torch.float64)
    with torch.no_grad():
        alone, beside = ours(x[:, :1])[0], ours(x)[0][:, :1]
        expected = ref(x[:, :1])[0]
    assert not torch.equal(alone, beside)
    assert_close_nested(alone, expected, torch.float64)
    assert_close_nested(beside, expected, torch.float64)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_nan_in_the_state_of_one_row_propagates_like_nn(kind):
    ref, ours = make_kind_pair(kind, INPUT, 13)
    x = torch.randn(5, 1, INPUT)
    h0 = torch.zeros(1, 1, 13)
    h0[0, 0, 4] = float("nan")
    state = (h0, torch.zeros(1, 1, 13)) if kind == "LSTM" else h0
    with torch.no_grad():
        expected, actual = ref(x, state), ours(x, state)
    assert torch.isnan(actual[0]).any()
    assert_close_nested(actual, expected, torch.float32)


# Large enough that the threads split the blocks of hidden units between them (every thread
# reads its own part of W_hh at every step).
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_one_row_on_two_threads_matches_nn(kind):
    torch.set_num_threads(2)
    ref, ours = make_kind_pair(kind, INPUT, 300, dtype=torch.float64)
    leaves, call = one_row_call(kind, 300, 4, torch.float64, layers=1)
    assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64)
