"""torch.export.export of a model built on the fused LSTM and GRU: the exported program keeps the
fused ops, matches eager, and serves any batch size and sequence length it was exported for. And
TorchScript through torch.jit.trace. And torch.onnx.export, with both exporters, which gives what it
gives for the same model on torch.nn: the same ONNX ops, outputs onnxruntime computes as eager does,
the same dynamic axes, the same failures."""
import ast
import collections
import functools
import io

import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from helpers import LAYER_KINDS, assert_all_close, assert_all_equal

# Tracing warns (TorchScript-based ONNX export, torch.jit.trace), as do that exporter, deprecated, and its LSTM/GRU
# export at batch sizes other than 1: for torch.nn as for fused_rnn.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning",
                                        "ignore:Exporting a model to ONNX with a batch_size other than 1")


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
    assert {"fused_rnn::lstm_layer", "fused_rnn::gru_layer"} <= {node.kind() for node in loaded.inlined_graph.nodes()}
    x = torch.randn(3, 9, 4, requires_grad=True)
    eager_out, loaded_out = model(x), loaded(x)
    assert_all_close(list(loaded_out), list(eager_out), **FLOAT32)
    eager_grads = torch.autograd.grad(eager_out[0].pow(2).sum(), [x, *model.parameters()])
    loaded_grads = torch.autograd.grad(loaded_out[0].pow(2).sum(), [x, *loaded.parameters()])
    assert_all_close(list(loaded_grads), list(eager_grads), **FLOAT32)


# ---- ONNX: torch.onnx.export, by the TorchScript-based exporter (dynamo=False) and by dynamo=True ------------
#
# While torch.onnx.export captures a model, fused_rnn's layers and cells run as their torch.nn twins on their own
# weights, so each exporter emits what it emits for torch.nn. Each model here is exported next to its torch.nn twin
# (fused_rnn.to_torch) and the two ONNX models are compared: op types (per submodule), graph input and output
# shapes, and what onnxruntime computes, which must also be what eager fused_rnn computes.

INPUT, HIDDEN, STEPS, BATCH = 3, 4, 2, 3
KIND_NAMES = {kind: kind.lower() for kind in LAYER_KINDS}  # submodule names in the models below
# The ONNX op each exporter emits for a layer of each kind: one per layer, both directions in one. None: the dynamo
# exporter has no translation of aten.rnn_tanh/rnn_relu and unrolls their steps into MatMul, Add and Tanh/Relu.
RECURRENT_OPS = {(kind, dynamo): {"LSTM": "LSTM", "GRU": "GRU"}.get(kind, None if dynamo else "RNN")
                 for kind in LAYER_KINDS for dynamo in (False, True)}
LOOPS = {"Loop", "Scan"}


class EveryConfiguration(nn.Module):
    """One layer kind (a LAYER_KINDS key) in every configuration the exports are checked in: one layer over a
    time-major batch from zero state, two bidirectional layers from a given state, batch-first without biases
    from a given state, and an unbatched sequence. Inputs x [T, B, I], h0 [4, B, H] and c0 [4, B, H] (LSTM only)."""

    def __init__(self, kind):
        super().__init__()
        class_name, options = LAYER_KINDS[kind]
        make = functools.partial(getattr(fused_rnn, class_name), INPUT, HIDDEN, **options)
        self.has_cell_state = kind == "LSTM"
        self.plain = make()
        self.stacked = make(num_layers=2, bidirectional=True)
        self.batch_first = make(batch_first=True, bias=False)

    def forward(self, x, h0, c0):
        def state(layers):
            return (h0[layers], c0[layers]) if self.has_cell_state else h0[layers]
        return (self.plain(x), self.stacked(x, state(slice(None))),
                self.batch_first(x.transpose(0, 1), state(slice(0, 1))), self.plain(x[:, 0]))


class EveryCell(nn.Module):
    """Every cell kind, with and without a given state, batched and unbatched, with and without biases. Inputs
    x [B, I], h [B, H], c [B, H]."""

    def __init__(self):
        super().__init__()
        self.lstm = fused_rnn.LSTMCell(INPUT, HIDDEN)
        self.gru = fused_rnn.GRUCell(INPUT, HIDDEN, bias=False)
        self.tanh = fused_rnn.RNNCell(INPUT, HIDDEN)
        self.relu = fused_rnn.RNNCell(INPUT, HIDDEN, nonlinearity="relu")

    def forward(self, x, h, c):
        return (self.lstm(x, (h, c)), self.lstm(x), self.gru(x, h), self.gru(x[0]), self.tanh(x), self.tanh(x, h),
                self.relu(x, h), self.relu(x[0], h[0]))


