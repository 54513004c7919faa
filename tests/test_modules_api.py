"""The module API is torch.nn's: constructor, attributes, parameters, repr, state_dict,
dtype conversion, pickling, functional_call, edge-case inputs, and the package helpers."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call

import fused_rnn
from helpers import (CELL_KINDS, LAYER_KINDS, assert_close_nested, assert_close_scaled,
                     assert_same_outputs_and_grads, assert_state_dicts_identical, leaf, leaves_and_params,
                     make_kind_pair, make_pair, output_tensors, weighted_loss_grads)

pytestmark = pytest.mark.usefixtures("torch_test_state")

LAYER_ATTRIBUTES = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                    "bidirectional", "proj_size", "training"]
CELL_ATTRIBUTES = ["input_size", "hidden_size", "bias", "training"]

# Representative layer configurations: (class name, positional args, keyword args).
LAYER_CONFIGS = {
    "LSTM-default": ("LSTM", (4, 5), {}),
    "LSTM-proj-bi-2layer": ("LSTM", (4, 5, 2), dict(proj_size=3, bidirectional=True, dropout=0.25)),
    "GRU-nobias-bf": ("GRU", (4, 5, 2), dict(bias=False, batch_first=True)),
    "RNN-relu-bi": ("RNN", (4, 5), dict(nonlinearity="relu", bidirectional=True)),
    "RNN-tanh-3layer": ("RNN", (4, 5, 3), {}),
}
CELL_CONFIGS = {
    "LSTMCell": ("LSTMCell", (4, 5), {}),
    "GRUCell-nobias": ("GRUCell", (4, 5), dict(bias=False)),
    "RNNCell-relu": ("RNNCell", (4, 5), dict(nonlinearity="relu")),
    "RNNCell-tanh-nobias": ("RNNCell", (4, 5, False), {}),
}
ALL_CONFIGS = {**LAYER_CONFIGS, **CELL_CONFIGS}


def config_pair(name, seed=0, **overrides):
    class_name, args, kwargs = ALL_CONFIGS[name]
    return make_pair(class_name, *args, seed=seed, **kwargs, **overrides)


def attributes_of(module):
    names = CELL_ATTRIBUTES if isinstance(module, (nn.RNNCellBase, fused_rnn.RNNCellBase)) else LAYER_ATTRIBUTES
    names = names + (["nonlinearity"] if hasattr(module, "nonlinearity") else [])
    return {n: getattr(module, n) for n in names}


def sample_input(module, dtype=torch.float32, batch=3, steps=4):
    if isinstance(module, (nn.RNNCellBase, fused_rnn.RNNCellBase)):
        return torch.randn(batch, module.input_size, dtype=dtype)
    shape = (batch, steps) if module.batch_first else (steps, batch)
    return torch.randn(*shape, module.input_size, dtype=dtype)


def forward_no_grad(module, x, *rest):
    """module(x, *rest) without autograd, from a fixed RNG state (so dropout draws agree)."""
    torch.manual_seed(5)
    with torch.no_grad():
        return module(x, *rest)


# ---- constructor and attributes ---------------------------------------------------------

POSITIONAL_CASES = {
    "RNN-all-positional": ("RNN", (10, 20, 2, "relu", False, True, 0.0, True)),
    "LSTM-all-positional-proj": ("LSTM", (10, 20, 2, False, True, 0.0, True, 5)),
    "GRU-all-positional": ("GRU", (10, 20, 2, False, True, 0.5, True)),
    "RNN-defaults": ("RNN", (10, 20)),
    "LSTM-defaults": ("LSTM", (10, 20)),
    "GRU-defaults": ("GRU", (10, 20)),
    "RNNCell-positional": ("RNNCell", (10, 20, False, "relu")),
    "LSTMCell-positional": ("LSTMCell", (10, 20, False)),
    "GRUCell-positional": ("GRUCell", (10, 20, False)),
    "RNNCell-defaults": ("RNNCell", (10, 20)),
}


@pytest.mark.parametrize("name", list(POSITIONAL_CASES))
def test_positional_constructor_and_defaults_match_nn(name):
    class_name, args = POSITIONAL_CASES[name]
    ref, ours = make_pair(class_name, *args)
    assert attributes_of(ours) == attributes_of(ref)
    assert_state_dicts_identical(ref, ours)


def test_positional_arguments_land_in_the_right_attributes():
    rnn = fused_rnn.RNN(10, 20, 2, "relu", False, True, 0.0, True)
    assert (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.nonlinearity, rnn.bias, rnn.batch_first,
            rnn.dropout, rnn.bidirectional, rnn.mode) == (10, 20, 2, "relu", False, True, 0.0, True, "RNN_RELU")
    lstm = fused_rnn.LSTM(10, 20, 2, False, True, 0.0, True, 5)
    assert (lstm.num_layers, lstm.bias, lstm.batch_first, lstm.bidirectional, lstm.proj_size) == (2, False, True,
                                                                                                  True, 5)


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_attributes_parameters_and_repr_match_nn(name):
    ref, ours = config_pair(name)
    assert attributes_of(ours) == attributes_of(ref)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
    assert_state_dicts_identical(ref, ours)
    assert repr(ours) == repr(ref)
    assert ours.extra_repr() == ref.extra_repr()


@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_flat_weights_and_all_weights_match_nn(name):
    ref, ours = config_pair(name)
    assert ours._flat_weights_names == ref._flat_weights_names
    assert [[tuple(w.shape) for w in ws] for ws in ours.all_weights] == \
        [[tuple(w.shape) for w in ws] for ws in ref.all_weights]
    for our_ws, ref_ws in zip(ours.all_weights, ref.all_weights):
        assert all(torch.equal(a, b) for a, b in zip(our_ws, ref_ws))
    # all_weights holds the module's own Parameters, not copies.
    assert [id(w) for ws in ours.all_weights for w in ws] == [id(p) for p in ours.parameters()]


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_reset_parameters_consumes_rng_like_nn(name):
    ref, ours = config_pair(name)
    for module in (ref, ours):
        torch.manual_seed(99)
        module.reset_parameters()
    assert_state_dicts_identical(ref, ours)


# ---- state_dict, dtype conversion, pickling ---------------------------------------------------

@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_state_dict_loads_both_ways_strict(name):
    ref, ours = config_pair(name, seed=0)
    other_ref, other_ours = config_pair(name, seed=1)
    x = sample_input(ours)

    ours_from_nn = other_ours
    ours_from_nn.load_state_dict(ref.state_dict(), strict=True)
    assert_close_nested(forward_no_grad(ours_from_nn, x), forward_no_grad(ref, x), torch.float32)

    nn_from_ours = other_ref
    nn_from_ours.load_state_dict(ours.state_dict(), strict=True)
    assert_close_nested(forward_no_grad(ours, x), forward_no_grad(nn_from_ours, x), torch.float32)


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_dtype_conversions(name):
    ref, ours = config_pair(name)
    for convert, dtype in [(lambda m: m.to(torch.float64), torch.float64), (lambda m: m.float(), torch.float32),
                           (lambda m: m.double(), torch.float64)]:
        ref, ours = convert(ref), convert(ours)
        assert all(p.dtype == dtype for p in ours.parameters())
        assert_state_dicts_identical(ref, ours)
        x = sample_input(ours, dtype)
        out = forward_no_grad(ours, x)
        assert_close_nested(out, forward_no_grad(ref, x), dtype)
        assert all(t.dtype == dtype for t in output_tensors(out))


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
@pytest.mark.parametrize("clone", [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy],
                         ids=["pickle", "deepcopy"])
def test_pickle_and_deepcopy(name, clone):
    _, ours = config_pair(name)
    copied = clone(ours)
    assert type(copied) is type(ours)
    assert repr(copied) == repr(ours)
    assert_state_dicts_identical(ours, copied)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copied.parameters(), ours.parameters()))
    x = sample_input(ours)
    assert_close_nested(forward_no_grad(copied, x), forward_no_grad(ours, x), torch.float32)


# ---- functional_call, flatten_parameters ------------------------------------------------------

@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_functional_call_with_replacement_params_matches_nn(name):
    ref, ours = config_pair(name, dtype=torch.float64)
    replacement = {n: leaf(*p.shape) for n, p in ours.named_parameters()}
    leaves = {"input": sample_input(ours, torch.float64).requires_grad_(), **replacement}

    def call(m):
        torch.manual_seed(5)
        return functional_call(m, replacement, (leaves["input"],))

    our_out, _ = assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64, module_params=False)
    # The replacement really was used, and the module's own parameters are untouched.
    own = forward_no_grad(ours, leaves["input"])
    assert not torch.allclose(output_tensors(own)[0], output_tensors(our_out)[0])
    assert_state_dicts_identical(ref, ours)


@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_flatten_parameters_is_a_harmless_no_op(name):
    ref, ours = config_pair(name)
    x = sample_input(ours)
    before = forward_no_grad(ours, x)
    assert ours.flatten_parameters() is None
    ref.flatten_parameters()
    assert_state_dicts_identical(ref, ours)
    assert_close_nested(forward_no_grad(ours, x), before, torch.float32)


# ---- edge-case inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_zero_batch_gives_nn_shapes_and_grads(name):
    ref, ours = config_pair(name, dtype=torch.float64)
    leaves = {"input": sample_input(ours, torch.float64, batch=0).requires_grad_()}

    def call(m):
        torch.manual_seed(5)
        return m(leaves["input"])

    our_out, _ = assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64)
    assert all(0 in t.shape for t in output_tensors(our_out))


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_non_contiguous_input_and_state_match_contiguous(kind):
    ref, ours = make_kind_pair(kind, 4, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    # A time-major view of a batch-major tensor, taking every other feature.
    x = leaf(3, 4, 8).transpose(0, 1)[..., ::2]
    h0 = leaf(3, 4, 5).transpose(0, 1)
    c0 = leaf(5, 3, 4).permute(2, 1, 0)
    assert not x.is_contiguous() and not h0.is_contiguous() and not c0.is_contiguous()
    hx = (h0, c0) if kind == "LSTM" else h0
    contiguous_hx = (h0.contiguous(), c0.contiguous()) if kind == "LSTM" else h0.contiguous()
    assert_close_nested(forward_no_grad(ours, x, hx), forward_no_grad(ours, x.contiguous(), contiguous_hx),
                        torch.float64)
    leaves = {"input": x, "h0": h0, "c0": c0} if kind == "LSTM" else {"input": x, "h0": h0}
    assert_same_outputs_and_grads(ref, ours, leaves, lambda m: m(x, hx), torch.float64)


@pytest.mark.parametrize("kind", list(LAYER_KINDS) + list(CELL_KINDS))
def test_non_contiguous_parameters_match_nn(kind):
    """Transposed weight views and strided bias views, swapped in with functional_call."""
    kwargs = {} if kind in CELL_KINDS else dict(num_layers=2, bidirectional=True)
    ref, ours = make_kind_pair(kind, 4, 5, dtype=torch.float64, **kwargs)
    params = {n: leaf(*reversed(p.shape)).t() if p.dim() == 2 else leaf(2 * p.shape[0])[::2]
              for n, p in ours.named_parameters()}
    assert not any(p.is_contiguous() for p in params.values())
    leaves = {"input": sample_input(ours, torch.float64).requires_grad_(), **params}
    call = lambda m: functional_call(m, params, (leaves["input"],))  # noqa: E731
    assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64, module_params=False)


@pytest.mark.parametrize("dtype,hidden", [(torch.float64, 5), (torch.float32, 10)], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS) + list(CELL_KINDS))
def test_nan_in_input_propagates_like_nn(kind, dtype, hidden):
    # hidden covers one full SIMD vector plus a scalar tail for the dtype.
    is_cell = kind in CELL_KINDS
    kwargs = {} if is_cell else dict(num_layers=2, bidirectional=True)
    ref, ours = make_kind_pair(kind, 4, hidden, dtype=dtype, **kwargs)
    x = torch.randn(3, 4, dtype=dtype) if is_cell else torch.randn(4, 3, 4, dtype=dtype)
    x[1, 2] = float("nan")  # cell: one row; layer: time step 1 of batch 2 only
    ref_out, our_out = forward_no_grad(ref, x), forward_no_grad(ours, x)
    for ours_t, ref_t in zip(output_tensors(our_out), output_tensors(ref_out), strict=True):
        assert torch.isnan(ref_t).any()
        assert torch.equal(torch.isnan(ours_t), torch.isnan(ref_t))
    assert_close_nested(our_out, ref_out, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", [k for k in list(LAYER_KINDS) + list(CELL_KINDS) if "RELU" not in k])
def test_saturated_activations_match_nn(kind, dtype):
    """Pre-activations far past where sigmoid and tanh saturate (biases of up to ~500; an LSTM's
    cell state growing by about 1 a step, to ~40-60, or starting there in a cell) give torch.nn's
    outputs and gradients, not NaN. 37 units: full vectors and a scalar tail. In float32 the
    gradients through saturated gates are ill-conditioned for both (torch.nn's and ours 1e-4 of
    their scale off a float64 run, LSTM): compared to 1e-3 of their scale."""
    is_cell = kind in CELL_KINDS
    ref, ours = make_kind_pair(kind, 4, 37, dtype=dtype, **({} if is_cell else dict(num_layers=2)))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
            if name.startswith("bias"):
                p.copy_(150 * torch.randn(p.shape, generator=generator, dtype=dtype))
                q.copy_(p)
    batch, lstm = 3, kind.startswith("LSTM")
    if is_cell:
        leaves = {"input": leaf(batch, 4, dtype=dtype), "h0": leaf(batch, 37, dtype=dtype)}
        if lstm:
            leaves["c0"] = (60 * torch.randn(batch, 37, generator=generator, dtype=dtype)).requires_grad_()
    else:
        leaves = {"input": leaf(60, batch, 4, dtype=dtype), "h0": leaf(2, batch, 37, dtype=dtype)}
        if lstm:
            leaves["c0"] = leaf(2, batch, 37, dtype=dtype)
    state = (leaves["h0"], leaves["c0"]) if lstm else leaves["h0"]
    call = lambda m: m(leaves["input"], state)  # noqa: E731
    if dtype == torch.float64:
        our_out, _ = assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)
    else:
        ref_out, our_out = call(ref), call(ours)
        assert_close_nested(our_out, ref_out, dtype)
        ref_grads = weighted_loss_grads(ref_out, leaves_and_params(ref, leaves))
        our_grads = weighted_loss_grads(our_out, leaves_and_params(ours, leaves))
        for name in ref_grads:
            assert_close_scaled(our_grads[name], ref_grads[name], 1e-3, f"grad of {name}")
    assert not any(torch.isnan(t).any() for t in output_tensors(our_out))


# ---- package helpers --------------------------------------------------------------------------

def test_backends_and_version():
    backends = fused_rnn.backends()
    assert set(backends) == {"cpu", "cuda"}
    assert backends["cpu"] is True
    assert isinstance(backends["cuda"], bool)
    assert isinstance(fused_rnn.__version__, str) and fused_rnn.__version__


def test_public_names():
    for name in ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]:
        assert issubclass(getattr(fused_rnn, name), nn.Module)
    assert issubclass(fused_rnn.LSTM, fused_rnn.RNNBase)
    assert issubclass(fused_rnn.GRUCell, fused_rnn.RNNCellBase)


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("kind", list(LAYER_KINDS) + list(CELL_KINDS))
def test_parametrized_weights_are_used(kind):
    """A weight behind torch.nn.utils.parametrize (a property, no longer a parameter) is what the
    layer computes with, in the forward and in its gradients."""
    _, ours = make_kind_pair(kind, 4, 5, dtype=torch.float64)
    name = "weight_hh" if kind in CELL_KINDS else "weight_hh_l0"
    doubled = copy.deepcopy(ours)
    with torch.no_grad():
        getattr(doubled, name).mul_(2)
    torch.nn.utils.parametrize.register_parametrization(ours, name, Doubled())
    x = sample_input(ours, torch.float64)
    expected, got = output_tensors(doubled(x)), output_tensors(ours(x))
    assert_close_nested(got, expected, torch.float64)
    sum(t.sum() for t in got).backward()
    sum(t.sum() for t in expected).backward()
    original = ours.parametrizations[name].original
    assert_close_nested(original.grad, 2 * getattr(doubled, name).grad, torch.float64)


@pytest.mark.parametrize("kind", list(LAYER_KINDS) + list(CELL_KINDS))
def test_vmap_over_inputs_matches_a_loop(kind):
    """torch.func.vmap runs the layers (by PyTorch's per-sample fallback: the ops have no batching
    rule) and gives what a loop over the samples gives."""
    _, ours = make_kind_pair(kind, 4, 5, dtype=torch.float64)
    samples = torch.stack([sample_input(ours, torch.float64) for _ in range(3)])
    mapped = torch.func.vmap(lambda x: tuple(output_tensors(ours(x))))(samples)
    for k, x in enumerate(samples):
        assert_close_nested([t[k] for t in mapped], output_tensors(ours(x)), torch.float64)
