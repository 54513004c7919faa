"""W_hh read in place for steps of many rows (BroadcastRows, csrc/cpu/weight_rows.h): each step
transposes its rows of h_prev (and x_t where the input projection is folded in) into panels of 2 or
3 vectors of rows, and each value of W_hh is broadcast against them, so that no copy of W_hh is laid
out in panels. The CPU backend does so for a weight of a quarter of the last-level cache from 16
rows a step up to 47 (a folded [W_hh, W_ih] from two vectors of rows: 16 in AVX2, 32 in AVX-512),
and for one of half of it from 16, where the steps do not run in row groups
(CpuBackend::broadcasts); a step of fewer rows (packed input) reads it as calls of a few rows do.
fused_rnn._cpu.set_cache_sizes puts small layers on that path: a small L2 keeps the steps out of
row groups, a small L3 makes the weight "large"."""
import copy

import pytest
import torch

import fused_rnn
from benchmarks.measure import _can_reset_rss_peak, _peak_memory_bytes
from helpers import assert_at_least_as_accurate, assert_same_outputs_and_grads, make_kind_pair, rounding_floor
from test_weights_in_place import INPUT, rows_call

pytestmark = pytest.mark.usefixtures("torch_test_state")


def joined_bytes(kind, hidden, dtype):
    """Bytes of a first layer's [W_hh, W_ih] (INPUT inputs): twice that as the last-level cache
    folds the input projection into the steps and reads the weight in place."""
    gates = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[kind]
    return gates * hidden * (hidden + INPUT) * torch.empty((), dtype=dtype).element_size()


# Rows and the panels they make (AVX2 floats, 8 a vector): 16 one panel of 2 vectors, 19 one of 3
# (rows past 19 zero), 32 two of 2 (3 + 1 would leave one vector alone), 41 two of 3; 104 three of 3
# and two of 2, past the 4 panels a block of units takes at a time; 131 five of 3 and one of 2.
# 37 hidden units: a partial last block of units. Both directions, two layers, initial states; on
# two threads, which split the blocks of units. A tiny L3 hoists the input projection out of the
# steps (the GEMM then adds h_prev W_hh^T onto it, beta 1; GRU's hidden gates from 0); one of twice
# the first layer's [W_hh, W_ih] folds it in there for LSTM and GRU (W_ih joined along k, with the
# bias), the second layer's being larger. In float32, against a float64 run: the weights'
# gradients sum 2 x 3 x rows products, which torch.nn and fused_rnn round differently (with 104
# rows they differ by up to 2e-5 on gradients of ~40, both within 7e-7 of that scale of the truth).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", [16, 19, 32, 41, 104, 131])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("folded", [False, True], ids=["hoisted", "folded"])
def test_many_rows_in_place_match_nn(kind, rows, dtype, folded, set_cache_sizes):
    if folded and rows >= 48:
        pytest.skip("from 48 rows only a weight of half the last-level cache is read in place")
    torch.set_num_threads(2)
    set_cache_sizes(1 << 12, 2 * joined_bytes(kind, 37, dtype) if folded else 1 << 12)
    ref, ours = make_kind_pair(kind, INPUT, 37, num_layers=2, bidirectional=True, dtype=dtype)
    leaves, call = rows_call(kind, 37, 3, dtype, rows=rows)
    if dtype == torch.float64:
        return assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)
    exact = copy.deepcopy(ref).double()
    assert_at_least_as_accurate(ours, ref, exact, leaves, lambda module, leaves: rows_call_on(kind, module, leaves),
                                rounding_floor(dtype))


def rows_call_on(kind, module, leaves):
    """rows_call's call of `module` on `leaves` (its own or float64 copies of them)."""
    state = (leaves["h0"], leaves["c0"]) if kind == "LSTM" else leaves["h0"]
    return module(leaves["input"], state)


# Packed input: the rows of a step fall from 33 to 19 (so its panels change from step to step),
# then to 9, which read W_hh as calls of a few rows do.
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_many_packed_rows_in_place_match_nn(kind, set_cache_sizes):
    set_cache_sizes(1 << 12, 1 << 12)
    ref, ours = make_kind_pair(kind, INPUT, 37, num_layers=2, bidirectional=True, dtype=torch.float64)
    lengths = [6] * 9 + [4] * 10 + [2] * 14
    leaves, call = rows_call(kind, 37, 6, torch.float64, rows=len(lengths), lengths=lengths)
    assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64)


# Each value is summed exactly as the panels' kernel sums it: the same call on panels (in row
# groups, a large L2) and read in place (a small one) gives the same bits, folded or not. (A small
# RNN folds its input projection in only where its steps run in row groups: hoisted only.)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("folded", [False, True], ids=["hoisted", "folded"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_in_place_sums_as_the_panels_do(kind, folded, dtype, set_cache_sizes):
    if kind == "RNN_TANH" and folded:
        pytest.skip("a small RNN folds its input projection in only on panels in row groups")
    torch.set_num_threads(2)
    l3 = 2 * joined_bytes(kind, 37, dtype) if folded else 1 << 12
    _, ours = make_kind_pair(kind, INPUT, 37, dtype=dtype)
    x, h0 = torch.randn(5, 40, INPUT, dtype=dtype), torch.randn(1, 40, 37, dtype=dtype)
    state = (h0, torch.randn_like(h0)) if kind == "LSTM" else h0

    def call(l2):
        set_cache_sizes(l2, l3)
        with torch.no_grad():
            return ours(x, state)

    on_panels, in_place = call(1 << 22), call(1 << 12)
    torch.testing.assert_close(in_place, on_panels, rtol=0, atol=0)


# No copy of W_hh: a GRU of I=H=1024 (12 MiB of W_hh, 12 of W_ih) over 4 steps of 64 rows, with the
# last-level cache at 16 MiB (so W_hh takes half of it), peaks below W_hh's size (~7 MiB: the
# projected input and the outputs; 18 with W_hh laid out, as at 32 MiB); so does one over 20 steps
# of 16 rows with the cache at 32 MiB (a quarter): W_hh hoisted, read in place from one vector of
# rows (AVX-512), where W_ih is laid out.
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
@pytest.mark.parametrize("steps,rows,l3", [(4, 64, 1 << 24), (20, 16, 1 << 25)])
def test_many_rows_in_place_copy_no_weight(steps, rows, l3, set_cache_sizes):
    set_cache_sizes(l3=l3)
    ours = fused_rnn.GRU(1024, 1024)
    w_hh_bytes = ours.weight_hh_l0.numel() * 4
    x = torch.randn(steps, rows, 1024)

    def peak():
        with torch.no_grad():
            return _peak_memory_bytes(lambda: ours(x), torch.device("cpu"))

    peak()  # warm
    assert min(peak() for _ in range(3)) < w_hh_bytes