class Zoo(nn.Module):
    """Every layer kind in EveryConfiguration, and EveryCell on the first step. Inputs x [T, B, I], h0 and c0
    [4, B, H]."""

    def __init__(self):
        super().__init__()
        for kind, name in KIND_NAMES.items():
            setattr(self, name, EveryConfiguration(kind))
        self.cells = EveryCell()

    def forward(self, x, h0, c0):
        return (*(getattr(self, name)(x, h0, c0) for name in KIND_NAMES.values()), self.cells(x[0], h0[0], c0[0]))


class BatchFirst(nn.Module):
    """A batch-first layer of each kind from zero state, and a cell of each kind on the first step. Inputs
    x [B, T, I], h [B, H], c [B, H]. Unidirectional: torch 2.13's dynamo=True export of a bidirectional
    torch.nn.GRU keeps a dynamic batch axis or not depending on what the process exported before, so a comparison
    of two such exports would be unreliable."""

    def __init__(self):
        super().__init__()
        for kind, name in KIND_NAMES.items():
            class_name, options = LAYER_KINDS[kind]
            setattr(self, name, getattr(fused_rnn, class_name)(INPUT, HIDDEN, batch_first=True, **options))
        self.cells = EveryCell()

    def forward(self, x, h, c):
        cells, first = self.cells, x[:, 0]
        return (*(getattr(self, name)(x) for name in KIND_NAMES.values()),
                cells.lstm(first, (h, c)), cells.gru(first, h), cells.tanh(first), cells.relu(first, h))


def flat(output):
    """The tensors of a nested module output, in order."""
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in flat(item)]
    return [output]


def export_to_onnx(model, args, dynamo, **options):
    """torch.onnx.export(model, args) by the chosen exporter, as the onnx.ModelProto it writes."""
    if dynamo:
        return torch.onnx.export(model, args, dynamo=True, verbose=False, **options).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model, args, buffer, dynamo=False, **options)
    return onnx.load_from_string(buffer.getvalue())


def run_onnx(model_proto, *inputs):
    """What onnxruntime computes for the ONNX model on the inputs (its graph inputs, in order)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    feeds = {graph_input.name: value.numpy() for graph_input, value in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(output) for output in session.run(None, feeds)]


def submodule_of(node, dynamo):
    """The name of the model's direct submodule a node comes from (None: none, e.g. a constant)."""
    if dynamo:
        scopes = {entry.key: entry.value for entry in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "[]")
        path = ast.literal_eval(scopes)[1:]  # after the model's own, ''
    else:
        path = node.name.split("/")[1:-1]  # '/lstm/stacked/LSTM'
    return path[0] if path else None


def op_types(model_proto, dynamo):
    """{submodule name: Counter of the op types of its nodes}."""
    found = collections.defaultdict(collections.Counter)
    for node in model_proto.graph.node:
        found[submodule_of(node, dynamo)][node.op_type] += 1
    return dict(found)


def graph_shapes(model_proto):
    """Each graph input's and output's shape: a number per static axis, its name per dynamic one."""
    def shape(value):
        return [axis.dim_param or axis.dim_value for axis in value.type.tensor_type.shape.dim]
    return [shape(value) for value in (*model_proto.graph.input, *model_proto.graph.output)]


def export_twins(model, args, dynamo, **options):
    """The ONNX models of `model` and of its torch.nn twin, exported alike."""
    return export_to_onnx(model, args, dynamo, **options), export_to_onnx(fused_rnn.to_torch(model), args, dynamo,
                                                                          **options)


def assert_onnxruntime_computes_what_eager_and_the_twin_compute(model, ours, reference, args):
    onnx_outputs = run_onnx(ours, *args)
    with torch.no_grad():
        assert_all_close(onnx_outputs, flat(model(*args)), atol=1e-5, rtol=1e-5)
    assert_all_equal(onnx_outputs, run_onnx(reference, *args))  # the same graph on the same weights


def zoo_inputs(steps=STEPS, batch=BATCH):
    return torch.randn(steps, batch, INPUT), torch.randn(4, batch, HIDDEN), torch.randn(4, batch, HIDDEN)


def batch_first_inputs(batch):
    return torch.randn(batch, STEPS, INPUT), torch.randn(batch, HIDDEN), torch.randn(batch, HIDDEN)


# The TorchScript-based exporter takes dynamic axes by name; torch.nn's export by it serves any length and batch.
ZOO_DYNAMIC_AXES = {"input_names": ["x", "h0", "c0"],
                    "dynamic_axes": {"x": {0: "steps", 1: "batch"}, "h0": {1: "batch"}, "c0": {1: "batch"}}}


