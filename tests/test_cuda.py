"""The CUDA backend: parity with torch.nn on cuDNN (outputs and every gradient, per dtype) and
with the CPU backend, gradcheck and opcheck on CUDA tensors, CUDA-graph capture, long
sequences, large steps, streams, devices and autocast. Skipped without a GPU or without the
CUDA backend compiled in.

Weights, and inputs wherever a CUDA result is compared with a CPU one, are drawn on the CPU and
copied to the GPU: one generator, so that both are of the same numbers. In float64, fused_rnn
matches cuDNN to 1e-10. In the other types cuDNN is no exact reference (in float32 it is up to
1.5e-5 off, in float16 RNN_TANH up to 0.58 on longer sequences): both are measured against a
float64 truth on the CPU (helpers.Float64Truth), and fused_rnn's error must be within 1.5x of
cuDNN's plus a rounding floor (helpers.rounding_floor), as on the CPU against torch.nn
(test_half_precision.py); the criterion itself is tested on the CPU in test_accuracy_criterion.py."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
import fused_rnn.autocast  # noqa: F401  (registers the ops' autocast rules)
from helpers import (BATCH, INPUT_FORMS, INPUT_SIZE, LAYER_GRID_ARGS, LAYER_KINDS, OP_KIND_IDS, OP_KINDS,
                     OPCHECK_CASE_ARGS, OPCHECK_CASE_IDS, OPCHECK_CASES, PACKED_LENGTHS, PROJ_SIZE, STEPS,
                     Float64Truth, assert_at_least_as_accurate, assert_backward_op_opcheck_passes,
                     assert_layer_op_gradcheck_passes, assert_layer_op_opcheck_passes,
                     assert_results_at_least_as_accurate, assert_same_results, capture_cuda_graph, layer_call,
                     layer_grid, layer_leaves, leaf, make_kind_pair, module_gradcheck, named_outputs_and_grads,
                     output_tensors, rounding_floor)
from helpers import SCALED_TOLERANCE as TOLERANCE
from helpers import assert_close_scaled as assert_close

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (or a CPU-only torch)"),
    pytest.mark.skipif(not fused_rnn.backends()["cuda"], reason="fused_rnn was built without its CUDA backend"),
]

CUDA = torch.device("cuda")
HIDDEN = 10
# Autocast (float16) against the same module in float32.
AUTOCAST_TOLERANCE = 2e-2


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN (and cuBLAS, if allowed) would run float32 in TF32, far from a 1e-5 comparison."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ---- helpers -------------------------------------------------------------------------------------

def make_modules(kind, dtype, input_size=INPUT_SIZE, hidden_size=HIDDEN, device=CUDA, **kwargs):
    """(torch.nn module, fused_rnn module) of one kind on `device`, with the same weights
    (make_kind_pair), drawn on the CPU."""
    reference, fused = make_kind_pair(kind, input_size, hidden_size, **kwargs, dtype=dtype)
    return reference.to(device), fused.to(device)


def leaves_on(device, leaves):
    """Copies of the leaf tensors on `device`, leaves of their own."""
    return {name: t.detach().to(device).requires_grad_() for name, t in leaves.items()}


def cuda_leaves(kind, module, form, with_h0, dtype, **sizes):
    """layer_leaves drawn on the CPU, copied to the GPU."""
    return leaves_on(CUDA, layer_leaves(kind, module, form, with_h0, dtype, **sizes))


def assert_as_accurate_as_nn(fused, reference, leaves, call, dtype):
    """Outputs and every gradient of `call` within 1.5x of torch.nn's error plus
    rounding_floor(dtype) against the float64 truth for `reference` computing in `dtype`."""
    assert_at_least_as_accurate(fused, reference, Float64Truth(reference, dtype), leaves, call, rounding_floor(dtype))


# ---- parity with torch.nn on CUDA (cuDNN; torch's own kernels for bfloat16) ----------------------

FULL_GRID = list(layer_grid(LAYER_KINDS, [1, 2], [False, True], [False, True], [True, False], [False, True],
                            [False, True], INPUT_FORMS))
HALF_PRECISION_GRID = list(layer_grid(LAYER_KINDS, [2], [False, True], [False], [True, False], [False, True], [True],
                                      ["3d", "unbatched", "packed_unsorted"]))


def check_parity_with_nn(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, dtype):
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    if proj:
        kwargs["proj_size"] = PROJ_SIZE
    reference, fused = make_modules(kind, dtype, **kwargs)
    leaves, call = cuda_leaves(kind, fused, form, with_h0, dtype), layer_call(kind, form)
    if dtype == torch.float64:
        assert_same_results(named_outputs_and_grads(fused, leaves, call),
                            named_outputs_and_grads(reference, leaves, call), TOLERANCE[dtype])
    else:
        assert_as_accurate_as_nn(fused, reference, leaves, call, dtype)


@pytest.mark.parametrize(LAYER_GRID_ARGS, FULL_GRID)
def test_matches_nn_float64(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form):
    check_parity_with_nn(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, torch.float64)


@pytest.mark.parametrize(LAYER_GRID_ARGS, FULL_GRID)
def test_matches_nn_float32(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form):
    check_parity_with_nn(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(LAYER_GRID_ARGS, HALF_PRECISION_GRID)
def test_matches_nn_half_precision(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form,
                                   dtype):
    check_parity_with_nn(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_long_sequence_matches_nn(kind, dtype):
    """T = 4096: state carried across thousands of steps, forward and backward."""
    reference, fused = make_modules(kind, dtype, hidden_size=16, bidirectional=True)
    leaves, call = cuda_leaves(kind, fused, "3d", True, dtype, steps=4096), layer_call(kind, "3d")
    if dtype == torch.float64:
        assert_same_results(named_outputs_and_grads(fused, leaves, call),
                            named_outputs_and_grads(reference, leaves, call), 1e-9)
    else:
        assert_as_accurate_as_nn(fused, reference, leaves, call, dtype)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_long_sequence_inference_matches_nn(kind):
    """T = 4100 under no_grad, batch 64 x hidden 64: the projected input goes through one reused
    buffer of 2^24 gate values, a chunk of 682 to 4096 steps at a time (2 to 7 chunks here), and a
    projected LSTM copies each projected h into the state."""
    proj = {"proj_size": PROJ_SIZE} if kind == "LSTM" else {}
    reference, fused = make_modules(kind, torch.float32, hidden_size=64, bidirectional=True, **proj)
    x = torch.randn(4100, 64, INPUT_SIZE)
    with torch.no_grad():
        ours, theirs = (output_tensors(module(x.to(CUDA))) for module in (fused, reference))
        exact = output_tensors(Float64Truth(reference, torch.float32)(x.double()))
    assert_results_at_least_as_accurate((ours, {}), (theirs, {}), (exact, {}), rounding_floor(torch.float32))


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_backward_across_chunks_matches_nn(kind):
    """Batch 64 x hidden 64, 1400 steps: the backward pass takes the gate gradients of at most
    2^24 values (1024 steps of LSTM, 1365 of GRU) at a time, so LSTM and GRU cross a chunk border
    and add each chunk's weight gradients to the last."""
    reference, fused = make_modules(kind, torch.float64, hidden_size=64)
    leaves = cuda_leaves(kind, fused, "3d", True, torch.float64, steps=1400, batch=64)
    call = layer_call(kind, "3d")
    assert_same_results(named_outputs_and_grads(fused, leaves, call), named_outputs_and_grads(reference, leaves, call),
                        1e-9)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_step_larger_than_one_grid_matches_nn(kind):
    """batch * hidden = 2^25 elements per step, beyond the 2^24 threads of the largest launch:
    the kernels' grid-stride loop covers the rest."""
    reference, fused = make_modules(kind, torch.float64, input_size=8, hidden_size=4096)
    leaves = {"input": leaf(1, 8192, 8, dtype=torch.float64, device=CUDA)}
    call = layer_call(kind, "3d")
    assert_same_results(named_outputs_and_grads(fused, leaves, call), named_outputs_and_grads(reference, leaves, call),
                        TOLERANCE[torch.float64])


