"""fused_rnn: fused C++/CUDA kernels behind exact drop-ins for torch.nn recurrent layers.

    import fused_rnn
    lstm = fused_rnn.LSTM(input_size=32, hidden_size=64, num_layers=2)  # same API as nn.LSTM
"""
import importlib
import os

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # registers torch.ops.fused_rnn.*

# The CPU kernels, one module per instruction set (setup.py), best first, each with the torch CPU
# capabilities that run it.
_CPU_KERNELS = {"avx512": ("AVX512",), "avx2": ("AVX512", "AVX2"), "default": None}


def _import_cpu_kernels():
    """Imports (and so registers) the CPU kernels: those FUSED_RNN_CPU_KERNELS names, else the best
    built module this CPU runs (as torch.backends.cpu.get_cpu_capability() reports it)."""
    capability = torch.backends.cpu.get_cpu_capability()
    forced = os.environ.get("FUSED_RNN_CPU_KERNELS")
    if forced and forced not in _CPU_KERNELS:
        raise ImportError(f"FUSED_RNN_CPU_KERNELS must be one of {', '.join(_CPU_KERNELS)}, got {forced!r}")
    for name, capabilities in _CPU_KERNELS.items():
        if (forced and name != forced) or (capabilities is not None and capability not in capabilities):
            continue
        try:
            return importlib.import_module(f"._cpu_{name}", __name__)
        except ModuleNotFoundError:
            continue
    if forced:
        raise ImportError(f"FUSED_RNN_CPU_KERNELS={forced}: that module was not built, or this CPU (torch reports "
                          f"{capability}) cannot run it")
    raise ImportError(f"fused_rnn has no CPU kernels this CPU runs (torch reports {capability}): it was built with "
                      "FUSED_RNN_SIMD set to an instruction set the CPU lacks; rebuild without it")


_cpu = _import_cpu_kernels()
from . import ops  # noqa: F401  (fake kernels and autograd for the ops)
from . import autocast  # noqa: F401  (CUDA autocast casts for the ops)
from ._version import __version__
from .convert import to_fused, to_torch
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, RNNBase, RNNCellBase


def empty_cache():
    """Frees the CPU memory fused_rnn keeps between calls to avoid page faults: the cache of
    blocks freed by earlier outputs and saved activations, and the calling thread's scratch
    buffers (weights laid out for the kernels). Like torch.cuda.empty_cache(), it only returns
    memory to the system; tensors in use are not affected."""
    _cpu.empty_cache()


def backends():
    """Which backends this build has compiled in, e.g. {"cpu": True, "cuda": False}."""
    return {"cpu": True, "cuda": bool(_C.with_cuda)}


def cuda_recurrence_counts():
    """How the CUDA backend has run recurrences in this process so far: {"persistent_launches": launches
    of the persistent kernels (each runs many steps of one layer direction), "stepwise_steps": steps run
    as a GEMM and a pointwise kernel each}. Zeros in a build without CUDA. FUSED_RNN_CUDA_KERNEL
    (auto, persistent, stepwise) chooses the path; see the README."""
    persistent, stepwise = _C.cuda_recurrence_counts() if _C.with_cuda else (0, 0)
    return {"persistent_launches": persistent, "stepwise_steps": stepwise}


def cpu_instruction_set():
    """The instruction set of the CPU kernels in use: "avx512", "avx2" or "default"."""
    return _cpu.instruction_set


__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "RNNBase", "RNNCellBase",
           "to_fused", "to_torch", "backends", "cpu_instruction_set", "cuda_recurrence_counts", "empty_cache",
           "__version__"]
