"""Fixtures. The shared helper functions and constants live in helpers.py, a plain module that
test modules import by name."""
import pytest
import torch


@pytest.fixture
def torch_test_state():
    """Used by the test modules that name it in pytestmark: a fixed global seed, and one
    intra-op thread -- tiny shapes gain nothing from threads, and on a busy 2-core machine
    spinning OpenMP workers make them many times slower (test_parity has a dedicated
    multi-thread test). Thread count and default dtype are restored afterwards."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


@pytest.fixture
def set_cache_sizes():
    """fused_rnn._cpu.set_cache_sizes, for the cache sizes the CPU kernels' rules see; the detected
    sizes come back after the test."""
    import fused_rnn

    yield fused_rnn._cpu.set_cache_sizes
    fused_rnn._cpu.set_cache_sizes()
