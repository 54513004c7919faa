"""Python side of the torch.ops.fused_rnn ops: fake (meta) kernels so torch.compile and
torch.export can trace them, and autograd that ties each layer op to its backward op.

The ops themselves are declared in csrc/ops.cpp. Each *_layer op runs one direction of one
layer over a whole sequence; see there for argument conventions.
"""
from typing import Any, Callable, NamedTuple

import torch
from torch.autograd import forward_ad

from . import composite

_ops = torch.ops.fused_rnn


def _gates(mode):
    return {"lstm": 4, "gru": 3, "rnn": 1}[mode]


def _reserve_width(mode, hidden, project):
    return {"lstm": (6 if project else 5), "gru": 4, "rnn": 0}[mode] * hidden


def _refuse_onnx_export(mode):
    """The fused ops have no ONNX translation: while torch.onnx.export captures a model, fused_rnn's
    modules run as their torch.nn twins (modules.py). A fused op traced during an export was captured
    otherwise: it is in an ExportedProgram given to torch.onnx.export, or dynamo=True fell back to
    strict torch.export (where Dynamo takes is_in_onnx_export() for False) after the non-strict capture
    failed, as torch.nn's would. It fails here, so that such a fallback fails too (the exporter then
    reports the non-strict error, as for torch.nn) and an ExportedProgram is refused with a clear message."""
    if torch.onnx.is_in_onnx_export():
        raise torch.onnx.errors.OnnxExporterError(
            f"fused_rnn::{mode}_layer has no ONNX translation: fused_rnn's layers and cells export to ONNX as their "
            "torch.nn twins do when torch.onnx.export is given the model itself, not an ExportedProgram or a "
            "traced module that already holds the fused ops")


def _fake_forward(mode, input, batch_sizes, hx, w_ih, w_hh, save_reserve, w_hr=None):
    _refuse_onnx_export(mode)
    hidden = w_ih.shape[0] // _gates(mode)
    h_out = w_hh.shape[1]
    if batch_sizes is not None:
        rows, out_shape = input.shape[0], (input.shape[0], h_out)
    else:
        rows, out_shape = input.shape[0] * input.shape[1], (input.shape[0], input.shape[1], h_out)
    width = _reserve_width(mode, hidden, w_hr is not None)
    reserve = input.new_empty((rows if save_reserve and width else 0, width))
    return input.new_empty(out_shape), hx.new_empty((hx.shape[0], h_out)), reserve


@torch.library.register_fake("fused_rnn::lstm_layer")
def _(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save_reserve=True):
    output, hy, reserve = _fake_forward("lstm", input, batch_sizes, hx, w_ih, w_hh, save_reserve, w_hr)
    return output, hy, cx.new_empty(cx.shape), reserve


@torch.library.register_fake("fused_rnn::gru_layer")
def _(input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, reverse, save_reserve=True):
    return _fake_forward("gru", input, batch_sizes, hx, w_ih, w_hh, save_reserve)


@torch.library.register_fake("fused_rnn::rnn_layer")
def _(input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, relu, reverse, save_reserve=True):
    return _fake_forward("rnn", input, batch_sizes, hx, w_ih, w_hh, save_reserve)


def _fake_grads(input, hx, w_ih, w_hh, has_bias, input_grad, weight_grads, hx_grad):
    def grad_of(t, wanted=True):
        return t.new_empty(t.shape if wanted else (0,))
    bias = (w_ih.new_empty((w_ih.shape[0] if has_bias and weight_grads else 0,)) for _ in range(2))
    return (grad_of(input, input_grad), grad_of(hx, hx_grad), grad_of(w_ih, weight_grads), grad_of(w_hh, weight_grads),
            *bias)


@torch.library.register_fake("fused_rnn::lstm_layer_backward")
def _(grad_output, grad_hy, grad_cy, input, batch_sizes, hx, cx, w_ih, w_hh, w_hr, output, reserve,
      has_bias, reverse, input_grad=True, weight_grads=True, hx_grad=True):
    gi, ghx, gw_ih, gw_hh, gb_ih, gb_hh = _fake_grads(input, hx, w_ih, w_hh, has_bias, input_grad, weight_grads, hx_grad)
    gw_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None and weight_grads else w_ih.new_empty((0,))
    return gi, ghx, cx.new_empty(cx.shape), gw_ih, gw_hh, gb_ih, gb_hh, gw_hr


