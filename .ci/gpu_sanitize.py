"""Runs every fused_rnn op once on tiny tensors, for compute-sanitizer (.ci/gpu runs it under
memcheck, racecheck and synccheck): each layer op (LSTM with and without a projection, GRU, RNN
tanh and relu) over 2 stacked layers in both directions, packed and not, forward and backward in
training and forward in inference; each cell forward and backward; in float32, float64, float16
and bfloat16 (--dtypes picks some: racecheck and synccheck are slow, .ci/gpu gives them float32).

    python .ci/gpu_sanitize.py [--device cuda] [--dtypes float32,bfloat16] [--barriers grid,counter] [--list]

FUSED_RNN_CUDA_KERNEL chooses the recurrence's path as always (.ci/gpu watches the persistent
kernels with it set to persistent, float64 and the projected LSTM then running per step);
--barriers runs every case once per FUSED_RNN_CUDA_BARRIER value (the persistent kernels' barrier).
"""
import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fused_rnn
import fused_rnn  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Layer kinds: (module class, constructor options); every layer op and its variants.
LAYERS = {"LSTM": ("LSTM", {}), "LSTM_PROJ": ("LSTM", {"proj_size": 3}), "GRU": ("GRU", {}),
          "RNN_TANH": ("RNN", {"nonlinearity": "tanh"}), "RNN_RELU": ("RNN", {"nonlinearity": "relu"})}
CELLS = {"LSTMCell": ("LSTMCell", {}), "GRUCell": ("GRUCell", {}), "RNNCell_TANH": ("RNNCell", {}),
         "RNNCell_RELU": ("RNNCell", {"nonlinearity": "relu"})}
STEPS, BATCH, INPUT_SIZE, HIDDEN = 5, 3, 4, 6
LENGTHS = [3, 5, 2]  # packed: unsorted, so the module sorts and unsorts states too


class Case(NamedTuple):
    kind: str  # a LAYERS or CELLS key
    packed: bool  # layers only
    directions: tuple  # the op directions run: ("forward", "reverse") for layers (bidirectional)
    dtype: str


def cases(dtypes):
    """Every case for the given dtype names, layers then cells."""
    layers = [Case(kind, packed, ("forward", "reverse"), dtype)
              for dtype, kind, packed in itertools.product(dtypes, LAYERS, (False, True))]
    return layers + [Case(kind, False, ("forward",), dtype) for dtype, kind in itertools.product(dtypes, CELLS)]


def run(case, device):
    """Training forward and backward, then inference, of the case's module; returns a checksum."""
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    if case.kind in CELLS:
        class_name, options = CELLS[case.kind]
        module = getattr(fused_rnn, class_name)(INPUT_SIZE, HIDDEN, **options).to(device, dtype)
        x = torch.randn(BATCH, INPUT_SIZE).to(device, dtype)

        def forward(x):
            out = module(x)
            return out[0] if isinstance(out, tuple) else out
    else:
        class_name, options = LAYERS[case.kind]
        module = getattr(fused_rnn, class_name)(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True,
                                                **options).to(device, dtype)
        x = torch.randn(STEPS, BATCH, INPUT_SIZE).to(device, dtype)

        def forward(x):
            if case.packed:
                return module(pack_padded_sequence(x, LENGTHS, enforce_sorted=False))[0].data
            return module(x)[0]
    x.requires_grad_()
    forward(x).float().square().sum().backward()
    with torch.no_grad():
        checksum = forward(x).float().sum() + x.grad.float().sum()
    return checksum.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: " + ", ".join(DTYPES))
    parser.add_argument("--barriers", default="grid", help="comma-separated FUSED_RNN_CUDA_BARRIER values: grid, counter")
    parser.add_argument("--list", action="store_true", help="print the cases, run nothing")
    args = parser.parse_args(argv)
    barriers = args.barriers.split(",")
    if any(b not in ("grid", "counter") for b in barriers):
        parser.error(f"unknown barrier(s) in {args.barriers!r}; choose from grid, counter")
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    previous = os.environ.get("FUSED_RNN_CUDA_BARRIER")
    try:
        for barrier, case in itertools.product(barriers, cases(dtypes)):
            if args.list:
                print(f"{case.kind} {'packed' if case.packed else 'unpacked'} {'+'.join(case.directions)} "
                      f"{case.dtype} {barrier}")
                continue
            os.environ["FUSED_RNN_CUDA_BARRIER"] = barrier
            checksum = run(case, torch.device(args.device))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            print(f"{case.kind:12} {'packed' if case.packed else 'unpacked':8} {case.dtype:8} {barrier:7} "
                  f"checksum {checksum:.6g}", flush=True)
    finally:
        if previous is None:
            os.environ.pop("FUSED_RNN_CUDA_BARRIER", None)
        else:
            os.environ["FUSED_RNN_CUDA_BARRIER"] = previous
    if not args.list:
        print(f"done: {len(barriers) * len(cases(dtypes))} cases on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
