"""Measuring one point (cell, shape, mode): build the reference torch.nn module and ours with the
same weights, check that ours matches, then time them interleaved and record peak memory.

Implementations, as named in the results: "reference" is torch.nn (cuDNN on CUDA, torch's
default path on CPU), "ours" is fused_rnn, "aten" (CUDA, --with-aten) is torch.nn with cuDNN off.
"""
import contextlib
import ctypes
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn

from .shapes import is_cell_module

# Elementwise |ours - ref| <= tol * (scale + |ref|), scale = max(1, max |ref|) per tensor, so the
# bound is relative for large values and absolute (tol) for outputs in [-1, 1].
TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


# FUSED_RNN_CUDA_KERNEL's values: how fused_rnn runs the recurrence on CUDA.
CUDA_KERNELS = ("auto", "persistent", "stepwise")


def make_fused_module(cell, **module_kwargs):
    """The implementation under test; measure_point() takes another factory in its place (tests)."""
    return getattr(fused_rnn, cell)(**module_kwargs)


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    repeats: int
    warmup: int
    seed: int
    with_aten: bool = False
    input_grad: bool = True  # training: the input needs a gradient (as a later layer's does), or not (data)


class PointFailure(Exception):
    """Ours (or the reference) could not be compared at this point; the message says why."""


def _attempt(who, fn):
    try:
        return fn()
    except PointFailure:
        raise
    except Exception as error:  # any failure to run is a failed point, reported with its cause
        raise PointFailure(f"{who} raised {type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _cudnn_disabled():
    """Only flips cudnn.enabled (cudnn.flags() would also reset the precision settings)."""
    previous = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = previous


class _Case:
    """One point's modules, input and the step that gets timed."""

    def __init__(self, cell, shape, mode, settings, make_ours):
        torch.manual_seed(settings.seed)
        kwargs = shape.module_kwargs(cell)
        self.step_by_step = is_cell_module(cell)
        reference = getattr(torch.nn, cell)(**kwargs)
        ours = _attempt("ours", lambda: make_ours(cell, **kwargs))
        _attempt("ours", lambda: ours.load_state_dict(reference.state_dict()))
        self.training = mode == "training"
        self.modules = {"reference": reference, "ours": ours}
        for module in self.modules.values():
            module.to(settings.device, settings.dtype).train(self.training)
        self.contenders = {"reference": (reference, contextlib.nullcontext), "ours": (ours, contextlib.nullcontext)}
        if settings.with_aten:
            self.contenders["aten"] = (reference, _cudnn_disabled)
        self.input, self.input_data = _make_input(shape, settings, self.training and settings.input_grad)
        directions = 2 if shape.bidirectional else 1
        features = (shape.proj_size or shape.hidden_size) * directions
        self.grad_output = torch.randn(*self.input_data.shape[:-1], features).to(settings.device, settings.dtype)

    def _run(self, module):
        """(output, final state) of a layer on the input; a *Cell module is called on each step in
        turn, carrying its state, and its output is the steps' hidden states stacked."""
        if not self.step_by_step:
            return module(self.input)
        state, hidden = None, []
        for x in self.input.unbind(0):
            state = module(x, state)
            hidden.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(hidden), state

    def step(self, name):
        module, context = self.contenders[name]
        with context():
            if not self.training:
                with torch.no_grad():
                    return self._run(module)
            output, state = self._run(module)
            (output.data if isinstance(output, PackedSequence) else output).backward(self.grad_output)
            return output, state

    def reset_grads(self):
        self.input_data.grad = None
        for module in self.modules.values():
            module.zero_grad(set_to_none=True)

    def _results(self, name):
        """Everything ours must reproduce: output, final states and, when training, all gradients."""
        self.reset_grads()
        output, state = _attempt(name, lambda: self.step(name))
        states = state if isinstance(state, tuple) else (state,)
        tensors = {"output": output.data if isinstance(output, PackedSequence) else output}
        tensors.update({f"state {k}": s for k, s in enumerate(states)})
        if self.training:
            if self.input_data.requires_grad:
                tensors["input grad"] = self.input_data.grad
            tensors.update({f"grad of {n}": p.grad for n, p in self.modules[name].named_parameters()})
        return tensors

    def check(self, tolerance):
        """Raises PointFailure unless ours matches the reference; returns the largest |difference|
        and, on CUDA, how ours ran its recurrences (cuda_path)."""
        expected = self._results("reference")
        before = fused_rnn.cuda_recurrence_counts()
        actual = self._results("ours")
        path = cuda_path(before, fused_rnn.cuda_recurrence_counts()) if self.input_data.is_cuda else None
        largest = 0.0
        for key, want in expected.items():
            got = actual.get(key)
            if got is None or got.shape != want.shape:
                raise PointFailure(f"ours has no {key} matching the reference's {tuple(want.shape)}")
            want, got = want.double(), got.double()
            difference = (got - want).abs()
            largest = max(largest, difference.max().item())
            bound = tolerance * (max(1.0, want.abs().max().item()) + want.abs())
            if not bool((difference <= bound).all()):  # also catches NaN
                raise PointFailure(f"ours differs from the reference in {key}: max |difference| "
                                   f"{difference.max().item():.3g} exceeds tolerance {tolerance:g}")
        return largest, path

    def time(self, repeats, warmup, device):
        """Milliseconds per call for each contender, alternating the order every repetition."""
        names = list(self.contenders)
        samples = {name: [] for name in names}
        for repetition in range(warmup + repeats):
            for name in names if repetition % 2 == 0 else names[::-1]:
                self.reset_grads()
                elapsed = _elapsed_ms(lambda: self.step(name), device)
                if repetition >= warmup:
                    samples[name].append(elapsed)
        return samples

    def peak_memory(self, device):
        result = {}
        for name in self.contenders:
            self.reset_grads()
            result[name] = _peak_memory_bytes(lambda: self.step(name), device)
        return result


def cuda_path(before, after):
    """How a call ran its recurrences, from fused_rnn.cuda_recurrence_counts() before and after it:
    "persistent", "stepwise", or "mixed" (some layer directions each way)."""
    persistent = after["persistent_launches"] > before["persistent_launches"]
    stepwise = after["stepwise_steps"] > before["stepwise_steps"]
    return "mixed" if persistent and stepwise else "persistent" if persistent else "stepwise"


def _make_input(shape, settings, requires_grad):
    """Returns (what the module is called with, the leaf tensor holding its data)."""
    generator = torch.Generator().manual_seed(settings.seed)
    sample_dtype = torch.float64 if settings.dtype == torch.float64 else torch.float32
    padded = torch.randn(shape.seq_len, shape.batch, shape.input_size, generator=generator, dtype=sample_dtype)
    padded = padded.to(settings.device, settings.dtype)
    if not shape.packed:
        padded.requires_grad_(requires_grad)
        return padded, padded
    lengths = torch.randint(1, shape.seq_len + 1, (shape.batch,), generator=generator)
    lengths[0] = shape.seq_len
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    data = packed.data.detach().requires_grad_(requires_grad)
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), data