@torch.library.register_fake("fused_rnn::gru_layer_backward")
def _(grad_output, grad_hy, input, batch_sizes, hx, w_ih, w_hh, output, reserve, has_bias, reverse,
      input_grad=True, weight_grads=True, hx_grad=True):
    return _fake_grads(input, hx, w_ih, w_hh, has_bias, input_grad, weight_grads, hx_grad)


@torch.library.register_fake("fused_rnn::rnn_layer_backward")
def _(grad_output, grad_hy, input, batch_sizes, hx, w_ih, w_hh, output, reserve, has_bias, relu, reverse,
      input_grad=True, weight_grads=True, hx_grad=True):
    return _fake_grads(input, hx, w_ih, w_hh, has_bias, input_grad, weight_grads, hx_grad)


# ---- autograd ---------------------------------------------------------------------------


def _bias_grads(ctx, gb_ih, gb_hh):
    return (gb_ih if ctx.has_b_ih else None), (gb_hh if ctx.has_b_hh else None)


# The backward ops leave out the gradients nothing needs, and the GEMMs that make them (each as
# large as the input gradient's): the input's for a first layer on data, the weights' and biases'
# for a frozen layer (its input's then still flows back, e.g. to a trainable embedding), hx's
# where the initial state is zeros or data (the first step's dL/dh_prev GEMM).
def _needed(ctx, weights):
    """(whether the input needs a gradient, whether any of the weights and biases, the op's
    inputs in the slice `weights`, does, whether hx does): the backward op's input_grad,
    weight_grads and hx_grad."""
    return ctx.needs_input_grad[0], any(ctx.needs_input_grad[weights]), ctx.needs_input_grad[2]


def _kept(wanted, *grads):
    """The gradients as the backward op returned them, or Nones where it was told to leave them out."""
    return grads if wanted else (None,) * len(grads)


def _setup_common(ctx, batch_sizes, b_ih, b_hh, reverse, reserve, save_reserve):
    if not save_reserve:
        raise RuntimeError("fused_rnn: a layer op called with save_reserve=False keeps no activations and "
                           "cannot be differentiated; call it with save_reserve=True when gradients are needed")
    # Outputs that get no gradient (the reserve always, h_n / c_n often) stay None instead of
    # being filled with zeros: the reserve is as large as all the gates.
    ctx.set_materialize_grads(False)
    ctx.batch_sizes = batch_sizes
    ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
    ctx.reverse = reverse
    ctx.mark_non_differentiable(reserve)


def _differentiable_grads(ctx, mode, inputs, grads, relu=False):
    """Gradients with respect to `inputs` (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr; None where
    absent) of the layer's outputs (output, h_n, c_n) given theirs (None: unused), recomputed through
    composite.layer so that they can be differentiated again: what backward returns under
    create_graph=True. None for each input that does not require grad."""
    recomputed = composite.layer(mode, inputs[0], ctx.batch_sizes, *inputs[1:], ctx.reverse, relu)
    used = [(out, grad) for out, grad in zip(recomputed, grads) if grad is not None and out is not None]
    wanted = [k for k, t in enumerate(inputs) if t is not None and t.requires_grad]
    result = [None] * len(inputs)
    if used and wanted:
        found = torch.autograd.grad([out for out, _ in used], [inputs[k] for k in wanted], [g for _, g in used],
                                    create_graph=True, allow_unused=True)
        for k, g in zip(wanted, found):
            result[k] = torch.zeros_like(inputs[k]) if g is None else g
    return result


def _lstm_setup(ctx, inputs, output):
    input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save_reserve = inputs
    out, _, _, reserve = output
    _setup_common(ctx, batch_sizes, b_ih, b_hh, reverse, reserve, save_reserve)
    ctx.has_w_hr = w_hr is not None
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, w_hr, out, reserve, b_ih, b_hh)


