"""torch.export.export of a model built on the fused LSTM and GRU: the exported program keeps the
fused ops, matches eager, and serves any batch size and sequence length it was exported for. And
TorchScript through torch.jit.trace."""
import pytest
import torch
from torch import nn
from torch.export import Dim

import fused_rnn
from helpers import assert_all_close


class Tagger(nn.Module):
    """Batch-first LSTM with projection -> bidirectional 2-layer GRU -> per-step scores."""

    def __init__(self, input_size=4):
        super().__init__()
        self.lstm = fused_rnn.LSTM(input_size, 6, proj_size=3, batch_first=True)
        self.gru = fused_rnn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        y, (lstm_h, lstm_c) = self.lstm(x)
        y, gru_h = self.gru(y)
        return self.head(y), lstm_h, lstm_c, gru_h


FLOAT32 = dict(atol=1e-6, rtol=1e-6)
DYNAMIC = ({0: Dim("batch", min=2, max=64), 1: Dim("steps", min=2, max=512)},)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Tagger().eval()


@pytest.fixture(scope="module")
def exported(model):
    return torch.export.export(model, (torch.randn(3, 5, 4),), dynamic_shapes=DYNAMIC)


def fused_ops_in(program):
    return {str(node.target) for node in program.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("fused_rnn.")}


def test_exported_program_calls_the_fused_ops(exported):
    assert fused_ops_in(exported) == {"fused_rnn.lstm_layer.default", "fused_rnn.gru_layer.default"}


def test_exported_program_matches_eager_at_the_export_shape(model, exported):
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        assert_all_close(list(exported.module()(x)), list(model(x)), **FLOAT32)


@pytest.mark.parametrize("batch, steps", [(2, 9), (7, 2), (16, 31)])
def test_exported_program_serves_new_batch_sizes_and_lengths(model, exported, batch, steps):
    x = torch.randn(batch, steps, 4)
    with torch.no_grad():
        assert_all_close(list(exported.module()(x)), list(model(x)), **FLOAT32)


def test_exported_program_survives_decompositions(model, exported):
    """run_decompositions (as done before lowering to a backend) leaves the fused ops opaque."""
    decomposed = exported.run_decompositions()
    assert fused_ops_in(decomposed) == fused_ops_in(exported)
    x = torch.randn(4, 6, 4)
    with torch.no_grad():
        assert_all_close(list(decomposed.module()(x)), list(model(x)), **FLOAT32)



def test_exported_program_round_trips_through_save_and_load(model, exported, tmp_path):
    path = tmp_path / "tagger.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
    assert fused_ops_in(loaded) == fused_ops_in(exported)
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        assert_all_close(list(loaded.module()(x)), list(model(x)), **FLOAT32)


# ---- TorchScript by tracing (torch.jit.script is not supported: the modules use Python beyond it) ----

@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_jit_trace_saves_loads_and_trains_like_eager(tmp_path):
    """Traced under no_grad (as for serving), saved and loaded: the same outputs as eager on other
    batch sizes and lengths, and the same gradients when trained through (the trace keeps the
    activations for backward whatever grad mode it was traced in)."""
    torch.manual_seed(0)
    model = Tagger()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 5, 4))
    torch.jit.save(traced, tmp_path / "tagger.pt")
    loaded = torch.jit.load(tmp_path / "tagger.pt")
    x = torch.randn(3, 9, 4, requires_grad=True)
    eager_out, loaded_out = model(x), loaded(x)
    assert_all_close(list(loaded_out), list(eager_out), **FLOAT32)
    eager_grads = torch.autograd.grad(eager_out[0].pow(2).sum(), [x, *model.parameters()])
    loaded_grads = torch.autograd.grad(loaded_out[0].pow(2).sum(), [x, *loaded.parameters()])
    assert_all_close(list(loaded_grads), list(eager_grads), **FLOAT32)
