"""torch.func's transforms and forward-mode AD over the layers and cells, against torch.nn: grad,
vjp, jacrev, jvp, jacfwd, hessian and torch.autograd.forward_ad give what torch.nn's give (which
differentiates them as plain torch ops on CPU), and vmap(grad) per-sample gradients what a loop of
ordinary backward passes gives (torch.nn's layers have no batching rule). Outside those, the fused
ops still run."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn
from helpers import (BATCH, CELL_KINDS, INPUT_SIZE, LAYER_KINDS, PACKED_LENGTHS, PROJ_SIZE, assert_close_nested,
                     layer_leaves, make_kind_pair, output_tensors, weighted_loss)

pytestmark = pytest.mark.usefixtures("torch_test_state")

HIDDEN, DTYPE = 5, torch.float64
# (kind, num_layers, bidirectional, proj, form): one plain layer per kind, then stacks with both
# directions (and an LSTM projection), on each input form.
LAYER_CASES = ([(kind, 1, False, False, "3d") for kind in LAYER_KINDS]
               + [(kind, 2, True, kind == "LSTM", form) for kind in LAYER_KINDS
                  for form in ("3d", "unbatched", "packed_unsorted")])


def case_id(case):
    kind, layers, bidirectional, proj, form = case
    return f"{kind}-L{layers}-{'bi' if bidirectional else 'uni'}{'-proj' if proj else ''}-{form}"


def layer_pair(kind, layers, bidirectional, proj):
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, dtype=DTYPE)
    if proj:
        kwargs["proj_size"] = PROJ_SIZE
    return make_kind_pair(kind, INPUT_SIZE, HIDDEN, **kwargs)


def layer_function(module, kind, form):
    """f(x, (h0[, c0]), params) -> output tensors: the module on time-major (or unbatched) input x,
    or for the packed forms on the packed rows x (layer_arguments), with params in place of its
    parameters."""
    def f(x, states, params):
        if form in PACKED_LENGTHS:  # (pack_padded_sequence has no forward-mode derivative)
            x = PackedSequence(x, *packed_layout(form)[1:])
        hx = states if kind == "LSTM" else states[0]
        return tuple(output_tensors(functional_call(module, params, (x, hx))))
    return f


def layer_arguments(kind, module, form):
    """(x, states, params) for layer_function: random input and states, and module's parameters."""
    leaves = layer_leaves(kind, module, form, True, DTYPE)
    x = leaves["input"].detach()
    if form in PACKED_LENGTHS:
        x = torch.randn(packed_layout(form)[0].data.shape, dtype=DTYPE)
    states = tuple(leaves[name].detach() for name in ("h0", "c0") if name in leaves)
    return x, states, parameters(module)


def packed_layout(form):
    """A PackedSequence of the form's lengths (time-major, batch size BATCH): its (data, batch_sizes,
    sorted_indices, unsorted_indices)."""
    padded = torch.zeros(max(PACKED_LENGTHS[form]), BATCH, INPUT_SIZE, dtype=DTYPE)
    return tuple(pack_padded_sequence(padded, PACKED_LENGTHS[form], enforce_sorted=False))


def parameters(module):
    return {name: p.detach() for name, p in module.named_parameters()}


def fixed_weighted_loss(outputs):
    """weighted_loss with weights that are not drawn at random (vmap refuses random ops)."""
    return sum((t * torch.arange(t.numel(), dtype=t.dtype).view(t.shape).add(10 * k).cos()).sum()
               for k, t in enumerate(output_tensors(outputs)))


def random_like(tree, seed):
    generator = torch.Generator().manual_seed(seed)
    if isinstance(tree, dict):
        return {k: random_like(v, seed + i) for i, (k, v) in enumerate(tree.items())}
    if isinstance(tree, tuple):
        return tuple(random_like(v, seed + i) for i, v in enumerate(tree))
    return torch.randn(tree.shape, generator=generator, dtype=tree.dtype).to(tree.device)


def for_both(ref, ours, run, *args):
    """run(module, x, states, params) for torch.nn's module and ours, on the same args (x, states)
    and each module's own parameters (identical values)."""
    return run(ref, *args, parameters(ref)), run(ours, *args, parameters(ours))


def structured(grads, x, states, params):
    """A flat sequence of gradients for (x, *states, *params) as torch.func gives them for the
    arguments (x, states, params)."""
    grads = list(grads)
    return grads[0], tuple(grads[1:1 + len(states)]), dict(zip(params, grads[1 + len(states):]))


def func_grads(f, x, states, params):
    """torch.func.grad of weighted_loss(f), and vjp of f, with respect to all of f's arguments."""
    loss = grad(lambda *a: weighted_loss(f(*a)), argnums=(0, 1, 2))(x, states, params)
    outputs, pullback = vjp(f, x, states, params)
    return loss, outputs, pullback(random_like(outputs, 7))


