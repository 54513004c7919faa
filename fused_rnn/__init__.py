"""fused_rnn: fused C++/CUDA kernels behind exact drop-ins for torch.nn recurrent layers.

    import fused_rnn
    lstm = fused_rnn.LSTM(input_size=32, hidden_size=64, num_layers=2)  # same API as nn.LSTM
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # registers torch.ops.fused_rnn.*
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
    _C.empty_cache()


def backends():
    """Which backends this build has compiled in, e.g. {"cpu": True, "cuda": False}."""
    return {"cpu": True, "cuda": bool(_C.with_cuda)}


__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "RNNBase", "RNNCellBase",
           "to_fused", "to_torch", "backends", "empty_cache", "__version__"]
