"""torch.library.opcheck (schema, autograd registration, fake kernel, AOT dispatch) on every
fused_rnn op with representative arguments."""
import pytest
import torch

from helpers import (BACKWARD_OPS, OPCHECK_CASE_ARGS, OPCHECK_CASE_IDS, OPCHECK_CASES, assert_backward_op_opcheck_passes,
                     assert_layer_op_opcheck_passes, assert_opcheck_passes, layer_backward_op_args, layer_op_tensors)

pytestmark = pytest.mark.usefixtures("torch_test_state")


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize(OPCHECK_CASE_ARGS, OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
def test_forward_op(kind, packed, reverse, bias, proj, requires_grad):
    assert_layer_op_opcheck_passes(kind, packed, reverse, bias, proj, requires_grad=requires_grad)


@pytest.mark.parametrize(OPCHECK_CASE_ARGS, OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
def test_backward_op(kind, packed, reverse, bias, proj):
    assert_backward_op_opcheck_passes(kind, packed, reverse, bias, proj)


def _strided_like(grad):
    """grad's values in a tensor whose rows are spaced wider than they are long (as a direction's
    half of a bidirectional layer's gradient)."""
    wide = torch.randn(*grad.shape[:-1], 2 * grad.shape[-1] + 1, dtype=grad.dtype)
    view = wide.narrow(-1, 1, grad.shape[-1])
    view.copy_(grad)
    return view


@pytest.mark.parametrize(OPCHECK_CASE_ARGS, OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
def test_backward_op_reads_any_layout_of_the_output_gradient(kind, packed, reverse, bias, proj):
    tensors = layer_op_tensors(kind, packed, bias, proj, requires_grad=False)
    args = layer_backward_op_args(kind, tensors, reverse)
    grad_out = args[0]
    broadcast = torch.randn(grad_out.shape[-1], dtype=grad_out.dtype).expand_as(grad_out)
    for layout, dense in ((_strided_like(grad_out), grad_out), (broadcast, broadcast.contiguous())):
        assert not layout.is_contiguous()
        expected, found = BACKWARD_OPS[kind](dense, *args[1:]), BACKWARD_OPS[kind](layout, *args[1:])
        for e, f in zip(expected, found):
            assert torch.equal(e, f)
    assert_opcheck_passes(BACKWARD_OPS[kind], (_strided_like(grad_out), *args[1:]))


@pytest.mark.parametrize("input_grad, weight_grads, hx_grad", [(False, True, True), (True, False, True),
                                                                (False, False, True), (True, True, False),
                                                                (False, False, False)])
@pytest.mark.parametrize(OPCHECK_CASE_ARGS, OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
def test_backward_op_leaves_out_unwanted_gradients(kind, packed, reverse, bias, proj, input_grad, weight_grads,
                                                   hx_grad):
    tensors = layer_op_tensors(kind, packed, bias, proj, requires_grad=False)
    args = layer_backward_op_args(kind, tensors, reverse)
    flags = (input_grad, weight_grads, hx_grad)
    full, partial = BACKWARD_OPS[kind](*args), BACKWARD_OPS[kind](*args, *flags)
    # (input, hx[, cx]) come first, then the weights' and biases' gradients.
    states = 3 if kind == "LSTM" else 2
    wanted = [input_grad, hx_grad] + [True] * (states - 2) + [weight_grads] * (len(full) - states)
    for f, p, want in zip(full, partial, wanted):
        assert torch.equal(f, p) if want else p.numel() == 0
    assert full[0].shape == tensors["input"].shape and full[1].shape == tensors["hx"].shape
    assert full[states].shape == tensors["w_ih"].shape
    assert_opcheck_passes(BACKWARD_OPS[kind], (*args, *flags))