def _elapsed_ms(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# ---- peak memory ---------------------------------------------------------------------------

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@lru_cache(maxsize=None)
def _can_reset_rss_peak():
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field):
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_measure(device):
    """What peak_memory_bytes means on this device, for the results' environment block."""
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated() during one untimed call, minus "
                "torch.cuda.memory_allocated() before it (peak stats reset first)")
    if _can_reset_rss_peak():
        return ("increase of the process's resident-set high-water mark (VmHWM, reset through "
                "/proc/self/clear_refs) over VmRSS before one untimed call, after "
                "fused_rnn.empty_cache() and malloc_trim; "
                "approximate: includes allocator caching and page granularity")
    return "unavailable (needs a writable /proc/self/clear_refs)"


def _peak_memory_bytes(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _can_reset_rss_peak():
        return None
    # Memory kept from earlier calls would hide part of the peak: fused_rnn's cached blocks and
    # scratch buffers are freed, and glibc's freed heap handed back.
    fused_rnn.empty_cache()
    if _libc() is not None:
        _libc().malloc_trim(0)
    _CLEAR_REFS.write_text("5")
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


# ---- one point ---------------------------------------------------------------------------


def _timing_summary(samples_ms, seq_len):
    q1, median, q3 = np.percentile(samples_ms, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3),
            "min_ms": float(min(samples_ms)), "max_ms": float(max(samples_ms)),
            "us_per_step": float(median) * 1e3 / seq_len, "samples_ms": [float(s) for s in samples_ms]}


def measure_point(cell, shape, mode, settings, make_ours=make_fused_module):
    """One result point as documented in benchmarks.schema; never raises for a failing 'ours'."""
    tolerance = TOLERANCES[settings.dtype]
    point = {"cell": cell, "mode": mode, "shape": asdict(shape), "status": "ok", "failure": None,
             "max_abs_error": None, "tolerance": tolerance, "timings": {}, "ratio": None, "ratio_aten": None,
             "peak_memory_bytes": {}, "cuda_path": None}
    try:
        case = _attempt("setup", lambda: _Case(cell, shape, mode, settings, make_ours))
        point["max_abs_error"], point["cuda_path"] = _attempt("the check", lambda: case.check(tolerance))
        samples = _attempt("timing", lambda: case.time(settings.repeats, settings.warmup, settings.device))
        memory = _attempt("memory measurement", lambda: case.peak_memory(settings.device))
    except PointFailure as failure:
        point.update(status="failed", failure=str(failure))
        return point
    timings = {name: _timing_summary(values, shape.seq_len) for name, values in samples.items()}
    ours_median = timings["ours"]["median_ms"]
    point.update(timings=timings, peak_memory_bytes=memory, ratio=timings["reference"]["median_ms"] / ours_median)
    if "aten" in timings:
        point["ratio_aten"] = timings["aten"]["median_ms"] / ours_median
    return point
