"""The persistent CUDA kernels' plan and step loops on the CPU: tests/cpp/test_persistent.cpp
(compiled here with the system C++ compiler) checks the index math of csrc/cuda/persistent_plan.h
and runs csrc/cuda/persistent_steps.h's forward and backward step loops in an emulator of the
GPU's execution model, against a float64 reference, with every memory access checked for races
and bounds. Their GPU tests are tests/test_cuda.py's, run under FUSED_RNN_CUDA_KERNEL=persistent."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_plan_and_step_loops_on_the_cpu(tmp_path):
    binary = tmp_path / "test_persistent"
    subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-I", str(ROOT / "csrc"),
                    str(ROOT / "tests" / "cpp" / "test_persistent.cpp"), "-o", str(binary)], check=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert done.stdout.strip().endswith("0 failed"), done.stdout[-2000:]
