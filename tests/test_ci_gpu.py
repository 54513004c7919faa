"""`.ci/gpu`, the one command that validates a GPU build, checked as far as a machine without a
GPU can: the script parses, refuses at once without a GPU (building nothing), and its sanitizer
workload (.ci/gpu_sanitize.py) covers every op, direction, input form and dtype, and runs."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu"


def load_sanitize_script():
    spec = importlib.util.spec_from_file_location("gpu_sanitize", ROOT / ".ci" / "gpu_sanitize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_parses_and_is_executable():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: .ci/gpu would run")
def test_refuses_without_a_gpu_and_builds_nothing(tmp_path):
    out = tmp_path / "out"
    began = time.monotonic()
    done = subprocess.run([str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert "no GPU to validate on" in done.stderr and "sees no CUDA GPU" in done.stderr
    assert "Nothing was built" in done.stderr and done.stdout == ""
    assert not out.exists() and time.monotonic() - began < 60


def test_usage():
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: .ci/gpu OUTDIR" in done.stderr


def test_sanitizer_cases_cover_every_op_direction_form_and_dtype():
    sanitize = load_sanitize_script()
    dtypes = ["float32", "float64", "float16", "bfloat16"]
    assert list(sanitize.DTYPES) == dtypes
    cases = sanitize.cases(dtypes)
    layers = {(c.kind, c.packed, c.dtype) for c in cases if c.kind in sanitize.LAYERS}
    assert layers == {(kind, packed, dtype) for kind in ("LSTM", "LSTM_PROJ", "GRU", "RNN_TANH", "RNN_RELU")
                      for packed in (False, True) for dtype in dtypes}
    assert all(c.directions == ("forward", "reverse") for c in cases if c.kind in sanitize.LAYERS)
    cells = {(c.kind, c.dtype) for c in cases if c.kind in sanitize.CELLS}
    assert cells == {(kind, dtype) for kind in ("LSTMCell", "GRUCell", "RNNCell_TANH", "RNNCell_RELU")
                     for dtype in dtypes}
    assert sanitize.LAYERS["LSTM_PROJ"][1]["proj_size"] > 0
    assert sanitize.LAYERS["RNN_RELU"][1]["nonlinearity"] == "relu"


def test_sanitizer_workload_runs(capsys):
    """On the CPU here: the same cases the sanitizers watch on the GPU."""
    assert load_sanitize_script().main(["--device", "cpu", "--dtypes", "float32,bfloat16"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "done: 28 cases on cpu"
