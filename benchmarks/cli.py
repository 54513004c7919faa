"""Command line of `python -m benchmarks`; see benchmarks/README.md."""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from tqdm import tqdm

from .measure import CUDA_KERNELS, Settings, make_fused_module, measure_point
from .report import environment, plot, point_label, print_report, summarize
from .schema import SCHEMA_VERSION, validate
from .shapes import CELLS, GRID_CELLS, GRIDS, LAYERS, MODES, custom_grid

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_REPEATS, DEFAULT_WARMUP = 15, 3
QUICK_REPEATS, QUICK_WARMUP = 8, 2
# Single steps take tens of microseconds, which scheduling noise moves by as much: more samples.
STEP_REPEATS, STEP_WARMUP = 200, 20
# Custom-shape defaults: the fastrnns configuration (input size None = the hidden size).
SHAPE_DEFAULTS = {"seq_len": [100], "batch": [64], "input_size": [None], "hidden": [512], "layers": [1],
                  "proj_size": [0], "bidirectional": False, "packed": False}


def _integer(minimum):
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _list_of(parse_one):
    def parse(text):
        try:
            return [parse_one(item) for item in text.split(",")]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r} ({error})")
    return parse


def _choice(choices):
    def parse(text):
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Times fused_rnn.LSTM/GRU/RNN and their *Cells against torch.nn with the same weights.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--cells", type=_list_of(_choice(CELLS)),
                        help="e.g. LSTM,GRU or GRUCell (default: LSTM,GRU,RNN; on the cells grid the *Cell modules, "
                             "called once a step)")
    parser.add_argument("--modes", type=_list_of(_choice(MODES)), default=list(MODES),
                        help="inference (no_grad, eval) and/or training (forward + backward)")
    parser.add_argument("--grid", choices=GRIDS, help="named shape grid (default: cpu or gpu, after --device)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the quick grid, {QUICK_REPEATS} repeats, {QUICK_WARMUP} warm-up: ~1 min on 2 CPU cores")
    shape = parser.add_argument_group("custom shapes", "every combination of the given comma-separated values "
                                      "replaces the grid; unset ones default to T=100 B=64 I=H H=512, one layer")
    shape.add_argument("-T", "--seq-len", type=_list_of(_integer(1)))
    shape.add_argument("-B", "--batch", type=_list_of(_integer(1)))
    shape.add_argument("--input-size", type=_list_of(_integer(1)), help="default: the hidden size")
    shape.add_argument("-H", "--hidden", type=_list_of(_integer(1)))
    shape.add_argument("--layers", type=_list_of(_integer(1)))
    shape.add_argument("--proj-size", type=_list_of(_integer(0)), help="LSTM only: other cells skip these shapes")
    shape.add_argument("--bidirectional", action="store_true")
    shape.add_argument("--packed", action="store_true", help="PackedSequence input with random lengths")
    parser.add_argument("--repeats", type=_integer(1),
                        help=f"timed repetitions (default {DEFAULT_REPEATS}; step grid {STEP_REPEATS})")
    parser.add_argument("--warmup", type=_integer(0),
                        help=f"untimed repetitions first (default {DEFAULT_WARMUP}; step grid {STEP_WARMUP})")
    parser.add_argument("--with-aten", action="store_true", help="CUDA: also time torch.nn with cuDNN disabled")
    parser.add_argument("--cuda-kernel", choices=CUDA_KERNELS,
                        help="CUDA: how fused_rnn runs the recurrence (FUSED_RNN_CUDA_KERNEL; default: as set, "
                             "else auto); each point records which path ran")
    parser.add_argument("--no-input-grad", dest="input_grad", action="store_false",
                        help="training: the input needs no gradient, as data fed to a first layer "
                             "(default: it does, as a later layer's input)")
    parser.add_argument("--threads", type=_integer(1), help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, help="directory for results.json and speedup.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the points that would run, then exit")
    return parser


