"""torch.library.opcheck (schema, autograd registration, fake kernel, AOT dispatch) on every
fused_rnn op with representative arguments."""
import pytest

from helpers import (OPCHECK_CASE_ARGS, OPCHECK_CASE_IDS, OPCHECK_CASES, assert_backward_op_opcheck_passes,
                     assert_layer_op_opcheck_passes)

pytestmark = pytest.mark.usefixtures("torch_test_state")


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize(OPCHECK_CASE_ARGS, OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
def test_forward_op(kind, packed, reverse, bias, proj, requires_grad):
    assert_layer_op_opcheck_passes(kind, packed, reverse, bias, proj, requires_grad=requires_grad)


@pytest.mark.parametrize(OPCHECK_CASE_ARGS, OPCHECK_CASES, ids=OPCHECK_CASE_IDS)
def test_backward_op(kind, packed, reverse, bias, proj):
    assert_backward_op_opcheck_passes(kind, packed, reverse, bias, proj)
