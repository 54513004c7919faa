"""torch.compile(fullgraph=True) over every fused module: one graph, no breaks, same numbers as
eager for inference and training; torch.nn.LSTM, by contrast, is refused by Dynamo. With
dynamic=True new sequence lengths and batch sizes reuse the one compiled graph.

Inductor compiles C++ for every graph, which takes tens of seconds on a small machine, so the
shapes are tiny and each test compiles as little as it can."""
import pytest
import torch
from torch import nn

import fused_rnn
from helpers import assert_all_close, outputs_and_grads

FLOAT32 = dict(atol=1e-5, rtol=1e-5)


class RecurrentStack(nn.Module):
    """LSTM with projection -> bidirectional 2-layer GRU -> relu RNN over the whole sequence,
    then LSTMCell -> GRUCell -> relu RNNCell stepped in a Python loop over its first
    `cell_steps` time steps. Inputs are [T, B, 3]; `rnn` is the namespace the modules come
    from: fused_rnn or torch.nn."""

    def __init__(self, rnn=fused_rnn, cell_steps=2):
        super().__init__()
        self.cell_steps = cell_steps
        self.lstm = rnn.LSTM(3, 5, proj_size=3)
        self.gru = rnn.GRU(3, 4, num_layers=2, bidirectional=True)
        self.rnn = rnn.RNN(8, 4, nonlinearity="relu")
        self.lstm_cell = rnn.LSTMCell(4, 3)
        self.gru_cell = rnn.GRUCell(3, 3)
        self.rnn_cell = rnn.RNNCell(3, 2, nonlinearity="relu")

    def forward(self, x):
        y, (lstm_h, lstm_c) = self.lstm(x)
        y, gru_h = self.gru(y)
        y, rnn_h = self.rnn(y)
        lstm_state, gru_h_t, rnn_h_t = None, None, None
        steps = []
        for t in range(self.cell_steps):
            lstm_state = self.lstm_cell(y[t], lstm_state)
            gru_h_t = self.gru_cell(lstm_state[0], gru_h_t)
            rnn_h_t = self.rnn_cell(gru_h_t, rnn_h_t)
            steps.append(rnn_h_t)
        return y, lstm_h, lstm_c, gru_h, rnn_h, lstm_state[1], torch.stack(steps)


def make_stack(seed=0, **kwargs):
    torch.manual_seed(seed)
    return RecurrentStack(**kwargs)


def test_torch_nn_lstm_is_refused_under_fullgraph():
    """The motivation for the fused ops: Dynamo will not trace torch.nn.LSTM, so fullgraph fails."""
    compiled = torch.compile(nn.LSTM(3, 4), fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="LSTM"):
        compiled(torch.randn(2, 1, 3))


def test_fused_stack_matches_the_torch_nn_stack_in_eager():
    """So the compiled fused model below also computes what the torch.nn model computes."""
    reference, fused = make_stack(rnn=nn), make_stack(rnn=fused_rnn)
    x = torch.randn(3, 2, 3)
    with torch.no_grad():
        assert_all_close(list(fused(x)), list(reference(x)), **FLOAT32)


def test_fullgraph_inference_matches_eager():
    model = make_stack().eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 2, 3)
    with torch.no_grad():
        assert_all_close(list(compiled(x)), list(model(x)), **FLOAT32)


def assert_training_matches_eager(model, compiled, x):
    """`compiled` (torch.compile of `model`) gives eager's outputs and gradients with respect
    to x and every parameter."""
    wrt = [x, *model.parameters()]
    eager_outputs, eager_grads = outputs_and_grads(lambda: model(x), wrt)
    compiled_outputs, compiled_grads = outputs_and_grads(lambda: compiled(x), wrt)
    assert_all_close(compiled_outputs, eager_outputs, **FLOAT32)
    assert_all_close(compiled_grads, eager_grads, **FLOAT32)


def test_fullgraph_training_matches_eager():
    model = make_stack().train()
    assert_training_matches_eager(model, torch.compile(model, fullgraph=True), torch.randn(3, 2, 3, requires_grad=True))


class CountingBackend:
    """A torch.compile backend that runs graphs through AOTAutograd (so the fake kernels and
    the autograd registration are traced with symbolic shapes, as under inductor) and counts
    the graphs it compiled: one per compilation or recompilation of the model.

    A graph is counted once it has compiled, not on entry: with dynamic=True Dynamo traces the
    modules' float `dropout` attributes as symbols, AOTAutograd asks Dynamo to restart the
    trace with them specialised, and so the backend is entered twice for the one graph kept."""

    def __init__(self):
        self.graphs = 0
        self._aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, graph_module, example_inputs):
        compiled = self._aot_eager(graph_module, example_inputs)
        self.graphs += 1
        return compiled


def compile_and_run(model, dynamic, shapes):
    """Compiles `model` with a CountingBackend, checks forward and backward against eager for
    each (T, B) in `shapes`, and returns how many graphs were compiled."""
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    for steps, batch in shapes:
        assert_training_matches_eager(model, compiled, torch.randn(steps, batch, 3, requires_grad=True))
    return backend.graphs


# (T, B) for inputs [T, B, 3]. All sizes > 1, as Dynamo specialises sizes 0 and 1; and the first
# T, B and 3 are distinct: sizes equal when the graph is traced share one symbol, so compiling
# at T == 3 would tie T to input_size (fixed by the module) and recompile for every other T.
SHAPES = [(5, 2), (3, 4), (7, 3), (4, 6)]


def test_dynamic_compile_reuses_one_graph_for_new_lengths_and_batches():
    torch._dynamo.reset()
    assert compile_and_run(make_stack(), dynamic=True, shapes=SHAPES) == 1


def test_graph_counter_sees_a_recompile_for_each_new_static_shape():
    """Control for the test above: with dynamic=False (static shapes, automatic dynamic shapes
    off) every new (T, B) recompiles, and the counter sees each one."""
    torch._dynamo.reset()
    assert compile_and_run(make_stack(), dynamic=False, shapes=SHAPES) == len(SHAPES)


def test_fullgraph_training_under_cpu_autocast_matches_eager():
    """Inside torch.autocast("cpu", bfloat16) the modules' casts (modules.py) trace into the graph:
    the compiled stack gives eager's dtypes, outputs and gradients."""
    model = make_stack().train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 2, 3, requires_grad=True)
    wrt = [x, *model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_outputs, eager_grads = outputs_and_grads(lambda: model(x), wrt, loss_dtype=torch.float64)
        compiled_outputs, compiled_grads = outputs_and_grads(lambda: compiled(x), wrt, loss_dtype=torch.float64)
    assert [t.dtype for t in compiled_outputs] == [t.dtype for t in eager_outputs]
    assert torch.bfloat16 in [t.dtype for t in eager_outputs]
    assert_all_close(compiled_outputs, eager_outputs, atol=1e-2, rtol=1e-2)
    assert_all_close(compiled_grads, eager_grads, atol=1e-2, rtol=1e-2)
