"""Layers whose weights outgrow the CPU's caches. From batches of 16 rows the CPU backend folds an
LSTM's (and a small RNN's) input projection into every step's GEMM while [W_hh, W_ih] fits in half
the last-level cache, and hoists it out of the steps, into GEMMs over chunks of steps, beyond
(CpuBackend::fold_input_projection). fused_rnn._cpu.set_cache_sizes makes small layers take the
path large ones take on the machine's caches."""
import os
from pathlib import Path

import pytest
import torch

import fused_rnn
from helpers import (assert_all_equal, assert_close_nested, assert_same_outputs_and_grads, leaf, make_kind_pair,
                     outputs_and_grads)
from test_parity import call_with_mixed_lengths

pytestmark = pytest.mark.usefixtures("torch_test_state")


def sysfs_cache_bytes(level):
    """The unified cache of `level` that cpu0 sees, per sysfs (None where it lists none)."""
    for entry in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        if int((entry / "level").read_text()) == level and (entry / "type").read_text().strip() == "Unified":
            size = (entry / "size").read_text().strip()
            return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]] if size[-1] in "KM" else int(size)
    return None


def sysconf_bytes(name):
    try:
        return max(os.sysconf(name), 0)
    except (ValueError, OSError):  # not known here
        return 0


L3_SHARE_PER_THREAD = 16 << 20  # caches.h, kL3SharePerThread


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_cache_sizes_are_the_machines(threads):
    """sysfs's sizes where it lists them (in a VM, sysconf may give the whole host's L3), else
    sysconf's; of the L3, at most 16 MiB a thread of the intra-op pool."""
    torch.set_num_threads(threads)  # (torch_test_state restores it)
    l3 = sysfs_cache_bytes(3) or sysconf_bytes("SC_LEVEL3_CACHE_SIZE")
    expected = (sysfs_cache_bytes(2) or sysconf_bytes("SC_LEVEL2_CACHE_SIZE") or 1 << 20,
                min(l3, threads * L3_SHARE_PER_THREAD))
    assert fused_rnn._cpu.cache_sizes() == expected


def test_cache_sizes_can_be_overridden(set_cache_sizes):
    detected = fused_rnn._cpu.cache_sizes()
    set_cache_sizes(1 << 16, 0)
    assert fused_rnn._cpu.cache_sizes() == (1 << 16, 0)
    set_cache_sizes(l3=1 << 21)
    assert fused_rnn._cpu.cache_sizes() == (detected[0], 1 << 21)
    set_cache_sizes()
    assert fused_rnn._cpu.cache_sizes() == detected


INPUT, HIDDEN, BATCH, STEPS = 8, 20, 17, 9  # 17 rows: a partial block of rows in the step GEMM


def joined_bytes(kind, dtype):
    """Bytes of [W_hh, W_ih] in the compute type: what must fit in half the last-level cache."""
    gates = {"LSTM": 4, "RNN_TANH": 1, "RNN_RELU": 1}[kind]
    return gates * HIDDEN * (HIDDEN + INPUT) * torch.empty((), dtype=dtype).element_size()


def results_on_cache(set_cache_sizes, l3, ours, x):
    """ours(x)'s outputs and its gradients for x and every parameter, the last-level cache set to l3 bytes."""
    set_cache_sizes(l3=l3)
    outputs, grads = outputs_and_grads(lambda: ours(x), [x, *ours.parameters()])
    return [*outputs, *grads]


# At the rule's boundary: with the last-level cache exactly twice [W_hh, W_ih] the projection is
# folded, with a byte less it is hoisted. The two paths add the same products in different orders,
# so their float64 results differ in the last bits (from the second step on, where h_prev is not 0):
# that tells which path ran. Both must match torch.nn, outputs and every gradient.
@pytest.mark.parametrize("kind", ["LSTM", "RNN_TANH"])
def test_projection_is_hoisted_where_the_joined_weights_outgrow_half_the_cache(kind, set_cache_sizes):
    ref, ours = make_kind_pair(kind, INPUT, HIDDEN, dtype=torch.float64)
    x = leaf(STEPS, BATCH, INPUT)
    fits = 2 * joined_bytes(kind, torch.float64)
    folded = results_on_cache(set_cache_sizes, fits, ours, x)
    hoisted = results_on_cache(set_cache_sizes, fits - 1, ours, x)
    assert_all_equal(folded, results_on_cache(set_cache_sizes, 1 << 40, ours, x))
    assert_all_equal(hoisted, results_on_cache(set_cache_sizes, 1, ours, x))
    assert not torch.equal(folded[0], hoisted[0])
    for l3 in (fits, fits - 1):
        set_cache_sizes(l3=l3)
        assert_same_outputs_and_grads(ref, ours, {"input": x}, lambda m: m(x), torch.float64)


