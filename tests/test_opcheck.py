"""torch.library.opcheck (schema, autograd registration, fake kernel, AOT dispatch) on every
fused_rnn op with representative arguments."""
import pytest
from torch.library import opcheck

from conftest import BACKWARD_OPS, LAYER_KINDS, LAYER_OPS, layer_backward_op_args, layer_op_args, layer_op_tensors

pytestmark = pytest.mark.usefixtures("torch_test_state")

# (packed, reverse, bias, proj) for each op; proj only where the kind is LSTM.
VARIANTS = [
    (False, False, True, False),
    (True, True, True, False),
    (False, True, False, False),
    (True, False, False, False),
]
LSTM_PROJ_VARIANTS = [(False, False, True, True), (True, True, False, True)]
CASES = [(kind, *v) for kind in LAYER_KINDS for v in VARIANTS + (LSTM_PROJ_VARIANTS if kind == "LSTM" else [])]


def case_id(case):
    kind, packed, reverse, bias, proj = case
    return "-".join([kind, "packed" if packed else "unpacked", "reverse" if reverse else "forward",
                     "bias" if bias else "nobias"] + (["proj"] if proj else []))


def assert_opcheck_passes(op, args):
    results = opcheck(op, args)
    assert results and all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("kind,packed,reverse,bias,proj", CASES, ids=[case_id(c) for c in CASES])
def test_forward_op(kind, packed, reverse, bias, proj, requires_grad):
    tensors = layer_op_tensors(kind, packed, bias, proj, requires_grad=requires_grad)
    assert_opcheck_passes(LAYER_OPS[kind], layer_op_args(kind, tensors, reverse))


@pytest.mark.parametrize("kind,packed,reverse,bias,proj", CASES, ids=[case_id(c) for c in CASES])
def test_backward_op(kind, packed, reverse, bias, proj):
    tensors = layer_op_tensors(kind, packed, bias, proj, requires_grad=False)
    assert_opcheck_passes(BACKWARD_OPS[kind], layer_backward_op_args(kind, tensors, reverse))