def _or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _lstm_backward(ctx, grad_out, grad_hy, grad_cy, _grad_reserve):
    input, hx, cx, w_ih, w_hh, w_hr, out, reserve, b_ih, b_hh = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        gi, ghx, gcx, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr = _differentiable_grads(
            ctx, "lstm", (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr), (grad_out, grad_hy, grad_cy))
        return gi, None, ghx, gcx, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr, None, None
    grad_out, grad_hy, grad_cy = _or_zeros(grad_out, out), _or_zeros(grad_hy, hx), _or_zeros(grad_cy, cx)
    input_grad, weight_grads, hx_grad = _needed(ctx, slice(4, 9))
    gi, ghx, gcx, gw_ih, gw_hh, gb_ih, gb_hh, gw_hr = _call(
        _ops.lstm_layer_backward.default, grad_out, grad_hy, grad_cy, input, ctx.batch_sizes, hx, cx, w_ih, w_hh,
        w_hr, out, reserve, ctx.has_b_ih or ctx.has_b_hh, ctx.reverse, input_grad, weight_grads, hx_grad)
    weights = _kept(weight_grads, gw_ih, gw_hh, *_bias_grads(ctx, gb_ih, gb_hh), gw_hr if ctx.has_w_hr else None)
    return (*_kept(input_grad, gi), None, *_kept(hx_grad, ghx), gcx, *weights, None, None)


def _gru_setup(ctx, inputs, output):
    input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, reverse, save_reserve = inputs
    out, _, reserve = output
    _setup_common(ctx, batch_sizes, b_ih, b_hh, reverse, reserve, save_reserve)
    ctx.save_for_backward(input, hx, w_ih, w_hh, out, reserve, b_ih, b_hh)


def _simple_differentiable_grads(ctx, mode, grad_out, grad_hy, relu=False):
    """_differentiable_grads for GRU and RNN, whose ops take (input, batch_sizes, hx, w_ih, w_hh,
    b_ih, b_hh, ...): returns the gradients in that order."""
    input, hx, w_ih, w_hh, _, _, b_ih, b_hh = ctx.saved_tensors
    gi, ghx, _, gw_ih, gw_hh, gb_ih, gb_hh, _ = _differentiable_grads(
        ctx, mode, (input, hx, None, w_ih, w_hh, b_ih, b_hh, None), (grad_out, grad_hy, None), relu)
    return gi, None, ghx, gw_ih, gw_hh, gb_ih, gb_hh


def _gru_backward(ctx, grad_out, grad_hy, _grad_reserve):
    if torch.is_grad_enabled():  # create_graph=True
        return (*_simple_differentiable_grads(ctx, "gru", grad_out, grad_hy), None, None)
    input, hx, w_ih, w_hh, out, reserve, _, _ = ctx.saved_tensors
    grad_out, grad_hy = _or_zeros(grad_out, out), _or_zeros(grad_hy, hx)
    input_grad, weight_grads, hx_grad = _needed(ctx, slice(3, 7))
    gi, ghx, gw_ih, gw_hh, gb_ih, gb_hh = _call(
        _ops.gru_layer_backward.default, grad_out, grad_hy, input, ctx.batch_sizes, hx, w_ih, w_hh, out, reserve,
        ctx.has_b_ih or ctx.has_b_hh, ctx.reverse, input_grad, weight_grads, hx_grad)
    weights = _kept(weight_grads, gw_ih, gw_hh, *_bias_grads(ctx, gb_ih, gb_hh))
    return (*_kept(input_grad, gi), None, *_kept(hx_grad, ghx), *weights, None, None)


def _rnn_setup(ctx, inputs, output):
    input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, relu, reverse, save_reserve = inputs
    out, _, reserve = output
    _setup_common(ctx, batch_sizes, b_ih, b_hh, reverse, reserve, save_reserve)
    ctx.relu = relu
    ctx.save_for_backward(input, hx, w_ih, w_hh, out, reserve, b_ih, b_hh)