# ---- parity with the CPU backend -----------------------------------------------------------------

@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_matches_cpu_backend(kind, form):
    kwargs = dict(num_layers=2, bidirectional=True)
    if kind == "LSTM":
        kwargs["proj_size"] = PROJ_SIZE
    _, on_cpu = make_modules(kind, torch.float64, device="cpu", **kwargs)
    on_cuda = copy.deepcopy(on_cpu).to(CUDA)
    cpu_leaves = layer_leaves(kind, on_cpu, form, True, torch.float64, device="cpu")
    call = layer_call(kind, form)
    assert_same_results(named_outputs_and_grads(on_cuda, leaves_on(CUDA, cpu_leaves), call),
                        named_outputs_and_grads(on_cpu, cpu_leaves, call), TOLERANCE[torch.float64])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_runs_on_a_device_that_is_not_the_current_one(kind):
    """The ops make the tensors' device current (kernels, cuBLAS handle and stream alike)."""
    _, on_cpu = make_modules(kind, torch.float64, device="cpu", bidirectional=True)
    device = torch.device("cuda", 1)
    on_device = copy.deepcopy(on_cpu).to(device)
    cpu_leaves = layer_leaves(kind, on_cpu, "3d", True, torch.float64, device="cpu")
    call = layer_call(kind, "3d")
    with torch.cuda.device(0):
        on_device_results = named_outputs_and_grads(on_device, leaves_on(device, cpu_leaves), call)
    assert_same_results(on_device_results, named_outputs_and_grads(on_cpu, cpu_leaves, call), TOLERANCE[torch.float64])


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_runs_on_the_current_stream(kind):
    """On a side stream whose inputs are still being produced, every kernel and GEMM must wait
    for them: work sent to another stream would read them too early."""
    _, fused = make_modules(kind, torch.float32, num_layers=2, bidirectional=True)
    leaves, call = layer_leaves(kind, fused, "3d", True, torch.float32, device=CUDA), layer_call(kind, "3d")
    expected = named_outputs_and_grads(fused, leaves, call)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy for tens of milliseconds
        late_leaves = {name: (t.detach() * 1).requires_grad_() for name, t in leaves.items()}
        actual = named_outputs_and_grads(fused, late_leaves, call)
    torch.cuda.current_stream().wait_stream(side)
    assert_same_results(actual, expected, TOLERANCE[torch.float32])


