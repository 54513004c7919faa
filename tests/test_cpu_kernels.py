"""The CPU kernels come in one module per instruction set (avx512, avx2, default); fused_rnn imports
the best one this CPU runs, and FUSED_RNN_CPU_KERNELS picks another. Every built module this CPU can
run is checked against torch.nn here, each in a fresh interpreter (a process registers one)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_rnn

# Instruction set -> torch CPU capabilities that run it, best first (as fused_rnn/__init__.py).
RUNS_ON = {"avx512": ("AVX512",), "avx2": ("AVX512", "AVX2"), "default": None}
BUILT = [name for name in RUNS_ON if importlib.util.find_spec(f"fused_rnn._cpu_{name}") is not None]
RUNNABLE = [name for name in BUILT
            if RUNS_ON[name] is None or torch.backends.cpu.get_cpu_capability() in RUNS_ON[name]]
TESTS = Path(__file__).parent

# Outputs and every gradient against torch.nn, float64 and float32, for each layer kind with two
# layers, both directions, h0 and packed input, and each cell.
PARITY = """
import sys, torch, fused_rnn
from helpers import (CELL_KINDS, LAYER_KINDS, INPUT_SIZE, assert_same_outputs_and_grads, layer_call, layer_leaves,
                     make_kind_pair)
assert fused_rnn.cpu_instruction_set() == sys.argv[1], fused_rnn.cpu_instruction_set()
torch.manual_seed(0)
for dtype in (torch.float64, torch.float32):
    for kind in LAYER_KINDS:
        for form in ("3d", "packed_unsorted"):
            ref, ours = make_kind_pair(kind, INPUT_SIZE, 10, num_layers=2, bidirectional=True, dtype=dtype)
            leaves = layer_leaves(kind, ours, form, True, dtype, steps=12)
            run = layer_call(kind, form)
            assert_same_outputs_and_grads(ref, ours, leaves, lambda m: run(m, leaves), dtype)
    for kind in CELL_KINDS:
        ref, ours = make_kind_pair(kind, INPUT_SIZE, 10, dtype=dtype)
        leaves = {"input": torch.randn(3, INPUT_SIZE, dtype=dtype, requires_grad=True)}
        assert_same_outputs_and_grads(ref, ours, leaves, lambda m: m(leaves["input"]), dtype)
print("ok")
"""


def run_with_kernels(name, code, *args):
    env = {**os.environ, "FUSED_RNN_CPU_KERNELS": name}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=TESTS, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_best_runnable_kernels_are_in_use():
    assert RUNNABLE, f"no CPU kernels this CPU runs among the built ones ({BUILT})"
    if "FUSED_RNN_CPU_KERNELS" not in os.environ:
        assert fused_rnn.cpu_instruction_set() == RUNNABLE[0]


@pytest.mark.parametrize("name", RUNNABLE)
def test_each_kernel_build_matches_nn(name):
    result = run_with_kernels(name, PARITY, name)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_an_unknown_kernel_name_is_refused():
    result = run_with_kernels("sse9", "import fused_rnn")
    assert result.returncode != 0
    assert "FUSED_RNN_CPU_KERNELS must be one of avx512, avx2, default, got 'sse9'" in result.stderr


@pytest.mark.skipif("avx512" not in BUILT, reason="the AVX-512 module is not built")
def test_kernels_the_cpu_cannot_run_are_refused():
    """torch's capability lowered to AVX2 (ATEN_CPU_CAPABILITY), as on a CPU without AVX-512:
    forcing the AVX-512 module is refused, and by default the AVX2 one loads."""
    code = "import fused_rnn; print(fused_rnn.cpu_instruction_set())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    forced = subprocess.run([sys.executable, "-c", code], env={**env, "FUSED_RNN_CPU_KERNELS": "avx512"},
                            capture_output=True, text=True, timeout=600)
    assert forced.returncode != 0
    assert "FUSED_RNN_CPU_KERNELS=avx512: that module was not built, or this CPU" in forced.stderr
    env.pop("FUSED_RNN_CPU_KERNELS", None)
    chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert chosen.returncode == 0 and chosen.stdout.strip() == ("avx2" if "avx2" in BUILT else "default")
