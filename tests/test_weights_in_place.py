"""Where the layout of a weight in panels would not pay, the steps read it where it lies
(csrc/cpu/weight_rows.h): steps of a single row (batch 1: streaming, small-batch inference), one dot
product per gate value forward and the rows of W_hh streamed backward; and calls of a few steps
over several rows (fewer than 128 rows in all: single steps of a batch), forward. The sizes cover
whole vectors of hidden units and of W_hh's columns and their tails (8 floats or 4 doubles a vector
with AVX2, 16 / 8 with AVX-512), including k below one vector (an LSTM projected to 3), in every form
a layer takes: both directions, two layers, initial states, packed input, a single step, training
and inference."""
import pytest
import torch

from benchmarks.measure import _can_reset_rss_peak, _peak_memory_bytes
from helpers import assert_close_nested, assert_same_outputs_and_grads, leaf, make_kind_pair

pytestmark = pytest.mark.usefixtures("torch_test_state")

INPUT = 7


def rows_call(kind, hidden, steps, dtype, rows=1, lengths=None, proj_size=0, layers=4, input_size=INPUT):
    """(leaves, call): input of `steps` steps of `rows` rows with initial states (of `layers`
    layers and directions), and a call of a module on it; with `lengths`, packed (sorted)."""
    h_out = proj_size or hidden
    leaves = {"input": leaf(steps, rows, input_size, dtype=dtype), "h0": leaf(layers, rows, h_out, dtype=dtype)}
    if kind == "LSTM":
        leaves["c0"] = leaf(layers, rows, hidden, dtype=dtype)
    state = (leaves["h0"], leaves["c0"]) if kind == "LSTM" else leaves["h0"]

    def call(module):
        x = leaves["input"]
        if lengths is not None:
            x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths))
        return module(x, state)

    return leaves, call


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [1, 9])
@pytest.mark.parametrize("hidden", [5, 16, 37])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_one_row_matches_nn(kind, hidden, steps, dtype):
    ref, ours = make_kind_pair(kind, INPUT, hidden, num_layers=2, bidirectional=True, dtype=dtype)
    leaves, call = rows_call(kind, hidden, steps, dtype)
    assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)
    with torch.no_grad():
        assert_close_nested(call(ours), call(ref), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,proj_size", [("LSTM", 3), ("LSTM", 0), ("GRU", 0)])
def test_one_packed_row_matches_nn(kind, proj_size, dtype):
    extra = {"proj_size": proj_size} if proj_size else {}
    ref, ours = make_kind_pair(kind, INPUT, 21, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    leaves, call = rows_call(kind, 21, 6, dtype, lengths=[6], proj_size=proj_size)
    assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)


# Several rows over a few steps (steps x rows < 128): W_hh (and LSTM's W_hr) read in place forward,
# with W_ih joined to W_hh where there are at most 4 steps and at most 64 rows in all.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows,steps", [(2, 7), (5, 3), (3, 4), (16, 1), (64, 1), (40, 2)])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_short_call_of_several_rows_matches_nn(kind, rows, steps, dtype):
    ref, ours = make_kind_pair(kind, INPUT, 37, num_layers=2, bidirectional=True, dtype=dtype)
    leaves, call = rows_call(kind, 37, steps, dtype, rows=rows)
    assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)
    with torch.no_grad():
        assert_close_nested(call(ours), call(ref), dtype)


# Packed: the rows still running shrink from step to step (each step's GEMM takes a prefix of rows).
# Calls of at most 4 steps and at most 64 rows in all fold the input projection into the in-place
# GEMM (LSTM, RNN).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lengths", [[5, 5, 4, 2, 2, 1], [3, 3, 2, 1, 1]])
@pytest.mark.parametrize("kind,proj_size", [("LSTM", 3), ("LSTM", 0), ("GRU", 0), ("RNN_TANH", 0)])
def test_short_packed_call_of_several_rows_matches_nn(kind, proj_size, lengths, dtype):
    extra = {"proj_size": proj_size} if proj_size else {}
    ref, ours = make_kind_pair(kind, INPUT, 21, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    leaves, call = rows_call(kind, 21, lengths[0], dtype, rows=len(lengths), lengths=lengths, proj_size=proj_size)
    assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)


