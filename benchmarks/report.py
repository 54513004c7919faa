"""Everything around the measurements: environment block, summary, rich table, plots."""
import math
import os
import platform
import subprocess
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import fused_rnn

from .measure import memory_measure
from .shapes import MODES, Shape


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args):
    repository = Path(fused_rnn.__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "-C", str(repository), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cudnn_rnn_fp32():
    if not torch.backends.cudnn.is_available():
        return None
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None:
        return rnn.fp32_precision
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def cpu_instruction_sets():
    """The vector instructions each side's CPU code runs with: torch's ATen kernels, fused_rnn's
    CPU module, and the caps set on oneDNN and MKL (which pick their own, up to those)."""
    return {"torch": torch.backends.cpu.get_cpu_capability(), "fused_rnn": fused_rnn.cpu_instruction_set(),
            "onednn_cap": os.environ.get("ONEDNN_MAX_CPU_ISA"), "mkl_cap": os.environ.get("MKL_ENABLE_INSTRUCTIONS")}


def environment(device, dtype):
    cuda = device.type == "cuda"
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no")
    gpu_name = torch.cuda.get_device_name(device) if cuda else None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "fused_rnn_version": fused_rnn.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": None if commit is None or changes is None else bool(changes),
        "device": device.type,
        "device_name": gpu_name if cuda else _cpu_model(),
        "cpu_model": _cpu_model(),
        "gpu_name": gpu_name,
        "cuda_version": torch.version.cuda if cuda else None,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "dtype": str(dtype).removeprefix("torch."),
        "num_threads": torch.get_num_threads(),
        "fused_rnn_backends": fused_rnn.backends(),
        "onednn_available": torch.backends.mkldnn.is_available(),
        "cpu_instruction_sets": cpu_instruction_sets(),
        "cudnn_rnn_fp32": _cudnn_rnn_fp32() if cuda else None,
        "timer": ("CUDA events around each call, device synchronised before it" if cuda
                  else "time.perf_counter around each call"),
        "memory_measure": memory_measure(device),
    }


def _geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(points):
    def geomeans(key):
        return {mode: _geomean([p[key] for p in points if p["mode"] == mode and p[key] is not None])
                for mode in MODES}

    rated = [index for index, point in enumerate(points) if point["ratio"] is not None]
    slowest = min(rated, key=lambda index: points[index]["ratio"], default=None)
    return {"points": len(points), "failed": sum(point["status"] == "failed" for point in points),
            "geomean_ratio": geomeans("ratio"), "geomean_ratio_aten": geomeans("ratio_aten"),
            "min_ratio": None if slowest is None else points[slowest]["ratio"], "min_ratio_point": slowest}


def point_label(point):
    return f"{point['cell']} {point['mode']} {Shape(**point['shape']).label()}"


# ---- console -------------------------------------------------------------------------------


def _ms(timing):
    return f"{timing['median_ms']:.3f} ({timing['q3_ms'] - timing['q1_ms']:.3f})"


def _ratio(value):
    if value is None:
        return ""
    return f"[{'green' if value >= 1 else 'red'}]{value:.2f}×[/]"


def _mebibytes(memory, names):
    values = [memory.get(name) for name in names]
    return " / ".join("?" if value is None else f"{value / 2**20:.1f}" for value in values)


