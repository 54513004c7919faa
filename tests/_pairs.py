"""Helpers for the compile/export/distributed/convert/property/long-sequence tests: torch.nn and
fused_rnn twins built from one seed, and outputs plus gradients of a loss that gives every
output element its own upstream gradient."""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fused_rnn


def make_pair(class_name, *args, seed=0, **kwargs):
    """(torch.nn.<class_name>(*args, **kwargs), fused_rnn.<class_name>(...)), each built right
    after torch.manual_seed(seed), so both draw the same initial weights."""
    torch.manual_seed(seed)
    reference = getattr(nn, class_name)(*args, **kwargs)
    torch.manual_seed(seed)
    fused = getattr(fused_rnn, class_name)(*args, **kwargs)
    return reference, fused


def flat_tensors(output):
    """The tensors in a nested module output, in order; a PackedSequence contributes its data."""
    if isinstance(output, PackedSequence):
        return [output.data]
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in flat_tensors(item)]
    return [] if output is None else [output]


def weighted_sum(tensors):
    """sum_k <tensors[k], W_k> for fixed pseudo-random W_k: a scalar loss whose gradient differs
    per element, so a swapped or misplaced gradient cannot cancel out."""
    loss = 0
    for k, tensor in enumerate(tensors):
        weights = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1000 + k), dtype=tensor.dtype)
        loss = loss + (tensor * weights.to(tensor.device)).sum()
    return loss


def outputs_and_grads(function, wrt):
    """Runs `function()` and returns (its output tensors, the gradients of weighted_sum over
    them with respect to each tensor in `wrt`)."""
    outputs = flat_tensors(function())
    grads = torch.autograd.grad(weighted_sum(outputs), list(wrt))
    return outputs, list(grads)


def assert_all_close(actual, expected, **tolerance):
    """Pairwise torch.testing.assert_close over two equally long lists of tensors."""
    assert len(actual) == len(expected), f"{len(actual)} tensors != {len(expected)}"
    for k, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **tolerance, msg=lambda message, k=k: f"tensor {k}: {message}")


def assert_all_equal(actual, expected):
    """Pairwise bitwise equality (values, shapes and dtypes) of two lists of tensors."""
    assert len(actual) == len(expected), f"{len(actual)} tensors != {len(expected)}"
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert (a.dtype, a.shape) == (e.dtype, e.shape), f"tensor {k}: {a.dtype} {a.shape} != {e.dtype} {e.shape}"
        assert torch.equal(a, e), f"tensor {k} differs, max abs diff {(a - e).abs().max().item()}"


def assert_twins_agree(reference, fused, call, leaves, **tolerance):
    """`call(module)` gives the same outputs and the same gradients (with respect to `leaves`
    and to every parameter) for the torch.nn module and its fused twin."""
    results = []
    for module in (reference, fused):
        results.append(outputs_and_grads(lambda: call(module), [*leaves, *module.parameters()]))
    (ref_outputs, ref_grads), (fused_outputs, fused_grads) = results
    assert_all_close(fused_outputs, ref_outputs, **tolerance)
    assert_all_close(fused_grads, ref_grads, **tolerance)