# ---- the raw ops: gradcheck and opcheck ----------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("kind,proj", OP_KINDS, ids=OP_KIND_IDS)
def test_layer_op_gradcheck(kind, proj, packed, reverse, bias):
    assert_layer_op_gradcheck_passes(kind, proj, packed, reverse, bias, device=CUDA, input_size=INPUT_SIZE)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_stacked_bidirectional_module_gradcheck_packed(kind):
    """gradcheck w.r.t. input, h0 (c0) and every parameter, swapped in by functional_call."""
    kwargs = dict(num_layers=2, bidirectional=True)
    if kind == "LSTM":
        kwargs["proj_size"] = 2
    _, module = make_modules(kind, torch.float64, input_size=3, hidden_size=4, **kwargs)
    leaves = layer_leaves(kind, module, "packed_unsorted", True, torch.float64, device=CUDA)

    def call(forward, inputs):
        x = pack_padded_sequence(inputs["input"], PACKED_LENGTHS["packed_unsorted"], enforce_sorted=False)
        hidden = (inputs["h0"], inputs["c0"]) if kind == "LSTM" else inputs["h0"]
        return tuple(output_tensors(forward(x, hidden)))

    module_gradcheck(module, leaves, call)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize(OPCHECK_CASE_ARGS, OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
def test_forward_op_opcheck(kind, packed, reverse, bias, proj, requires_grad):
    assert_layer_op_opcheck_passes(kind, packed, reverse, bias, proj, requires_grad=requires_grad, device=CUDA,
                                   input_size=INPUT_SIZE)


@pytest.mark.parametrize(OPCHECK_CASE_ARGS, OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
def test_backward_op_opcheck(kind, packed, reverse, bias, proj):
    assert_backward_op_opcheck_passes(kind, packed, reverse, bias, proj, device=CUDA, input_size=INPUT_SIZE)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_double_backward_matches_cpu(kind):
    """A gradient penalty through a 2-layer bidirectional layer (cuDNN has no double backward):
    the same as on the CPU."""
    _, on_cpu = make_modules(kind, torch.float64, num_layers=2, bidirectional=True, device="cpu")
    x = leaf(STEPS, BATCH, INPUT_SIZE)
    results = []
    for fused in (on_cpu, copy.deepcopy(on_cpu).to(CUDA)):
        x_on = x.detach().to(fused.weight_ih_l0.device).requires_grad_()
        grad_x, = torch.autograd.grad(fused(x_on)[0].pow(2).sum(), x_on, create_graph=True)
        results.append([g.cpu() for g in torch.autograd.grad(grad_x.pow(2).sum(), [x_on, *fused.parameters()])])
    for cuda_grad, cpu_grad in zip(results[1], results[0]):
        assert_close(cuda_grad, cpu_grad, TOLERANCE[torch.float64], "penalty gradient")


# ---- CUDA graphs ---------------------------------------------------------------------------------

def graph_module(kind):
    """A two-layer bidirectional float32 module (LSTM with a projection) on CUDA."""
    kwargs = dict(num_layers=2, bidirectional=True)
    if kind == "LSTM":
        kwargs["proj_size"] = PROJ_SIZE
    return make_modules(kind, torch.float32, **kwargs)[1]


@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_forward_captured_in_a_cuda_graph_replays_like_eager(kind, form):
    """Packed: the sequence is packed outside the graph (packing copies its sort order to the
    GPU) and its lengths are fixed at capture; the module's sorting of the states, the per-step
    gathers and the unsorting of h_n are captured with the layers."""
    module = graph_module(kind)

    def make_input():
        x = torch.randn(STEPS, BATCH, INPUT_SIZE, device=CUDA)
        return pack_padded_sequence(x, PACKED_LENGTHS[form], enforce_sorted=False) if form != "3d" else x

    static_input = make_input()
    static_data = static_input.data if form != "3d" else static_input
    with torch.no_grad():
        graph, static_output = capture_cuda_graph(lambda x: output_tensors(module(x)), static_input)
        for _ in range(3):
            fresh = make_input()
            static_data.copy_(fresh.data if form != "3d" else fresh)
            graph.replay()
            for k, (replayed, eager) in enumerate(zip(static_output, output_tensors(module(fresh)))):
                assert_close(replayed, eager, TOLERANCE[torch.float32], f"output[{k}]")


class FlatOutputs(nn.Module):
    """A recurrent module whose output is a flat tuple of tensors, as make_graphed_callables needs."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return tuple(output_tensors(self.rnn(x)))


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_forward_and_backward_graphed_match_eager(kind):
    module = graph_module(kind)
    eager = copy.deepcopy(module)
    sample = torch.randn(STEPS, BATCH, INPUT_SIZE, device=CUDA, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(FlatOutputs(module), (sample,))
    call = lambda m, leaves: m(leaves["input"])  # noqa: E731
    for _ in range(2):
        leaves = {"input": torch.randn_like(sample).requires_grad_()}
        assert_same_results(named_outputs_and_grads(graphed, leaves, call),
                            named_outputs_and_grads(FlatOutputs(eager), leaves, call), TOLERANCE[torch.float32])


# ---- autocast ------------------------------------------------------------------------------------

@pytest.mark.parametrize("region_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_autocast_runs_in_float16_like_cudnn(kind, form, region_dtype):
    """Like torch.nn's cuDNN RNNs, the ops run in float16 in any CUDA autocast region, close to
    float32 and at least as accurate as cuDNN against the float64 truth on the float16 casts;
    gradients reach the float32 parameters in float32."""
    reference, fused = make_modules(kind, torch.float32, num_layers=2, bidirectional=True)
    leaves, call = cuda_leaves(kind, fused, form, True, torch.float32), layer_call(kind, form)
    with torch.autocast("cuda", dtype=region_dtype):
        autocast = named_outputs_and_grads(fused, leaves, call)
        assert_as_accurate_as_nn(fused, reference, leaves, call, torch.float16)
    assert all(t.dtype == torch.float16 for t in autocast[0])
    assert all(g.dtype == torch.float32 for g in autocast[1].values())
    assert_same_results(autocast, named_outputs_and_grads(fused, leaves, call), AUTOCAST_TOLERANCE, same_dtypes=False)


def test_autocast_leaves_float64_alone():
    _, fused = make_modules("LSTM", torch.float64)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64, device=CUDA)
    with torch.autocast("cuda"):
        output, (h_n, c_n) = fused(x)
    assert output.dtype == h_n.dtype == c_n.dtype == torch.float64