def autograd_grads(f, x, states, params):
    """What func_grads gives, by ordinary reverse-mode autograd."""
    x, states = x.requires_grad_(), tuple(t.requires_grad_() for t in states)
    params = {name: p.requires_grad_() for name, p in params.items()}
    wrt = [x, *states, *params.values()]
    outputs = f(x, states, params)
    loss = torch.autograd.grad(weighted_loss(outputs), wrt, retain_graph=True)
    pulled = torch.autograd.grad(outputs, wrt, random_like(outputs, 7))
    return (structured(loss, x, states, params), tuple(t.detach() for t in outputs),
            structured(pulled, x, states, params))


def func_jvp(f, x, states, params):
    primals = (x, states, params)
    return jvp(f, primals, random_like(primals, 3))


def forward_ad_jvp(f, x, states, params):
    """What func_jvp gives, with torch.autograd.forward_ad's dual tensors."""
    tangent_x, tangent_states, tangent_params = random_like((x, states, params), 3)
    with fwAD.dual_level():
        outputs = f(fwAD.make_dual(x, tangent_x), tuple(map(fwAD.make_dual, states, tangent_states)),
                    {name: fwAD.make_dual(p, tangent_params[name]) for name, p in params.items()})
        unpacked = [fwAD.unpack_dual(t) for t in outputs]
    return tuple(t.primal for t in unpacked), tuple(t.tangent for t in unpacked)


def transform_pair(ref, ours, kind, form, transform, packed_reference):
    """(expected, got): `transform` of our layer function, and of torch.nn's, or for packed input
    `packed_reference` of torch.nn's (its layers fail inside torch.func's transforms on packed
    input in torch 2.13: "Cannot access data pointer of Tensor that doesn't have storage")."""
    x, states, _ = layer_arguments(kind, ours, form)
    reference = packed_reference if form in PACKED_LENGTHS else transform
    return (reference(layer_function(ref, kind, form), x.clone(), tuple(t.clone() for t in states), parameters(ref)),
            transform(layer_function(ours, kind, form), x, states, parameters(ours)))


@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_layer_grad_and_vjp_match_nn(case):
    kind, layers, bidirectional, proj, form = case
    ref, ours = layer_pair(kind, layers, bidirectional, proj)
    expected, got = transform_pair(ref, ours, kind, form, func_grads, autograd_grads)
    assert_close_nested(got, expected, DTYPE)


@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_layer_jvp_matches_nn(case):
    kind, layers, bidirectional, proj, form = case
    ref, ours = layer_pair(kind, layers, bidirectional, proj)
    expected, got = transform_pair(ref, ours, kind, form, func_jvp, forward_ad_jvp)
    assert any(t.abs().max() > 0 for t in expected[1])  # the tangents are not trivially zero
    assert_close_nested(got, expected, DTYPE)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_layer_forward_ad_dual_tensors_match_nn(case, grad_mode):
    """torch.autograd.forward_ad's tangents on the input, the states and the weights reach the
    outputs' tangents, in grad mode (the module's parameters as they are, requiring grad) or not:
    forward-mode AD does not depend on it."""
    kind, layers, bidirectional, proj, form = case
    ref, ours = layer_pair(kind, layers, bidirectional, proj)
    x, states, _ = layer_arguments(kind, ours, form)
    with torch.set_grad_enabled(grad_mode):
        expected, got = (forward_ad_jvp(layer_function(module, kind, form), x, states, dict(module.named_parameters()))
                         for module in (ref, ours))
    assert all(tangent is not None for tangent in got[1])
    assert_close_nested(got, expected, DTYPE)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_layer_jacobians_and_hessian_match_nn(kind):
    ref, ours = layer_pair(kind, 1, False, False)
    x = torch.randn(3, 2, INPUT_SIZE, dtype=DTYPE)

    def derivatives(module, x, _states, _params):
        def output(inputs):
            return module(inputs)[0]
        return (jacrev(output)(x), jacfwd(output)(x),
                hessian(lambda inputs: output(inputs).pow(2).sum())(x[:2, :1]))

    expected, got = for_both(ref, ours, derivatives, x, ())
    assert_close_nested(got, expected, DTYPE)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_layer_per_sample_grads_by_vmap_match_a_loop(kind):
    """vmap(grad) per-sample gradients (as DP-SGD takes them), against torch.nn's ordinary
    backward one sample at a time (torch.nn's layers refuse vmap: no batching rule)."""
    ref, ours = layer_pair(kind, 1, False, False)
    samples = torch.randn(4, 3, 1, INPUT_SIZE, dtype=DTYPE)  # 4 samples of 3 steps, batch 1 each
    params = parameters(ours)

    def loss(p, sample):
        return fixed_weighted_loss(functional_call(ours, p, (sample,)))

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, samples)
    for k, sample in enumerate(samples):
        expected = torch.autograd.grad(fixed_weighted_loss(ref(sample)), list(ref.parameters()))
        assert_close_nested([per_sample[name][k] for name in params], list(expected), DTYPE)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cell_transforms_match_nn(kind, batched):
    ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN, dtype=DTYPE)
    lstm = kind == "LSTMCell"
    batch = (3,) if batched else ()
    x = torch.randn(*batch, INPUT_SIZE, dtype=DTYPE)
    states = tuple(torch.randn(*batch, HIDDEN, dtype=DTYPE) for _ in range(2 if lstm else 1))

    def transforms(module, x, states, params):
        def f(inputs, hidden, p):
            return tuple(output_tensors(functional_call(module, p, (inputs, hidden if lstm else hidden[0]))))

        primals = (x, states, params)
        return (grad(lambda *a: weighted_loss(f(*a)), argnums=(0, 1, 2))(*primals),
                jvp(f, primals, random_like(primals, 5)))

    expected, got = for_both(ref, ours, transforms, x, states)
    assert_close_nested(got, expected, DTYPE)


