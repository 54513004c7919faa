"""The ops' autocast rules (fused_rnn/autocast.py) apply alike on every path a layer call takes:
eager (the fast path below autograd), the op called through the dispatcher, torch.jit.trace and
torch.compile. The project registers its rules for CUDA only; here the same rule is registered for
the CPU for the duration of a test, with a scoped torch.library.Library, so that the paths can be
compared without a GPU. The layer ops are called through ops.run_layer, as the modules call them
(the modules' own CPU autocast casting, modules.py, is tested in test_half_precision.py)."""
import contextlib

import pytest
import torch

from fused_rnn.ops import run_layer
from helpers import (DIFFERENTIABLE_OP_INPUTS, LAYER_OPS, OP_KIND_IDS, OP_KINDS, assert_all_equal, layer_op_args,
                     layer_op_tensors, outputs_and_grads)

pytestmark = pytest.mark.usefixtures("torch_test_state")

LAYER_OP_NAMES = ("lstm_layer", "gru_layer", "rnn_layer")
RULE_DTYPES = [torch.float16, torch.bfloat16]
RULE_IDS = ["float16", "bfloat16"]


def autocast_kernel_registered(device_key="AutocastCPU"):
    """Per layer op, whether it has an autocast kernel (a rule) for that dispatch key."""
    return [torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_rnn::{name}", device_key)
            for name in LAYER_OP_NAMES]


@contextlib.contextmanager
def cpu_autocast_rule(dtype):
    """Inside: the layer ops cast floating-point CPU inputs (float64 excepted) to `dtype` in a CPU
    autocast region, the rule autocast.py registers for CUDA."""
    lib = torch.library.Library("fused_rnn", "FRAGMENT")
    try:
        for name in LAYER_OP_NAMES:
            torch.library.register_autocast(f"fused_rnn::{name}", "cpu", dtype, lib=lib)
        yield
    finally:
        lib._destroy()
    assert not any(autocast_kernel_registered()), "the temporary rule outlived its test"


def op_tensors(kind, proj, packed):
    """Float32 leaves for one layer op (every floating tensor requires grad)."""
    return layer_op_tensors(kind, packed, True, proj, dtype=torch.float32)


def run_layer_on(kind, tensors, reverse):
    """ops.run_layer on a layer_op_tensors dict: (output, h_n[, c_n])."""
    t = tensors
    out, hy, cy = run_layer(kind, t["input"], t["batch_sizes"], t["hx"], t["cx"],
                            (t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["w_hr"]), reverse)
    return (out, hy) if cy is None else (out, hy, cy)


def through_dispatcher(kind, tensors, reverse):
    """The layer op called as an OpOverload: autocast and the registered autograd in the
    dispatcher, the path torch.compile, torch.jit.trace and torch.func take."""
    results = LAYER_OPS[kind](*layer_op_args(kind, tensors, reverse))
    return tuple(results[:-1])  # everything but the reserve


def differentiable(tensors):
    """The op's differentiable inputs (input, hx, ..., w_hr) that are present, by name."""
    return {n: tensors[n] for n in DIFFERENTIABLE_OP_INPUTS if tensors[n] is not None}


def as_function_of_leaves(kind, tensors, reverse):
    """(function(*leaves) running run_layer_on with those leaves, the leaves): for tracing and compiling."""
    names = list(differentiable(tensors))

    def function(*values):
        return run_layer_on(kind, {**tensors, **dict(zip(names, values))}, reverse)

    return function, [tensors[n] for n in names]


def traced(kind, tensors, reverse):
    """run_layer_on traced by torch.jit.trace (inside the region), then run."""
    function, leaves = as_function_of_leaves(kind, tensors, reverse)
    return torch.jit.trace(function, leaves, check_trace=False)(*leaves)


def cast_by_hand(tensors, dtype):
    """What the rule does to the op's inputs, done outside autocast: the floating tensors cast (as
    differentiable copies, so their gradients come back in float32)."""
    return {n: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for n, t in tensors.items()}


def results(function, tensors):
    """(output tensors of function(), gradients of weighted_loss with respect to the op's
    differentiable inputs): two lists."""
    outputs, grads = outputs_and_grads(function, differentiable(tensors))
    return outputs, list(grads.values())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("rule_dtype", RULE_DTYPES, ids=RULE_IDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("kind,proj", OP_KINDS, ids=OP_KIND_IDS)
def test_eager_calls_apply_the_rule_like_the_dispatcher(kind, proj, packed, reverse, rule_dtype):
    """Inside the region, an eager call, the op through the dispatcher and a traced call give the
    outputs (in the rule's dtype) and float32 gradients that casting the inputs by hand gives,
    bit for bit; so does an eager inference call."""
    tensors = op_tensors(kind, proj, packed)
    expected = results(lambda: run_layer_on(kind, cast_by_hand(tensors, rule_dtype), reverse), tensors)
    assert all(t.dtype == rule_dtype for t in expected[0])
    assert all(g.dtype == torch.float32 for g in expected[1])
    with cpu_autocast_rule(rule_dtype), torch.autocast("cpu", dtype=torch.bfloat16):
        for path in (run_layer_on, through_dispatcher, traced):
            actual = results(lambda: path(kind, tensors, reverse), tensors)
            assert_all_equal(actual[0], expected[0])
            assert_all_equal(actual[1], expected[1])
        with torch.no_grad():
            assert_all_equal(list(run_layer_on(kind, tensors, reverse)), [t.detach() for t in expected[0]])


@pytest.mark.parametrize("kind,proj,packed,reverse", [("LSTM", True, True, True), ("GRU", False, False, False),
                                                      ("RNN_RELU", False, True, False)])
def test_compiled_calls_apply_the_rule(kind, proj, packed, reverse):
    """torch.compile(fullgraph=True) of a layer call inside the region: the eager results."""
    tensors = op_tensors(kind, proj, packed)
    function, leaves = as_function_of_leaves(kind, tensors, reverse)
    compiled = torch.compile(function, fullgraph=True, backend="aot_eager")
    with cpu_autocast_rule(torch.float16), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = results(lambda: function(*leaves), tensors)
        actual = results(lambda: compiled(*leaves), tensors)
    assert all(t.dtype == torch.float16 for t in actual[0])
    assert_all_equal(actual[0], eager[0])
    assert_all_equal(actual[1], eager[1])


def test_eager_fast_path_stays_where_no_rule_applies():
    """An eager call leaves the fast path (ops._EagerLayer) only where an autocast rule applies:
    outside autocast, and inside a CPU region with only the CUDA rule registered, a differentiable
    call still runs through it; with a CPU rule it goes through the dispatcher."""
    assert all(autocast_kernel_registered("AutocastCUDA")) and not any(autocast_kernel_registered())
    tensors = op_tensors("GRU", False, False)

    def node():
        return type(run_layer_on("GRU", tensors, False)[0].grad_fn).__name__

    assert node() == "_EagerLayerBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert node() == "_EagerLayerBackward"
        with cpu_autocast_rule(torch.float16):
            assert node() != "_EagerLayerBackward"