def _rnn_backward(ctx, grad_out, grad_hy, _grad_reserve):
    if torch.is_grad_enabled():  # create_graph=True
        return (*_simple_differentiable_grads(ctx, "rnn", grad_out, grad_hy, ctx.relu), None, None, None)
    input, hx, w_ih, w_hh, out, reserve, _, _ = ctx.saved_tensors
    grad_out, grad_hy = _or_zeros(grad_out, out), _or_zeros(grad_hy, hx)
    input_grad, weight_grads, hx_grad = _needed(ctx, slice(3, 7))
    gi, ghx, gw_ih, gw_hh, gb_ih, gb_hh = _call(
        _ops.rnn_layer_backward.default, grad_out, grad_hy, input, ctx.batch_sizes, hx, w_ih, w_hh, out, reserve,
        ctx.has_b_ih or ctx.has_b_hh, ctx.relu, ctx.reverse, input_grad, weight_grads, hx_grad)
    weights = _kept(weight_grads, gw_ih, gw_hh, *_bias_grads(ctx, gb_ih, gb_hh))
    return (*_kept(input_grad, gi), None, *_kept(hx_grad, ghx), *weights, None, None, None)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fused_rnn: the *_layer_backward ops are not differentiable; for gradients of "
                              "gradients, differentiate the layer ops with create_graph=True, whose backward "
                              "then runs a differentiable composite of torch ops")


def _no_context(ctx, inputs, output):
    pass


class _Autograd(NamedTuple):
    op: Any  # a layer op's OpOverload
    setup_context: Callable
    backward: Callable


_LAYERS = {"lstm": _Autograd(_ops.lstm_layer.default, _lstm_setup, _lstm_backward),
           "gru": _Autograd(_ops.gru_layer.default, _gru_setup, _gru_backward),
           "rnn": _Autograd(_ops.rnn_layer.default, _rnn_setup, _rnn_backward)}
for _mode, _layer in _LAYERS.items():
    torch.library.register_autograd(f"fused_rnn::{_mode}_layer", _layer.backward, setup_context=_layer.setup_context)
for _name in ("lstm_layer_backward", "gru_layer_backward", "rnn_layer_backward"):
    torch.library.register_autograd(f"fused_rnn::{_name}", _no_double_backward, setup_context=_no_context)


class _EagerLayer(torch.autograd.Function):
    """A layer op called eagerly with something to differentiate: the autograd registered for it
    above (the same setup_context and backward), without the Python wrapper torch.library puts
    around them, which costs about 20 us a call (it re-reads the op's schema to fill in defaults),
    more than a whole small step. The last argument is the op's _Autograd."""

    @staticmethod
    def forward(ctx, *args):
        *args, layer = args
        with torch._C._AutoDispatchBelowAutograd():
            output = layer.op(*args)
        layer.setup_context(ctx, args, output)
        ctx.layer = layer
        return output

    @staticmethod
    def backward(ctx, *grads):
        # ctx.needs_input_grad has one more entry, for the _Autograd, which the backward does not read.
        return (*ctx.layer.backward(ctx, *grads), None)


# _EagerLayer.apply without autograd.Function.apply's Python prologue (~5 us a call: it looks for
# functorch wrappers to unwrap, and there are none in an _eager() call): torch._C._FunctionBase's
# apply, bound to the class, as Function.apply itself ends by calling it.
_eager_layer_apply = super(torch.autograd.Function, _EagerLayer).apply