def _resolve(args, parser):
    """(grid name, shapes, repeats, warmup) from the options, rejecting contradictory ones."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    if args.with_aten and args.device != "cuda":
        parser.error("--with-aten compares against cuDNN-less torch.nn and needs --device cuda")
    if args.cuda_kernel and args.device != "cuda":
        parser.error("--cuda-kernel chooses how fused_rnn runs on CUDA and needs --device cuda")
    if os.environ.get("FUSED_RNN_CUDA_KERNEL", "auto") not in CUDA_KERNELS + ("",) and not args.cuda_kernel:
        parser.error(f"FUSED_RNN_CUDA_KERNEL must be one of {', '.join(CUDA_KERNELS)}, "
                     f"got {os.environ['FUSED_RNN_CUDA_KERNEL']!r}")
    custom = any(getattr(args, name) not in (None, False) for name in SHAPE_DEFAULTS)
    if custom and (args.grid or args.quick):
        parser.error("shape options define their own grid; drop --grid/--quick")
    if args.quick and args.grid not in (None, "quick"):
        parser.error("--quick runs the quick grid; drop --grid")
    if custom:
        values = {name: getattr(args, name) or default for name, default in SHAPE_DEFAULTS.items()}
        shapes = custom_grid(values["seq_len"], values["batch"], values["input_size"], values["hidden"],
                             values["layers"], values["proj_size"], values["bidirectional"], values["packed"])
        grid = "custom"
    else:
        grid = "quick" if args.quick else args.grid or ("gpu" if args.device == "cuda" else "cpu")
        shapes = GRIDS[grid]()
    default_repeats, default_warmup = {"quick": (QUICK_REPEATS, QUICK_WARMUP),
                                       "step": (STEP_REPEATS, STEP_WARMUP)}.get(grid, (DEFAULT_REPEATS, DEFAULT_WARMUP))
    repeats = args.repeats or default_repeats
    warmup = args.warmup if args.warmup is not None else default_warmup
    return grid, shapes, repeats, warmup


def _compare_cudnn_without_tf32():
    """cuDNN RNNs may use TF32 for float32, which no float32 tolerance would accept; ask for IEEE."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None:
        rnn.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False


def _point_line(index, total, point):
    """One line per measured point, for logs: '[12/78] LSTM inference T100 B64 I512 H512: ref 9.81 ms,
    ours 8.02 ms, 1.22x'."""
    if point["status"] == "failed":
        outcome = f"FAILED: {point['failure']}"
    else:
        timings = point["timings"]
        outcome = (f"ref {timings['reference']['median_ms']:.3f} ms, ours {timings['ours']['median_ms']:.3f} ms, "
                   f"{point['ratio']:.2f}x" + (f", {point['cuda_path']}" if point.get("cuda_path") else ""))
    return f"[{index}/{total}] {point_label(point)}: {outcome}"


def main(argv=None, make_ours=make_fused_module):
    """Runs the benchmark; returns the exit status (1 if any point failed). `make_ours(cell, **kwargs)`
    builds the implementation under test (tests substitute a wrong one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    grid, shapes, repeats, warmup = _resolve(args, parser)
    args.cells = args.cells or list(GRID_CELLS.get(grid, LAYERS))
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and dtype == torch.float32:
        _compare_cudnn_without_tf32()

    plan = [(cell, shape, mode) for cell in args.cells for shape in shapes if shape.supports(cell)
            for mode in args.modes]
    skipped = sum(not shape.supports(cell) for cell in args.cells for shape in shapes)
    if skipped:
        print(f"note: {skipped} shape(s) skipped: proj_size is LSTM-only, and a *Cell module runs one layer, "
              "one direction, unpacked", file=sys.stderr)
    if args.list:
        for cell, shape, mode in plan:
            print(f"{cell:8} {mode:9} {shape.label()}")
        return 0

    if args.cuda_kernel:
        os.environ["FUSED_RNN_CUDA_KERNEL"] = args.cuda_kernel
    settings = Settings(device, dtype, repeats, warmup, args.seed, args.with_aten, args.input_grad)
    cuda_kernel = (os.environ.get("FUSED_RNN_CUDA_KERNEL") or "auto") if device.type == "cuda" else None
    result = {"schema_version": SCHEMA_VERSION, "environment": environment(device, dtype),
              "config": {"grid": grid, "cells": args.cells, "modes": args.modes, "repeats": repeats,
                         "warmup": warmup, "seed": args.seed, "with_aten": args.with_aten,
                         "input_grad": args.input_grad, "cuda_kernel": cuda_kernel},
              "points": []}
    # A progress bar on a terminal; elsewhere (a log file, a pipe) its carriage returns would pile
    # up, so one line per point instead.
    on_terminal = sys.stderr.isatty()
    with tqdm(plan, desc="benchmarking", unit="point", file=sys.stderr, dynamic_ncols=True,
              disable=not on_terminal) as progress:
        for index, (cell, shape, mode) in enumerate(progress, 1):
            progress.set_postfix_str(f"{cell} {mode} {shape.label()}")
            point = measure_point(cell, shape, mode, settings, make_ours)
            result["points"].append(point)
            if not on_terminal:
                print(_point_line(index, len(plan), point), file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["summary"] = summarize(result["points"])
    validate(result)

    console = Console(width=None if sys.stdout.isatty() else 160)
    print_report(result, console)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        console.print(f"results: {args.out / 'results.json'}")
        if not args.no_plot:
            if plot(result, args.out / "speedup.png"):
                console.print(f"plot: {args.out / 'speedup.png'}")
            else:
                console.print("no plot: these points contain no batch or hidden-size sweep")
    return 1 if result["summary"]["failed"] else 0
