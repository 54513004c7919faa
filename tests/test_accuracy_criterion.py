"""The accuracy criterion the CUDA parity tests (test_cuda.py) hold fused_rnn to, checked here on
the CPU: against a float64 truth, fused_rnn's error is within 1.5x of torch.nn's plus a rounding
floor (helpers.assert_results_at_least_as_accurate); and the truth itself (helpers.Float64Truth)
is torch.nn in float64, one layer at a time on what each layer receives."""
import copy

import pytest
import torch
from torch import nn

from helpers import (LAYER_GRID_ARGS, LAYER_KINDS, PROJ_SIZE, SCALED_TOLERANCE, Float64Truth,
                     assert_results_at_least_as_accurate, assert_same_results, layer_call, layer_grid, layer_leaves,
                     make_kind_pair, named_outputs_and_grads, rounding_floor)

pytestmark = pytest.mark.usefixtures("torch_test_state")

FLOAT32_FLOOR = rounding_floor(torch.float32)


# ---- the criterion, on synthetic results ---------------------------------------------------------

def exact_result():
    """A float64 named_outputs_and_grads-like result: two outputs, three gradients, some of them
    larger than 1 (relative_error divides by max(1, max |truth|))."""
    g = torch.Generator().manual_seed(0)
    outputs = [torch.randn(4, 3, 10, generator=g, dtype=torch.float64), torch.randn(2, 3, 10, generator=g,
                                                                                      dtype=torch.float64)]
    grads = {name: scale * torch.randn(40, 10, generator=g, dtype=torch.float64)
             for name, scale in (("input", 0.5), ("param.weight_ih_l0", 3.0), ("param.weight_hh_l0", 8.0))}
    return outputs, grads


def off_by(result, error, dtype=torch.float32):
    """`result` in `dtype` with one element of each tensor moved by `error` times max(1, max |t|)
    (its relative_error, beside dtype's own rounding)."""
    def moved(t, k):
        t = t.clone()
        t.view(-1)[k % t.numel()] += error * max(1.0, t.abs().max().item())
        return t.to(dtype)
    outputs, grads = result
    return [moved(t, k) for k, t in enumerate(outputs)], {n: moved(t, 7 * k) for k, (n, t) in enumerate(grads.items())}


def test_a_result_nearer_the_truth_passes_where_a_plain_tolerance_against_the_reference_fails():
    """What the first GPU run found: cuDNN in float32 1.5e-5 off the truth, fused_rnn 3e-7. The two
    differ by more than the 1e-5 a direct comparison allows, yet fused_rnn is the more accurate."""
    exact = exact_result()
    theirs, ours = off_by(exact, 1.5e-5), off_by(exact, 3e-7)
    with pytest.raises(AssertionError):
        assert_same_results(ours, theirs, SCALED_TOLERANCE[torch.float32])
    assert_results_at_least_as_accurate(ours, theirs, exact, FLOAT32_FLOOR)


@pytest.mark.parametrize("our_error", [3e-5, 1e-3])
def test_a_result_further_from_the_truth_than_the_reference_fails(our_error):
    exact = exact_result()
    with pytest.raises(AssertionError, match="outputs: error"):
        assert_results_at_least_as_accurate(off_by(exact, our_error), off_by(exact, 1.5e-5), exact, FLOAT32_FLOOR)


def test_the_floor_allows_rounding_noise_but_not_more():
    """Against a reference exact to its last bit, a result a few float32 roundings off passes; one
    past the floor fails, however small."""
    exact = exact_result()
    theirs = off_by(exact, 0.0)
    assert_results_at_least_as_accurate(off_by(exact, 5e-7), theirs, exact, FLOAT32_FLOOR)
    with pytest.raises(AssertionError):
        assert_results_at_least_as_accurate(off_by(exact, 3e-6), theirs, exact, FLOAT32_FLOOR)


def test_only_gradients_off_fail_as_gradients():
    exact = exact_result()
    ours = (off_by(exact, 0.0)[0], off_by(exact, 1e-3)[1])
    with pytest.raises(AssertionError, match="gradients: error"):
        assert_results_at_least_as_accurate(ours, off_by(exact, 1e-5), exact, FLOAT32_FLOOR)


def test_other_dtypes_fail():
    exact = exact_result()
    with pytest.raises(AssertionError, match="dtypes differ"):
        assert_results_at_least_as_accurate(off_by(exact, 0.0, torch.float64), off_by(exact, 1e-5), exact,
                                            FLOAT32_FLOOR)


def test_rounding_floor_values():
    assert rounding_floor(torch.float32) == pytest.approx(1.01e-6, rel=1e-2)
    assert rounding_floor(torch.float16) == pytest.approx(4.89e-4, rel=1e-2)
    assert rounding_floor(torch.bfloat16) == pytest.approx(3.91e-3, rel=1e-2)


# ---- the truth -----------------------------------------------------------------------------------

# Two layers, both directions or one, with a projection or not, h0 or not, over the input forms;
# batch-first without biases (test_truth_rounds_what_each_layer_receives is time-major with them).
TRUTH_GRID = list(layer_grid(LAYER_KINDS, [2], [False, True], [True], [False], [False, True], [False, True],
                             ["3d", "unbatched", "packed_unsorted"]))


@pytest.mark.parametrize(LAYER_GRID_ARGS, TRUTH_GRID)
def test_truth_of_a_float64_module_is_the_module(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0,
                                                 form):
    """Layer by layer, with nothing to round, the truth is torch.nn's float64 module: outputs,
    h_n (c_n) and the gradients of every input and parameter, by the same names."""
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                  dtype=torch.float64)
    if proj:
        kwargs["proj_size"] = PROJ_SIZE
    module, _ = make_kind_pair(kind, 4, 10, **kwargs)
    leaves, call = layer_leaves(kind, module, form, with_h0, torch.float64), layer_call(kind, form)
    assert_same_results(named_outputs_and_grads(Float64Truth(module, torch.float64), leaves, call),
                        named_outputs_and_grads(module, leaves, call), SCALED_TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_truth_rounds_what_each_layer_receives(dtype):
    """A 2-layer module in `dtype` (or a float32 one under autocast to `dtype`): the truth is the
    float64 second layer on the float64 first layer's output rounded to `dtype`, both layers on
    their inputs and weights rounded to `dtype`."""
    module = nn.GRU(4, 10, num_layers=2)
    x, h0 = torch.randn(5, 3, 4), torch.randn(2, 3, 10)
    truth_output, truth_h_n = Float64Truth(module, dtype)(x.double(), h0.double())

    def layer(k, layer_input):
        single = nn.GRU(layer_input.shape[-1], 10, dtype=torch.float64)
        with torch.no_grad():
            for name, p in single.named_parameters():
                p.copy_(getattr(module, name.replace("_l0", f"_l{k}")).to(dtype))
        return single(layer_input.to(dtype).double(), h0[k:k + 1].to(dtype).double())

    first_output, first_h_n = layer(0, x)
    second_output, second_h_n = layer(1, first_output)
    torch.testing.assert_close(truth_output, second_output, rtol=0, atol=0)
    torch.testing.assert_close(truth_h_n, torch.cat([first_h_n, second_h_n]), rtol=0, atol=0)
    unrounded = copy.deepcopy(module).double()(x.double(), h0.double())[0]
    assert not torch.equal(truth_output, unrounded)