# The hoisted path in every form a layer takes it in: both directions, two layers, packed input
# whose batch shrinks below 16 rows, initial states; training (the gates in the reserve) and
# inference (a chunk of steps at a time: 70 steps of 17 rows cross chunk borders).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", ["LSTM", "RNN_TANH", "RNN_RELU"])
def test_hoisted_projection_matches_nn(kind, form, dtype, set_cache_sizes):
    set_cache_sizes(l3=1)
    ref, ours = make_kind_pair(kind, INPUT, HIDDEN, num_layers=2, bidirectional=True, dtype=dtype)
    leaves = {"input": leaf(STEPS, BATCH, INPUT, dtype=dtype), "h0": leaf(4, BATCH, HIDDEN, dtype=dtype)}
    if kind == "LSTM":
        leaves["c0"] = leaf(4, BATCH, HIDDEN, dtype=dtype)
    state = (leaves["h0"], leaves["c0"]) if kind == "LSTM" else leaves["h0"]
    call = call_with_mixed_lengths(leaves["input"], form)  # calls its argument with the input in `form`
    assert_same_outputs_and_grads(ref, ours, leaves, lambda m: call(lambda x: m(x, state)), dtype)
    long_call = call_with_mixed_lengths(torch.randn(70, BATCH, INPUT, dtype=dtype), form)
    with torch.no_grad():
        assert_close_nested(long_call(ours), long_call(ref), dtype)


# Where a panel, the next and A's rows outgrow L2, each step's blocks of rows sweep a panel a range
# of its rows at a time (Panels::sweep_rows). With an L2 of one byte every panel of these 17-row
# products is swept 16 rows at a time: the forward's over k = HIDDEN (+ 40 inputs where the input
# is folded in, whose columns start inside the second range, and the third and fourth inside
# them), the backward's over k = gates x HIDDEN. The sums are the same, added in the same order, so the outputs and the gradients the
# panels compute (input, h0, c0) are bitwise those of whole panels; the weight gradients, which
# take MKL where L2 is small, match torch.nn. A last-level cache of one byte hoists the input
# projection and makes the panels stream (prefetching the next range); a large one folds an LSTM's.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind,l3", [("LSTM", 1 << 40), ("LSTM", 1), ("GRU", 1), ("RNN_TANH", 1)])
def test_sweeps_through_panels_change_no_sum(kind, l3, form, dtype, set_cache_sizes):
    ref, ours = make_kind_pair(kind, 40, HIDDEN, bidirectional=True, dtype=dtype)
    leaves = {"input": leaf(STEPS, BATCH, 40, dtype=dtype), "h0": leaf(2, BATCH, HIDDEN, dtype=dtype)}
    if kind == "LSTM":
        leaves["c0"] = leaf(2, BATCH, HIDDEN, dtype=dtype)
    state = (leaves["h0"], leaves["c0"]) if kind == "LSTM" else leaves["h0"]
    call = call_with_mixed_lengths(leaves["input"], form)
    run = lambda m: call(lambda x: m(x, state))  # noqa: E731

    def panel_results(l2):
        set_cache_sizes(l2, l3)
        outputs, grads = outputs_and_grads(lambda: run(ours), list(leaves.values()))
        return [*outputs, *grads]

    assert_all_equal(panel_results(1), panel_results(1 << 40))
    set_cache_sizes(1, l3)
    assert_same_outputs_and_grads(ref, ours, leaves, run, dtype)