@functools.cache
def exported_zoo(dynamo):
    """(the Zoo, its ONNX model, its torch.nn twin's), exported at zoo_inputs() with ZOO_DYNAMIC_AXES by the
    TorchScript-based exporter, with static shapes by dynamo=True (dynamic ones: test_dynamo_export_..._batch)."""
    torch.manual_seed(0)
    model = Zoo().eval()
    return model, *export_twins(model, zoo_inputs(), dynamo, **({} if dynamo else ZOO_DYNAMIC_AXES))


EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_onnx_export_emits_the_ops_torch_nn_export_emits(dynamo):
    """Per layer kind and for the cells, the same ops as torch.nn's export: ONNX's own recurrent op, one per layer,
    wherever torch.nn's export has it (so onnxruntime runs its fused kernels), and never a loop."""
    _, ours, reference = exported_zoo(dynamo)
    ops = op_types(ours, dynamo)
    assert ops == op_types(reference, dynamo)
    for kind, name in KIND_NAMES.items():
        recurrent = RECURRENT_OPS[kind, dynamo]
        if recurrent is None:
            assert not {"LSTM", "GRU", "RNN"} & set(ops[name]) and ops[name]["MatMul"] > 0, ops[name]
        else:
            assert ops[name][recurrent] == 5, ops[name]  # plain, stacked (one per layer), batch-first, unbatched
    assert not any(LOOPS & set(found) for found in ops.values())
    assert graph_shapes(ours) == graph_shapes(reference)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_onnxruntime_runs_the_export_as_eager_and_as_torch_nn_export(dynamo):
    """At the export's shapes; and, exported by the TorchScript-based exporter with dynamic axes, at other
    lengths and batch sizes, as torch.nn's export does."""
    model, ours, reference = exported_zoo(dynamo)
    for steps, batch in [(STEPS, BATCH)] + ([] if dynamo else [(7, 5), (2, 1)]):
        assert_onnxruntime_computes_what_eager_and_the_twin_compute(model, ours, reference, zoo_inputs(steps, batch))


def test_dynamo_export_with_a_dynamic_batch_axis_serves_other_batch_sizes_as_torch_nn_export():
    """dynamo=True with a dynamic batch axis: the same ops and shapes as torch.nn's export and the same results at
    other batch sizes. The sequence length is not made dynamic: torch.nn's dynamo=True export fixes it whatever
    dynamic_shapes say (torch.export's trace of aten.lstm, gru and rnn_* specializes it), and so does ours."""
    torch.manual_seed(0)
    model = BatchFirst().eval()
    batch = Dim("batch")
    ours, reference = export_twins(model, batch_first_inputs(BATCH), True, dynamic_shapes=({0: batch},) * 3)
    assert op_types(ours, True) == op_types(reference, True)
    shapes = graph_shapes(ours)
    assert shapes == graph_shapes(reference)
    assert shapes[0] == ["batch", STEPS, INPUT] and shapes[3] == ["batch", STEPS, HIDDEN]  # x and the LSTM's output
    for size in (BATCH, 5, 1):
        assert_onnxruntime_computes_what_eager_and_the_twin_compute(model, ours, reference, batch_first_inputs(size))


# ---- where torch.nn's export fails, ours fails alike -------------------------------------------------------------

def export_error(model, args, dynamo):
    """The exception torch.onnx.export(model, args) raises (by the chosen exporter)."""
    with pytest.raises(Exception) as raised:
        export_to_onnx(model, args, dynamo)
    return raised.value


def first_line(error):
    return str(error).splitlines()[0]


def test_projections_fail_like_torch_nn_with_the_torchscript_exporter():
    """ONNX's LSTM op has no projection: torch.nn's TorchScript-based export refuses proj_size, and so does ours."""
    torch.manual_seed(0)
    model = fused_rnn.LSTM(INPUT, HIDDEN, proj_size=2).eval()
    args = (torch.randn(STEPS, BATCH, INPUT),)
    ours, reference = export_error(model, args, False), export_error(fused_rnn.to_torch(model), args, False)
    assert type(ours) is type(reference) is torch.onnx.errors.SymbolicValueError
    assert first_line(ours) == first_line(reference)
    assert "LSTMs with projections" in first_line(ours)


def test_projections_fail_at_export_with_dynamo_where_torch_nn_writes_a_model_onnxruntime_refuses():
    """torch.nn's dynamo=True export ignores the projection and writes an ONNX LSTM that onnxruntime refuses to run
    (its initial cell state has the wrong size); ours refuses at export, as the TorchScript-based exporter does."""
    torch.manual_seed(0)
    model = fused_rnn.LSTM(INPUT, HIDDEN, proj_size=2).eval()
    args = (torch.randn(STEPS, BATCH, INPUT),)
    with pytest.raises(torch.onnx.errors.OnnxExporterError, match="LSTM with proj_size > 0"):
        export_to_onnx(model, args, True)
    reference = export_to_onnx(fused_rnn.to_torch(model), args, True)
    with pytest.raises(Exception, match="initial_c"):
        run_onnx(reference, *args)


