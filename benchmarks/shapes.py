"""Benchmark shapes and the named default grids."""
from dataclasses import dataclass, replace
from itertools import product

LAYERS = ("LSTM", "GRU", "RNN")
# The *Cell modules, timed as a streaming model runs them: one call per time step, in a Python loop
# over seq_len that carries the state.
CELL_MODULES = ("LSTMCell", "GRUCell", "RNNCell")
CELLS = LAYERS + CELL_MODULES
MODES = ("inference", "training")


def is_cell_module(cell):
    return cell in CELL_MODULES


@dataclass(frozen=True)
class Shape:
    """One layer configuration and input size. Input is time-major [seq_len, batch, input_size];
    `packed` feeds a PackedSequence whose lengths are random in [1, seq_len] (one is seq_len)."""

    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    packed: bool = False

    def supports(self, cell):
        """proj_size is LSTM-only; a *Cell module is one layer, one direction, fed a step at a time."""
        if is_cell_module(cell):
            return self.num_layers == 1 and not self.bidirectional and not self.proj_size and not self.packed
        return self.proj_size == 0 or cell == "LSTM"

    def module_kwargs(self, cell):
        kwargs = {"input_size": self.input_size, "hidden_size": self.hidden_size}
        if is_cell_module(cell):
            return kwargs
        kwargs.update(num_layers=self.num_layers, bidirectional=self.bidirectional)
        if self.proj_size:
            kwargs["proj_size"] = self.proj_size
        return kwargs

    def series(self, axis):
        """This shape with the field `axis` blanked out: the key of the sweep it belongs to. In a
        hidden-size sweep an input size equal to the hidden size is blanked too (it follows H)."""
        changes = {axis: None}
        if axis == "hidden_size" and self.input_size == self.hidden_size:
            changes["input_size"] = None
        return replace(self, **changes)

    def label(self):
        """Compact description, e.g. 'T100 B64 I512 H512 L2 bi packed'; blanked fields are left out
        (a blanked input size that follows the hidden size reads 'I=H')."""
        parts = [f"T{self.seq_len}" if self.seq_len is not None else "",
                 f"B{self.batch}" if self.batch is not None else "",
                 f"I{self.input_size}" if self.input_size is not None else "I=H",
                 f"H{self.hidden_size}" if self.hidden_size is not None else "",
                 f"L{self.num_layers}" if self.num_layers != 1 else "",
                 "bi" if self.bidirectional else "",
                 f"P{self.proj_size}" if self.proj_size else "",
                 "packed" if self.packed else ""]
        return " ".join(part for part in parts if part)


def _with_hidden(shape, hidden):
    return replace(shape, input_size=hidden, hidden_size=hidden)


def _variants(base):
    """Stacked, bidirectional, packed and all three together, at the base size."""
    return [replace(base, num_layers=2), replace(base, bidirectional=True), replace(base, packed=True),
            replace(base, num_layers=2, bidirectional=True, packed=True)]


def cpu_grid():
    """Batch × hidden sizes plus the layer/direction/packing variants; T is kept moderate so the
    whole grid takes roughly 10-20 minutes on 2 cores."""
    return _cpu_sizes(100) + _variants(Shape(seq_len=100, batch=16, input_size=256, hidden_size=256))


def cpu_large_grid():
    """Hidden sizes whose weights outgrow the caches (LSTM I=H=1024: W_ih and W_hh 16 MiB each in
    float32): T=100, B in {1, 16, 64} x H = I in {1024, 2048}."""
    return [Shape(seq_len=100, batch=batch, input_size=hidden, hidden_size=hidden)
            for batch, hidden in product((1, 16, 64), (1024, 2048))]


def gpu_grid():
    """The fastrnns default, batch and hidden sweeps around it, and a long sequence."""
    fastrnns = Shape(seq_len=100, batch=64, input_size=512, hidden_size=512)
    batches = [replace(fastrnns, batch=batch) for batch in (1, 8, 16, 32, 64, 128, 256)]
    hiddens = [_with_hidden(fastrnns, hidden) for hidden in (64, 128, 256, 512, 1024, 2048)]
    long_sequence = Shape(seq_len=1024, batch=16, input_size=768, hidden_size=768)
    return list(dict.fromkeys([fastrnns, *batches, *hiddens, long_sequence]))


def gpu_small_grid():
    """Where persistent kernels pay (one launch per layer call instead of one or more per step):
    B in {1, 8, 16, 64} x H = I in {256, 512, 1024} x T in {100, 1024}, and cuDNN's own persistent
    case, T=1024 B=16 I=H=768 (and its B=64 twin)."""
    sizes = [Shape(seq_len=seq_len, batch=batch, input_size=hidden, hidden_size=hidden)
             for seq_len, batch, hidden in product((100, 1024), (1, 8, 16, 64), (256, 512, 1024))]
    cudnn_persistent = [Shape(seq_len=1024, batch=batch, input_size=768, hidden_size=768) for batch in (16, 64)]
    return sizes + cudnn_persistent


def quick_grid():
    """Small versions of every feature (sweeps, variants, projection) for smoke runs and CI."""
    base = Shape(seq_len=32, batch=8, input_size=64, hidden_size=64)
    batches = [replace(base, batch=batch) for batch in (1, 8, 32)]
    hiddens = [_with_hidden(base, hidden) for hidden in (32, 128)]
    return batches + hiddens + _variants(base) + [replace(base, proj_size=32)]


def _cpu_sizes(seq_len):
    """The CPU grid's batch × hidden sizes (I = H) at `seq_len`."""
    return [Shape(seq_len=seq_len, batch=batch, input_size=hidden, hidden_size=hidden)
            for batch, hidden in product((1, 16, 64), (64, 256, 512))]


def step_grid():
    """Single time steps, as streaming inference (and training step by step) calls a layer: T=1
    over the batch × hidden sizes of the CPU grid, where per-call overhead counts most."""
    return _cpu_sizes(1)


def cell_grid():
    """The *Cell modules over 100 steps, a call each (streaming), at the CPU grid's batch × hidden sizes."""
    return _cpu_sizes(100)


GRIDS = {"cpu": cpu_grid, "cpu-large": cpu_large_grid, "gpu": gpu_grid, "gpu-small": gpu_small_grid, "quick": quick_grid,
         "step": step_grid, "cells": cell_grid}
# What --cells defaults to on a grid: the layers, or on the cells grid the *Cell modules.
GRID_CELLS = {"cells": CELL_MODULES}


def custom_grid(seq_lens, batches, input_sizes, hidden_sizes, layers, proj_sizes, bidirectional, packed):
    """Every combination of the given values; an input size of None means 'equal to the hidden size'."""
    return [Shape(seq_len, batch, input_size or hidden, hidden, num_layers, bidirectional, proj, packed)
            for seq_len, batch, input_size, hidden, num_layers, proj
            in product(seq_lens, batches, input_sizes, hidden_sizes, layers, proj_sizes)]
