"""The GEMMs outside the time loop (the input projection x W_ih^T, the input gradient dgates W_ih) on
the CPU: where a call's rows go in one chunk, on panels laid out one at a time as each thread
multiplies them (from 16 rows for the projection, 128 for the input gradient); over several chunks,
on panels laid out once; below, on MKL (csrc/cpu/backend.cpp, dense_weight). Each way must give
torch.nn's outputs and gradients, with partial panels (69 and 92 gate columns, 19 input columns),
on one thread and on two (each with its own panel buffer); and a call in one chunk (which every
inference call of at most I rows is) must not copy W_ih, nor must the input gradient through a W_ih
beyond half the last-level cache, which is laid out on use a block of k at a time."""
import pytest
import torch

from benchmarks.measure import _can_reset_rss_peak, _peak_memory_bytes
from helpers import (assert_all_equal, assert_close_nested, assert_same_outputs_and_grads, leaf, make_kind_pair,
                     outputs_and_grads)

pytestmark = pytest.mark.usefixtures("torch_test_state")

INPUT, HIDDEN = 19, 23

# (steps, batch): 20 rows (projection on panels laid out on use, input gradient on MKL), 150 rows
# (both on use), and 60 x 64 rows, which inference runs in two chunks (panels laid out once) and
# whose backward takes its input gradient in chunks as well.
SHAPES = [(1, 20), (3, 50), (60, 64)]


# float32 weight gradients summed over 3840 rows differ from torch.nn's by more than the fixed
# float32 tolerance (each side's rounding), so the long call trains in float64 only.
TRAINING_CASES = [(shape, dtype) for shape in SHAPES for dtype in (torch.float64, torch.float32)
                  if dtype == torch.float64 or shape[0] * shape[1] < 1000]


@pytest.mark.parametrize("shape,dtype", TRAINING_CASES)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_training_matches_torch_nn(kind, shape, dtype):
    steps, batch = shape
    ref, ours = make_kind_pair(kind, INPUT, HIDDEN, bidirectional=True, dtype=dtype)
    leaves = {"input": leaf(steps, batch, INPUT, dtype=dtype)}
    assert_same_outputs_and_grads(ref, ours, leaves, lambda m: m(leaves["input"]), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps,batch", SHAPES)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_inference_matches_torch_nn(kind, steps, batch, dtype):
    ref, ours = make_kind_pair(kind, INPUT, HIDDEN, bidirectional=True, dtype=dtype)
    ref, ours = ref.eval(), ours.eval()
    x = torch.randn(steps, batch, INPUT, dtype=dtype)
    with torch.no_grad():
        assert_close_nested(ours(x), ref(x), dtype)


@pytest.mark.parametrize("steps,batch", SHAPES)
def test_two_threads_match_torch_nn(steps, batch):
    torch.set_num_threads(2)  # the fixture restores it
    ref, ours = make_kind_pair("GRU", INPUT, HIDDEN, dtype=torch.float64)
    leaves = {"input": leaf(steps, batch, INPUT)}
    assert_same_outputs_and_grads(ref, ours, leaves, lambda m: m(leaves["input"]), torch.float64)


# Inference calls whose input projection runs in one chunk (GRU, I=4096): 256 rows whose gate
# values fit in one chunk's buffer (H=128, 6 MiB of W_ih), and 512 rows that would take two (H=256,
# 12 MiB) but whose gate values are fewer than W_ih's weights (rows <= I), so they too go in one.
# With W_ih laid out on use, the call's peak memory is its output, gates and W_hh's panels (1-3
# MiB), not a copy of W_ih besides.
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
@pytest.mark.parametrize("hidden,steps", [(128, 4), (256, 8)])
def test_one_chunk_makes_no_copy_of_w_ih(hidden, steps):
    _, ours = make_kind_pair("GRU", 4096, hidden)
    ours.eval()
    x = torch.randn(steps, 64, 4096)
    w_ih_bytes = ours.weight_ih_l0.numel() * ours.weight_ih_l0.element_size()

    def peak():
        with torch.no_grad():
            return _peak_memory_bytes(lambda: ours(x), torch.device("cpu"))

    peak()  # warm
    assert min(peak() for _ in range(3)) < w_ih_bytes // 2


# Over several chunks, the input gradient dgates W_ih through a W_ih beyond half the last-level
# cache is laid out on use a block of k rows at a time (Panels::multiply_on_use_by_blocks; a
# last-level cache of one byte makes any W_ih such); else on panels laid out once. The same sums,
# added in the same order: the input gradient is bitwise the same in blocks of 16 rows of k (an
# L2 of one byte), in one block, and on panels laid out once. 300 steps of 8 rows: two chunks of
# gate gradients, and too few rows a step to fold the projection in, so that no other path
# depends on the last-level cache. Partial panels: 19 input columns, and k = 23, 69 or 92 split
# into blocks of 16.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_input_gradient_laid_out_on_use_by_blocks(kind, dtype, set_cache_sizes):
    torch.set_num_threads(2)  # the fixture restores it
    ref, ours = make_kind_pair(kind, INPUT, HIDDEN, dtype=dtype)
    x = leaf(300, 8, INPUT, dtype=dtype)

    def input_grad(l2, l3):
        set_cache_sizes(l2, l3)
        return outputs_and_grads(lambda: ours(x), [x])[1]

    laid_out_once = input_grad(1 << 40, 1 << 40)
    assert_all_equal(input_grad(1, 1), laid_out_once)
    assert_all_equal(input_grad(1 << 40, 1), laid_out_once)
    if dtype == torch.float64:  # float32 weight gradients over 2400 rows: see TRAINING_CASES
        set_cache_sizes(1, 1)
        assert_same_outputs_and_grads(ref, ours, {"input": x}, lambda m: m(x), dtype)


# The memory that saves: a GRU with 12 MiB of W_ih (I=4096, H=256), trained on 64 steps of 8 rows
# (the backward's gate gradients in two chunks), peaks about W_ih's size lower with W_ih beyond
# half the last-level cache (laid out on use) than within it (laid out once).
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
def test_input_gradient_on_use_makes_no_copy_of_w_ih(set_cache_sizes):
    _, ours = make_kind_pair("GRU", 4096, 256)
    x = leaf(64, 8, 4096, dtype=torch.float32)
    grad = torch.randn(64, 8, 256)
    w_ih_bytes = ours.weight_ih_l0.numel() * ours.weight_ih_l0.element_size()

    def peak(l3):
        set_cache_sizes(l3=l3)

        def step():
            x.grad = None
            ours.zero_grad(set_to_none=True)
            ours(x)[0].backward(grad)

        step()  # warm
        return min(_peak_memory_bytes(step, torch.device("cpu")) for _ in range(3))

    assert peak(1) < peak(1 << 40) - w_ih_bytes // 2
