"""The benchmark suite (python -m benchmarks): the quick preset end to end, the results schema,
and the correctness guard refusing wrong implementations."""
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fused_rnn
from benchmarks import validate
from benchmarks.cli import main

ROOT = Path(__file__).resolve().parent.parent
# One tiny LSTM shape through the same code path as the grids.
TINY = ["-T", "6", "-B", "3", "-H", "8", "--cells", "LSTM", "--repeats", "1", "--warmup", "0", "--no-plot"]


def _run_tiny(tmp_path, make_ours=None):
    kwargs = {} if make_ours is None else {"make_ours": make_ours}
    status = main(TINY + ["--out", str(tmp_path)], **kwargs)
    return status, json.loads((tmp_path / "results.json").read_text())


def test_quick_preset(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--threads", "1",
               "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = validate(json.loads((tmp_path / "results.json").read_text()))
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert result["config"]["grid"] == "quick" and result["environment"]["num_threads"] == 1
    assert result["environment"]["cpu_instruction_sets"]["fused_rnn"] == fused_rnn.cpu_instruction_set()
    points = result["points"]
    assert {p["cell"] for p in points} == {"LSTM", "GRU", "RNN"}
    assert {p["mode"] for p in points} == {"inference", "training"}
    assert any(p["shape"]["packed"] for p in points) and any(p["shape"]["bidirectional"] for p in points)
    assert all(p["status"] == "ok" and p["ratio"] > 0 for p in points)
    assert all(len(p["timings"][impl]["samples_ms"]) == 2 for p in points for impl in ("reference", "ours"))
    assert "geometric mean ratio, training" in done.stdout


class _OffsetOutput(fused_rnn.LSTM):
    def forward(self, input, hx=None):
        output, state = super().forward(input, hx)
        return output + 1e-3, state


class _DoubledGradient(fused_rnn.LSTM):
    """Right forward, wrong backward: only the training check can see it."""

    def forward(self, input, hx=None):
        output, state = super().forward(input, hx)
        if output.requires_grad:
            output.register_hook(lambda grad: grad * 2)
        return output, state


class _Raising(fused_rnn.LSTM):
    def forward(self, input, hx=None):
        raise RuntimeError("kernel exploded")


@pytest.mark.parametrize("wrong, failing_modes, reason", [
    (_OffsetOutput, {"inference", "training"}, "differs from the reference in output"),
    (_DoubledGradient, {"training"}, "differs from the reference in input grad"),
    (_Raising, {"inference", "training"}, "ours raised RuntimeError: kernel exploded"),
])
def test_guard_refuses_wrong_implementation(tmp_path, wrong, failing_modes, reason):
    status, result = _run_tiny(tmp_path, make_ours=lambda cell, **kwargs: wrong(**kwargs))
    assert status == 1
    validate(result)
    by_mode = {point["mode"]: point for point in result["points"]}
    for mode, point in by_mode.items():
        if mode in failing_modes:
            assert point["status"] == "failed" and reason in point["failure"]
            assert point["ratio"] is None and point["timings"] == {} and point["peak_memory_bytes"] == {}
        else:
            assert point["status"] == "ok"
    assert result["summary"]["failed"] == len(failing_modes)


def test_validate_rejects_malformed_results(tmp_path):
    status, result = _run_tiny(tmp_path)
    assert status == 0
    validate(result)
    point = result["points"][0]
    assert point["max_abs_error"] <= point["tolerance"] and point["timings"]["ours"]["us_per_step"] > 0

    def broken(change):
        copied = copy.deepcopy(result)
        change(copied)
        return copied

    for bad in (broken(lambda r: r["environment"].pop("torch_version")),
                broken(lambda r: r["points"][0].update(status="failed")),  # failed yet timed
                broken(lambda r: r["points"][0]["shape"].update(batch="3")),
                broken(lambda r: r["points"][0]["timings"]["ours"].pop("median_ms")),
                broken(lambda r: r["summary"].update(failed=1))):
        with pytest.raises(ValueError):
            validate(bad)


def test_training_with_data_input(tmp_path):
    # --no-input-grad: the input needs no gradient; the guard still checks every parameter's.
    status = main(TINY + ["--no-input-grad", "--modes", "training", "--out", str(tmp_path)])
    result = validate(json.loads((tmp_path / "results.json").read_text()))
    assert status == 0 and result["config"]["input_grad"] is False and result["points"][0]["status"] == "ok"
    status = main(TINY + ["--no-input-grad", "--modes", "training", "--out", str(tmp_path)],
                  make_ours=lambda cell, **kwargs: _DoubledGradient(**kwargs))
    failure = json.loads((tmp_path / "results.json").read_text())["points"][0]["failure"]
    assert status == 1 and "differs from the reference in grad of" in failure


def test_step_grid_is_single_steps_with_more_repeats():
    from benchmarks.cli import STEP_REPEATS, STEP_WARMUP, _resolve, build_parser
    parser = build_parser()
    grid, shapes, repeats, warmup = _resolve(parser.parse_args(["--grid", "step", "--device", "cpu"]), parser)
    assert grid == "step" and len(shapes) == 9 and {shape.seq_len for shape in shapes} == {1}
    assert {(shape.batch, shape.hidden_size) for shape in shapes} == {(b, h) for b in (1, 16, 64) for h in (64, 256, 512)}
    assert (repeats, warmup) == (STEP_REPEATS, STEP_WARMUP) and repeats > 15
    explicit = parser.parse_args(["--grid", "step", "--device", "cpu", "--repeats", "3", "--warmup", "0"])
    assert _resolve(explicit, parser)[2:] == (3, 0)


def test_progress_is_one_line_per_point_off_a_terminal(tmp_path, capsys):
    """In a log (stderr not a terminal) a progress bar's carriage returns would pile up: one plain
    line per point instead, with its times and ratio, or why it failed."""
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 2
    for index, (line, mode) in enumerate(zip(progress, ("inference", "training")), 1):
        assert re.fullmatch(rf"\[{index}/2\] LSTM {mode} T6 B3 I8 H8: ref \d+\.\d{{3}} ms, ours \d+\.\d{{3}} ms, "
                            r"\d+\.\d\dx", line), line
    main(TINY + ["--modes", "training", "--out", str(tmp_path)], make_ours=lambda cell, **kwargs: _Raising(**kwargs))
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert failed == ["[1/1] LSTM training T6 B3 I8 H8: FAILED: ours raised RuntimeError: kernel exploded"]


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "benchmarking" in err and not re.search(r"^\[1/2\]", err, re.MULTILINE)


def test_gpu_small_grid_holds_the_persistent_kernels_targets():
    from benchmarks.shapes import GRIDS
    shapes = GRIDS["gpu-small"]()
    sizes = {(s.seq_len, s.batch, s.hidden_size) for s in shapes if s.input_size == s.hidden_size}
    assert {(t, b, h) for t in (100, 1024) for b in (1, 8, 16, 64) for h in (256, 512, 1024)} <= sizes
    assert (1024, 16, 768) in sizes and (1024, 64, 768) in sizes  # cuDNN's own persistent case
    assert len(shapes) == len(set(shapes)) == 26


def test_cpu_large_grid_is_the_hidden_sizes_beyond_the_caches():
    from benchmarks.shapes import GRIDS
    shapes = GRIDS["cpu-large"]()
    assert {(s.seq_len, s.batch, s.input_size, s.hidden_size) for s in shapes} == {
        (100, b, h, h) for b in (1, 16, 64) for h in (1024, 2048)}
    assert len(shapes) == 6 and all(s.num_layers == 1 and not s.bidirectional and not s.packed for s in shapes)


def test_cuda_path_of_a_call():
    from benchmarks.measure import cuda_path
    before = {"persistent_launches": 5, "stepwise_steps": 100}
    assert cuda_path(before, {"persistent_launches": 7, "stepwise_steps": 100}) == "persistent"
    assert cuda_path(before, {"persistent_launches": 5, "stepwise_steps": 140}) == "stepwise"
    assert cuda_path(before, {"persistent_launches": 6, "stepwise_steps": 101}) == "mixed"


def test_cpu_points_record_no_cuda_path(tmp_path):
    status, result = _run_tiny(tmp_path)
    assert status == 0 and result["config"]["cuda_kernel"] is None
    assert all(p["cuda_path"] is None for p in result["points"])
    broken = copy.deepcopy(result)
    broken["points"][0]["cuda_path"] = "fast"
    with pytest.raises(ValueError, match="cuda_path"):
        validate(broken)


def test_cuda_kernel_option_needs_cuda(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--cuda-kernel", "persistent"] + TINY)
    assert "--cuda-kernel chooses how fused_rnn runs on CUDA" in capsys.readouterr().err
    monkeypatch.setenv("FUSED_RNN_CUDA_KERNEL", "fastest")
    with pytest.raises(SystemExit):
        main(TINY)
    assert "FUSED_RNN_CUDA_KERNEL must be one of auto, persistent, stepwise, got 'fastest'" in capsys.readouterr().err


def test_plot_has_a_column_per_swept_axis(tmp_path, monkeypatch):
    """Only the axes the points sweep get columns: a sweep over sequence lengths alone plots
    speed-up against T (one column per mode), and no empty batch or hidden-size panels."""
    import matplotlib.pyplot as plt

    from benchmarks.report import plot
    points = [{"cell": "GRU", "mode": mode, "ratio": 1.0 + seq_len / 10,
               "shape": {"seq_len": seq_len, "batch": 4, "input_size": 8, "hidden_size": 8}}
              for seq_len in (1, 2, 4) for mode in ("inference", "training")]
    result = {"points": points, "config": {"cells": ["GRU"], "modes": ["inference", "training"]},
              "environment": {"device_name": "cpu", "dtype": "float32"}}
    grids = []
    real_subplots = plt.subplots

    def subplots(*args, **kwargs):
        figure, grid = real_subplots(*args, **kwargs)
        grids.append(grid)
        return figure, grid

    monkeypatch.setattr(plt, "subplots", subplots)
    assert plot(result, tmp_path / "speedup.png")
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert [ax.get_title() for ax in grids[0][0]] == ["GRU inference: vs sequence length",
                                                       "GRU training: vs sequence length"]
    assert [line.get_xdata().tolist() for line in grids[0][0][0].get_lines()[1:]] == [[1, 2, 4]]


CELL_TINY = ["-T", "5", "-B", "1,3", "-H", "8", "--cells", "LSTMCell,GRUCell,RNNCell", "--repeats", "1",
             "--warmup", "0", "--no-plot"]


class _StepWithoutState(fused_rnn.GRUCell):
    """Ignores the state it is given: right at the first step only, so only a loop over the steps
    that carries the state can tell."""

    def forward(self, input, hx=None):
        return super().forward(input)


def test_cell_modules_run_a_step_at_a_time(tmp_path):
    """--cells with the *Cell modules: each call of a point runs the cell once a step over seq_len,
    carrying the state, and the guard compares every step's hidden state, the final state and, in
    training, every gradient."""
    status = main(CELL_TINY + ["--out", str(tmp_path)])
    result = validate(json.loads((tmp_path / "results.json").read_text()))
    assert status == 0 and result["config"]["cells"] == ["LSTMCell", "GRUCell", "RNNCell"]
    points = result["points"]
    assert len(points) == 3 * 2 * 2 and all(p["status"] == "ok" and p["ratio"] > 0 for p in points)
    status = main(CELL_TINY + ["--cells", "GRUCell", "--out", str(tmp_path)],
                  make_ours=lambda cell, **kwargs: _StepWithoutState(**kwargs))
    failures = [p["failure"] for p in json.loads((tmp_path / "results.json").read_text())["points"]]
    assert status == 1 and len(failures) == 4
    assert all("differs from the reference in output" in failure for failure in failures)


def test_cells_grid_defaults_to_the_cell_modules_and_skips_what_cells_lack(capsys):
    from benchmarks.cli import _resolve, build_parser
    parser = build_parser()
    grid, shapes, _, _ = _resolve(parser.parse_args(["--grid", "cells", "--device", "cpu"]), parser)
    assert grid == "cells" and {shape.seq_len for shape in shapes} == {100}
    assert {(shape.batch, shape.hidden_size) for shape in shapes} == {(b, h) for b in (1, 16, 64) for h in (64, 256, 512)}
    assert main(["--grid", "cells", "--device", "cpu", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 9 * 3 * 2 and {line.split()[0] for line in listed} == {"LSTMCell", "GRUCell", "RNNCell"}
    # Layers stay the default elsewhere; a cell module skips stacked, bidirectional and packed shapes.
    assert main(["--quick", "--device", "cpu", "--list"]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()} == {"LSTM", "GRU", "RNN"}
    assert main(["--quick", "--device", "cpu", "--cells", "GRUCell", "--list"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 * 5 and "shape(s) skipped" in captured.err