class Packed(nn.Module):
    """Every layer kind on a PackedSequence, padded back when `pad` (the TorchScript-based exporter exports
    pack_padded_sequence only paired with pad_packed_sequence), else returned as the packed rows."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad
        for kind, name in KIND_NAMES.items():
            class_name, options = LAYER_KINDS[kind]
            setattr(self, name, getattr(fused_rnn, class_name)(INPUT, HIDDEN, bidirectional=True, **options))

    def forward(self, x, lengths):
        results = []
        for name in KIND_NAMES.values():  # one packing per layer: each pad_packed_sequence pairs with one
            out, state = getattr(self, name)(pack_padded_sequence(x, lengths, enforce_sorted=False))
            results.append((pad_packed_sequence(out)[0] if self.pad else out.data, state))
        return results


PACKED_ARGS = (torch.randn(3, 2, INPUT), torch.tensor([2, 3]))


def test_packed_sequences_padded_back_export_as_torch_nn_with_the_torchscript_exporter():
    """ONNX's recurrent ops take the sequence lengths, and the same ops as torch.nn's export compute the same."""
    torch.manual_seed(0)
    model = Packed(pad=True).eval()
    ours, reference = export_twins(model, PACKED_ARGS, False)
    assert op_types(ours, False) == op_types(reference, False)
    assert all(op_types(ours, False)[name][RECURRENT_OPS[kind, False]] == 1 for kind, name in KIND_NAMES.items())
    assert_onnxruntime_computes_what_eager_and_the_twin_compute(model, ours, reference, PACKED_ARGS)


@pytest.mark.parametrize("dynamo, pad", [(False, False), (True, True)], ids=["torchscript-unpaired", "dynamo"])
def test_packed_sequences_fail_like_torch_nn(dynamo, pad):
    """A packed sequence not padded back fails the TorchScript-based exporter, and any fails torch.export (a
    tensor's item as a size) under dynamo=True: for torch.nn and for ours, with the same error."""
    torch.manual_seed(0)
    model = Packed(pad).eval()
    ours, reference = export_error(model, PACKED_ARGS, dynamo), export_error(fused_rnn.to_torch(model), PACKED_ARGS,
                                                                             dynamo)
    assert type(ours) is type(reference)
    assert first_line(ours) == first_line(reference)
    if dynamo:  # the summary names the cause: the same exception in torch.nn's code
        assert type(ours.__cause__) is type(reference.__cause__)
        assert str(ours.__cause__) == str(reference.__cause__)


def test_bad_input_fails_export_like_torch_nn():
    torch.manual_seed(0)
    model = fused_rnn.GRU(INPUT, HIDDEN).eval()
    args = (torch.randn(STEPS, BATCH, INPUT + 1),)
    ours, reference = export_error(model, args, False), export_error(fused_rnn.to_torch(model), args, False)
    assert type(ours) is type(reference) is RuntimeError
    assert str(ours) == str(reference)


def test_exported_programs_holding_the_fused_ops_are_refused_clearly():
    """torch.onnx.export translates what torch.export captured of the model itself; an ExportedProgram made
    beforehand holds the fused ops, which have no ONNX translation, and says so."""
    torch.manual_seed(0)
    model = fused_rnn.LSTM(INPUT, HIDDEN).eval()
    program = torch.export.export(model, (torch.randn(STEPS, BATCH, INPUT),))
    with pytest.raises(torch.onnx.errors.OnnxExporterError, match="fused_rnn::lstm_layer has no ONNX translation"):
        torch.onnx.export(program, dynamo=True, verbose=False)


def test_onnx_export_leaves_the_model_on_the_fused_ops():
    """The layers run as torch.nn only while torch.onnx.export captures them: afterwards torch.export runs the
    fused ops again, on the same parameters."""
    torch.manual_seed(0)
    model = BatchFirst().eval()
    parameters = dict(model.named_parameters())
    export_to_onnx(model, batch_first_inputs(BATCH), False)
    assert dict(model.named_parameters()) == parameters
    program = torch.export.export(model, batch_first_inputs(BATCH))
    assert fused_ops_in(program) == {"fused_rnn.lstm_layer.default", "fused_rnn.gru_layer.default",
                                     "fused_rnn.rnn_layer.default"}