def print_report(result, console: Console):
    points, summary = result["points"], result["summary"]
    with_aten = result["config"]["with_aten"]
    names = ["reference", "ours"] + (["aten"] if with_aten else [])
    data_input = "" if result["config"].get("input_grad", True) else ", training input without gradient"
    if result["config"].get("cuda_kernel"):
        data_input += f", FUSED_RNN_CUDA_KERNEL={result['config']['cuda_kernel']}"
    table = Table(title=f"fused_rnn vs torch.nn — {result['environment']['device_name']}, "
                        f"{result['environment']['dtype']}, {result['environment']['num_threads']} threads{data_input}")
    on_cuda = result["environment"]["device"] == "cuda"
    for header in ("cell", "mode", "shape", "ref ms (IQR)", "ours ms (IQR)", "ratio", "µs/step"):
        table.add_column(header, justify="left" if header in ("cell", "mode", "shape") else "right")
    if on_cuda:
        table.add_column("path")
    if with_aten:
        table.add_column("aten ms (IQR)", justify="right")
        table.add_column("ratio aten", justify="right")
    table.add_column("peak MiB " + "/".join("ref" if n == "reference" else n for n in names), justify="right")
    for point in points:
        row = [point["cell"], point["mode"], Shape(**point["shape"]).label()]
        timings = point["timings"]
        if point["status"] == "failed":
            row += ["", "", "[bold red]FAILED[/]", ""] + [""] * on_cuda + ["", ""] * with_aten + [""]
        else:
            row += [_ms(timings["reference"]), _ms(timings["ours"]), _ratio(point["ratio"]),
                    f"{timings['ours']['us_per_step']:.1f}"]
            if on_cuda:
                row.append(point.get("cuda_path") or "")
            if with_aten:
                row += [_ms(timings["aten"]), _ratio(point["ratio_aten"])]
            row.append(_mebibytes(point["peak_memory_bytes"], names))
        table.add_row(*row)
    console.print(table)

    for point in points:
        if point["status"] == "failed":
            console.print(f"[bold red]FAILED[/] {escape(point_label(point))}: {escape(point['failure'])}",
                          highlight=False)
    for mode, value in summary["geomean_ratio"].items():
        if value is not None:
            aten = summary["geomean_ratio_aten"][mode]
            console.print(f"geometric mean ratio, {mode}: {value:.3f}×"
                          + (f" (vs aten {aten:.3f}×)" if aten is not None else ""))
    if summary["min_ratio_point"] is not None:
        console.print(f"minimum ratio: {summary['min_ratio']:.3f}× at "
                      f"{point_label(points[summary['min_ratio_point']])}")
    console.print(f"{summary['points']} points, {summary['failed']} failed")


# ---- plots -------------------------------------------------------------------------------

_AXES = {"batch": "batch size", "hidden_size": "hidden size", "seq_len": "sequence length"}


def _sweeps(points, axis):
    """{(cell, mode): {series shape: [(x, ratio)]}} for series with at least two x values."""
    found = defaultdict(lambda: defaultdict(list))
    for point in points:
        if point["ratio"] is not None:
            shape = Shape(**point["shape"])
            found[point["cell"], point["mode"]][shape.series(axis)].append((getattr(shape, axis), point["ratio"]))
    return {panel: {key: sorted(xy) for key, xy in series.items() if len({x for x, _ in xy}) > 1}
            for panel, series in found.items()}


def plot(result, path):
    """Speed-up vs batch, hidden size and sequence length (those the points sweep), one row per cell,
    one column per (axis, mode). Returns False (and writes nothing) when the points contain no sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = {axis: _sweeps(result["points"], axis) for axis in _AXES}
    panels = {panel for by_panel in sweeps.values() for panel, series in by_panel.items() if series}
    if not panels:
        return False
    cells = [cell for cell in result["config"]["cells"] if any(c == cell for c, _ in panels)]
    swept = [axis for axis in _AXES if any(sweeps[axis].values())]
    columns = [(axis, mode) for axis in swept for mode in result["config"]["modes"]]
    figure, grid = plt.subplots(len(cells), len(columns), figsize=(4.2 * len(columns), 3.4 * len(cells)),
                                squeeze=False)
    for row, cell in enumerate(cells):
        for column, (axis, mode) in enumerate(columns):
            ax = grid[row][column]
            ax.set_title(f"{cell} {mode}: vs {_AXES[axis]}", fontsize=10)
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            series = sweeps[axis].get((cell, mode), {})
            for key, xy in series.items():
                xs, ratios = zip(*xy)
                ax.plot(xs, ratios, marker="o", label=key.label())
            ax.set_xscale("log", base=2)
            ticks = sorted({x for xy in series.values() for x, _ in xy})
            ax.set_xticks(ticks, [str(x) for x in ticks])
            ax.set_xlabel(_AXES[axis])
            ax.set_ylabel("speed-up (ref / ours)")
            if series:
                ax.legend(fontsize=7)
    environment = result["environment"]
    figure.suptitle(f"fused_rnn speed-up over torch.nn — {environment['device_name']}, {environment['dtype']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