# The dot products add a row's products in another order than the panels (and MKL) do, so the
# results of rows read in place differ in the last bits from those of the same rows in a call the
# weights are laid out for: that tells which kernel ran. A row alone is read in place at any length
# (beside another, for 64 steps, it is not); 16 rows for 1 step (16 rows in all) are, for 8 steps
# (128) they are not. And 64 rows for 1 step take W_ih into the same dot products, 65 do not, nor
# do 16 rows for 5 steps where 4 steps do (LSTM and RNN: GRU keeps its input gates apart). All
# match torch.nn.
@pytest.mark.parametrize("rows,steps,other_rows,other_steps",
                         [(1, 64, 2, 64), (16, 1, 16, 8), (64, 1, 65, 1), (16, 4, 16, 5)])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_rows_read_in_place_run_on_their_own_kernel(kind, rows, steps, other_rows, other_steps):
    if kind == "GRU" and (other_rows, other_steps) in ((65, 1), (16, 5)):
        pytest.skip("GRU's input projection is never folded into the recurrent GEMM")
    ref, ours = make_kind_pair(kind, INPUT, 40, dtype=torch.float64)
    x = torch.randn(other_steps, other_rows, INPUT, dtype=torch.float64)
    h0 = torch.randn(1, other_rows, 40, dtype=torch.float64)  # so that the first step multiplies W_hh

    def call(module, steps, rows):
        h = h0[:, :rows]
        return module(x[:steps, :rows], (h, torch.zeros_like(h)) if kind == "LSTM" else h)[0]

    with torch.no_grad():
        alone, expected = call(ours, steps, rows), call(ref, steps, rows)
        beside = call(ours, other_steps, other_rows)[:steps, :rows]
    assert not torch.equal(alone, beside)
    assert_close_nested(alone, expected, torch.float64)
    assert_close_nested(beside, expected, torch.float64)


# Rows of W_hh longer than one chunk of k (512 values with AVX2 and AVX-512 alike: 530 is one chunk,
# then 2 vectors and 2 values), rows in pairs, groups of 16 rows and an odd last row (67 = 4 x 16 +
# 3, W_ih apart; 35 = 16 + 16 + 3, W_ih joined); and W_ih joined with its own rows over a chunk too
# (5 rows x 3 steps, 600 inputs).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows,steps,input_size", [(67, 1, INPUT), (35, 1, INPUT), (5, 3, 600)])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_long_rows_in_place_match_nn(kind, rows, steps, input_size, dtype):
    ref, ours = make_kind_pair(kind, input_size, 530, bidirectional=True, dtype=dtype)
    leaves, call = rows_call(kind, 530, steps, dtype, rows=rows, layers=2, input_size=input_size)
    assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)


# Each row's dot products are summed in the same order whether it is multiplied beside another row
# (pairs) or alone (the odd last row of a group, or a batch of one row's), so the part of its
# outputs they make does not depend on its batch. Row 16 is the first of a pair among 35 rows, alone
# among 17. (The input is zero, so that an input projection run apart (GRU: on panels from 16 rows,
# on MKL below, in an order that may depend on the batch) gives exactly the biases.)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_rows_in_place_sum_in_the_same_order_in_any_batch(kind, dtype):
    _, ours = make_kind_pair(kind, INPUT, 530, dtype=dtype)
    x = torch.zeros(1, 35, INPUT, dtype=dtype)
    h0 = torch.randn(1, 35, 530, dtype=dtype)

    def call(rows):
        h = h0[:, :rows]
        return ours(x[:, :rows], (h, torch.zeros_like(h)) if kind == "LSTM" else h)[0]

    with torch.no_grad():
        assert torch.equal(call(35)[:, :17], call(17))
        assert torch.equal(call(35)[:, :2], call(2))


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
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_rows_in_place_on_two_threads_match_nn(kind, rows):
    torch.set_num_threads(2)
    ref, ours = make_kind_pair(kind, INPUT, 300, dtype=torch.float64)
    leaves, call = rows_call(kind, 300, 4, torch.float64, rows=rows, layers=1)
    assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64)


# A single step without an initial state that needs a gradient has no dL/dh_prev to compute, so
# its backward must not lay W_hh out (12 MiB for a GRU of H=1024; at 64 rows it would): its peak
# memory stays that far below the same step's with h0 requiring a gradient, which does.
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
def test_single_step_without_h0_grad_lays_no_w_hh_out():
    ref, ours = make_kind_pair("GRU", 64, 1024)
    x = torch.randn(1, 64, 64, requires_grad=True)
    h0 = torch.randn(1, 64, 1024, requires_grad=True)
    for h, leaves in ((None, {"input": x}), (h0, {"input": x, "h0": h0})):  # both right
        assert_same_outputs_and_grads(ref, ours, leaves, lambda m, h=h: m(x, h), torch.float32)

    def peak(h):
        return _peak_memory_bytes(lambda: ours(x, h)[0].sum().backward(), torch.device("cpu"))

    peak(None), peak(h0)  # warm
    assert min(peak(None) for _ in range(3)) + (8 << 20) < min(peak(h0) for _ in range(3))
