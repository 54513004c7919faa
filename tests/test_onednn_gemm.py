"""Large float32 GEMMs on oneDNN (csrc/cpu/backend.cpp, onednn_gemm): by default where MKL lacks
AVX-512 (CPUs with AVX-512 that are not Intel's), anywhere oneDNN's float32 matmul runs once
fused_rnn._cpu.set_onednn_gemm(True). Those GEMMs (here the weight gradients' over 256 rows) must
give torch.nn's outputs and gradients as accurately as torch.nn does (against a float64 truth: two
float32 sums of 256 terms round apart by more than a fixed float32 tolerance), must run on oneDNN
where it is set (counted), and must not where torch asks oneDNN for a reduced float32 precision or
disables it."""
import copy
from pathlib import Path

import pytest
import torch

import fused_rnn
from helpers import (assert_at_least_as_accurate, assert_results_at_least_as_accurate, exact_outputs_and_grads, leaf,
                     make_kind_pair, named_outputs_and_grads, rounding_floor)

pytestmark = pytest.mark.usefixtures("torch_test_state")

# T x B = 256 rows: a weight gradient's GEMM (G H x H x 256, G gates) is at or above onednn_gemm's
# 2^22 multiply-adds for every cell; a small L2 sends it to the GEMM rather than to panels.
STEPS, BATCH, SIZE = 8, 32, 128


@pytest.fixture
def onednn():
    """fused_rnn._cpu.set_onednn_gemm(True), skipping where oneDNN's float32 matmul cannot run;
    the default comes back after the test."""
    fused_rnn._cpu.set_onednn_gemm(True)
    if not fused_rnn._cpu.onednn_gemm():
        fused_rnn._cpu.set_onednn_gemm()
        pytest.skip("oneDNN's float32 matmul needs AVX-512 BW/VL/DQ and a torch that exports it")
    yield fused_rnn._cpu.set_onednn_gemm
    fused_rnn._cpu.set_onednn_gemm()


def _cpu_flags():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    vendor = next((line.split(":")[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")
    return vendor, set(line.split(":")[1].split()) if ":" in line else set()


def _call(module, leaves):
    return module(leaves["input"])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_training_on_onednn_as_accurate_as_torch_nn(kind, onednn, set_cache_sizes):
    set_cache_sizes(1 << 12, 1 << 12)
    ref, ours = make_kind_pair(kind, SIZE, SIZE, num_layers=2, bidirectional=True, dtype=torch.float32)
    leaves = {"input": leaf(STEPS, BATCH, SIZE, dtype=torch.float32)}
    before = fused_rnn._cpu.onednn_gemm_calls()
    assert_at_least_as_accurate(ours, ref, copy.deepcopy(ref).double(), leaves, _call, rounding_floor(torch.float32))
    assert fused_rnn._cpu.onednn_gemm_calls() > before


def test_onednn_as_accurate_as_mkl_and_only_onednn_is_counted(onednn, set_cache_sizes):
    set_cache_sizes(1 << 12, 1 << 12)
    ref, ours = make_kind_pair("LSTM", SIZE, SIZE, proj_size=64, dtype=torch.float32)
    leaves = {"input": leaf(STEPS, BATCH, SIZE, dtype=torch.float32)}
    exact = exact_outputs_and_grads(copy.deepcopy(ref).double(), leaves, _call)
    results, counts = {}, {}
    for enabled in (False, True):
        onednn(enabled)
        before = fused_rnn._cpu.onednn_gemm_calls()
        results[enabled] = named_outputs_and_grads(ours, leaves, _call)
        counts[enabled] = fused_rnn._cpu.onednn_gemm_calls() - before
    assert counts[False] == 0 and counts[True] > 0
    assert_results_at_least_as_accurate(results[True], results[False], exact, rounding_floor(torch.float32))


@pytest.mark.parametrize("setting", ["fp32_precision bf16", "mkldnn disabled"])
def test_no_onednn_where_torch_reduces_its_precision_or_disables_it(setting, onednn, set_cache_sizes):
    set_cache_sizes(1 << 12, 1 << 12)
    ref, ours = make_kind_pair("GRU", SIZE, SIZE, dtype=torch.float32)
    leaves = {"input": leaf(STEPS, BATCH, SIZE, dtype=torch.float32)}
    exact = exact_outputs_and_grads(copy.deepcopy(ref).double(), leaves, _call)
    theirs = named_outputs_and_grads(ref, leaves, _call)  # in IEEE float32 (torch.nn's own matmuls follow the setting)
    precision = torch.backends.mkldnn.matmul.fp32_precision
    try:
        if setting == "fp32_precision bf16":
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
            context = torch.backends.mkldnn.flags(enabled=True)
        else:
            context = torch.backends.mkldnn.flags(enabled=False)
        with context:
            assert not fused_rnn._cpu.onednn_gemm()
            before = fused_rnn._cpu.onednn_gemm_calls()
            ours_there = named_outputs_and_grads(ours, leaves, _call)
            assert fused_rnn._cpu.onednn_gemm_calls() == before
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = precision
    # still IEEE float32: operands rounded to bfloat16 would be ~1e3 x the floor off
    assert_results_at_least_as_accurate(ours_there, theirs, exact, rounding_floor(torch.float32))
    assert fused_rnn._cpu.onednn_gemm()


def test_default_is_onednn_exactly_where_mkl_lacks_avx512():
    fused_rnn._cpu.set_onednn_gemm()
    vendor, flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to read the CPU's vendor and flags from")
    onednn_runs = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    assert fused_rnn._cpu.onednn_gemm() == (onednn_runs and vendor != "GenuineIntel")