def test_fused_ops_run_outside_differentiating_transforms(monkeypatch):
    """The plain-ops path is taken only where it is needed: eager training and inference, vmap
    alone and torch.autograd.functional's reverse-mode helpers run the fused ops; torch.func.grad
    and jvp do not."""
    calls = []
    layer = fused_rnn.ops.composite.layer
    monkeypatch.setattr(fused_rnn.ops.composite, "layer", lambda *a, **k: calls.append(1) or layer(*a, **k))
    _, ours = layer_pair("LSTM", 1, False, False)
    x = torch.randn(3, 2, INPUT_SIZE, dtype=DTYPE, requires_grad=True)
    ours(x)[0].sum().backward()
    with torch.no_grad():
        ours(x)
    vmap(lambda inputs: ours(inputs)[0])(x.detach().unsqueeze(0))
    torch.autograd.functional.jacobian(lambda inputs: ours(inputs)[0], x.detach())
    assert calls == []
    params = parameters(ours)
    grad(lambda p: functional_call(ours, p, (x.detach(),))[0].sum())(params)
    assert len(calls) == 1
    jvp(lambda inputs: ours(inputs)[0], (x.detach(),), (torch.ones_like(x),))
    assert len(calls) == 2


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_compiled_jvp_matches_nn(kind):
    """torch.func.jvp inside torch.compile(fullgraph=True): Dynamo cannot read functorch's
    interpreter stack, so the layer sees the dual level jvp opens (it would otherwise run the op and
    give zero tangents, silently). torch.nn's layers are refused by fullgraph, so against its eager jvp."""
    ref, ours = layer_pair(kind, 1, False, False)
    x, tangent = torch.randn(3, 2, INPUT_SIZE, dtype=DTYPE), torch.randn(3, 2, INPUT_SIZE, dtype=DTYPE)

    def pushforward(module):
        return jvp(lambda inputs: tuple(output_tensors(module(inputs))), (x,), (tangent,))

    torch._dynamo.reset()
    assert_close_nested(torch.compile(pushforward, fullgraph=True)(ours), pushforward(ref), DTYPE)


@pytest.mark.skipif(not torch.cuda.is_available() or not fused_rnn.backends()["cuda"],
                    reason="needs a CUDA device and fused_rnn's CUDA backend")
@pytest.mark.parametrize("transform", [func_grads, func_jvp], ids=["grad_vjp", "jvp"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_transforms_on_cuda_match_nn_on_cpu(kind, transform):
    """The same transforms of a layer on CUDA (where cuDNN's torch.nn layers have no forward-mode
    derivative), in float64, against torch.nn's on CPU."""
    ref, ours = layer_pair(kind, 2, True, kind == "LSTM")
    ours = ours.cuda()
    x, states, _ = layer_arguments(kind, ref, "3d")
    expected = transform(layer_function(ref, kind, "3d"), x, states, parameters(ref))
    got = transform(layer_function(ours, kind, "3d"), x.cuda(), tuple(t.cuda() for t in states), parameters(ours))
    assert_close_nested(torch.utils._pytree.tree_map(lambda t: t.cpu(), got), expected, DTYPE)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_ensemble_by_vmap_matches_each_model(kind):
    """Models stacked by torch.func.stack_module_state and run by vmap over their parameters (vmap
    alone: the fused ops, one model at a time): the outputs and, by an ordinary backward through
    vmap, the gradients of each model. The stacked parameters require grad, which vmap's batched
    wrappers do not show; the layer must keep its activations all the same."""
    models = [layer_pair(kind, 2, True, kind == "LSTM")[1] for _ in range(3)]
    for seed, model in enumerate(models):  # three different models
        torch.manual_seed(seed)
        for p in model.parameters():
            torch.nn.init.uniform_(p, -0.5, 0.5)
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(3, 2, INPUT_SIZE, dtype=DTYPE)
    outputs = vmap(lambda p, b: output_tensors(functional_call(skeleton, (p, b), (x,))))(params, buffers)
    sum(t.pow(2).sum() for t in outputs).backward()
    for k, model in enumerate(models):
        expected = output_tensors(model(x))
        assert_close_nested([t[k] for t in outputs], expected, DTYPE)
        expected_grads = torch.autograd.grad(sum(t.pow(2).sum() for t in expected), list(model.parameters()))
        assert_close_nested([params[name].grad[k] for name, _ in model.named_parameters()], list(expected_grads),
                            DTYPE)