def _eager():
    """Whether this is a plain eager call, which may skip torch.library's autograd wrapper: not
    traced (torch.compile, torch.jit.trace) nor inside a torch.func transform (vmap; the
    differentiating ones run no op, _runs_as_composite), which need every call to go through the
    dispatcher as registered."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._functorch.peek_interpreter_stack() is not None)


def _call(op, *args, eager=None):
    """op(*args) where nothing is to be differentiated; called eagerly (`eager`, or _eager() where
    the caller has not found it out), straight to the kernel below autograd, where the registered
    autograd would send it, without its Python round trip (a few microseconds, as much as a whole
    small step). An autocast rule (autocast.py) still applies: autocast dispatches above autograd,
    and with nothing saved for backward it may cast here."""
    if not (_eager() if eager is None else eager):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _autocast_rule_applies(op, input):
    """Whether an autocast region is on for `input`'s device and `op` has an autocast rule for that
    device (autocast.py). The rule casts above autograd, so that autograd saves the cast tensors;
    below it, as in _EagerLayer.forward, the op would run on cast tensors while setup_context saved
    the uncast ones, and the backward op would get gradients and saved tensors of different dtypes.
    Looked up on every call: registrations can come and go (a torch.library.Library's lifetime)."""
    device = input.device.type
    return (torch._C._is_autocast_available(device) and torch.is_autocast_enabled(device)
            and torch._C._dispatch_has_kernel_for_dispatch_key(
                op.name(), "Autocast" + torch._C._dispatch_key_for_device(device)))


def _call_layer(mode, eager, *args):
    """The `mode` layer op on args, which end with save_reserve: differentiable when that is true.
    Where `eager` (_eager()), through _EagerLayer, except where an autocast rule applies: that needs
    the dispatcher."""
    layer = _LAYERS[mode]
    if not args[-1]:
        return _call(layer.op, *args, eager=eager)
    if not eager or (torch._C._is_any_autocast_enabled() and _autocast_rule_applies(layer.op, args[0])):
        return layer.op(*args)
    return _eager_layer_apply(*args, layer)


# ---- one layer direction, as the modules call it -----------------------------------------


# The torch.func transforms that differentiate, which the ops' registered autograd cannot serve:
# torch's register_autograd makes an autograd.Function that grad, vjp, jacrev and hessian refuse in
# torch 2.13 (pytorch/pytorch#179652), and a custom op has no forward-mode derivative, so under jvp
# and jacfwd its outputs would carry zero tangents, silently. vmap alone runs the ops (PyTorch's
# per-sample fallback).
_DIFFERENTIATING_TRANSFORMS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def _runs_as_composite(compiling, stack, tensors):
    """Whether a layer call runs as plain torch ops (composite.layer), which every autograd mode
    differentiates, as torch.nn's CPU layers are: inside a differentiating torch.func transform (on
    functorch's interpreter `stack`), or with a forward-mode AD tangent (torch.autograd.forward_ad)
    on any of `tensors` (the fused ops would drop it, under no_grad too). Not in a torch.jit.trace,
    nor while `compiling` (a torch.compile trace) unless a forward-mode AD level is open there
    (torch.func.jvp's, or forward_ad.dual_level's): Dynamo cannot read the interpreter stack, nor
    tangents, but sees that level."""
    if compiling:
        return forward_ad._current_level >= 0
    needed = (bool(stack) and any(interpreter.key() in _DIFFERENTIATING_TRANSFORMS for interpreter in stack)) or (
        forward_ad._current_level >= 0
        and any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors))
    return needed and not torch.jit.is_tracing()


def _batched_requires_grad(t):
    """Inside vmap, whether the tensor that t's batched wrappers hold requires grad: they do not
    show it (an ensemble's stacked parameters under torch.func.functional_call), while autograd,
    below vmap, sees it."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.requires_grad


def run_layer(mode, input, batch_sizes, hx, cx, weights, reverse):
    """Runs one direction of one layer. `mode` is LSTM, GRU, RNN_TANH or RNN_RELU; `weights`
    is (w_ih, w_hh, b_ih, b_hh, w_hr) with None for absent tensors. Returns (output, h_n, c_n),
    c_n None except for LSTM."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    tensors = (input, hx, cx, *weights)
    compiling = torch.compiler.is_compiling()
    stack = None if compiling else torch._C._functorch.get_interpreter_stack()
    if (stack is not None or forward_ad._current_level >= 0) and _runs_as_composite(compiling, stack, tensors):
        op_mode = "rnn" if mode.startswith("RNN") else mode.lower()
        return composite.layer(op_mode, input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                               mode == "RNN_RELU")
    # Activations are kept for backward only when something here can be differentiated; always in a
    # torch.jit.trace, whose graph fixes the choice for every later call, training ones included.
    tracing = torch.jit.is_tracing()
    save = tracing or (torch.is_grad_enabled() and any(
        t is not None and (t.requires_grad or (stack is not None and _batched_requires_grad(t))) for t in tensors))
    eager = not (compiling or tracing or stack is not None)  # as _eager()
    if mode == "LSTM":
        out, hy, cy, _ = _call_layer("lstm", eager, input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                     save)
        return out, hy, cy
    if mode == "GRU":
        out, hy, _ = _call_layer("gru", eager, input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, reverse, save)
    else:
        out, hy, _ = _call_layer("rnn", eager, input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, mode == "RNN_RELU",
                                 reverse, save)
    return out, hy, None
