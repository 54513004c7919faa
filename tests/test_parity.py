"""fused_rnn layers and cells against torch.nn: identical initialisation, outputs and every
gradient (input, initial states, parameters) over a grid of configurations and input forms."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (BATCH, CELL_KINDS, GATES, INPUT_FORMS, INPUT_SIZE, LAYER_GRID_ARGS, LAYER_KINDS, PROJ_SIZE,
                     SCALED_TOLERANCE, STEPS, assert_close_nested, assert_same_outputs_and_grads,
                     assert_same_results, assert_state_dicts_identical, layer_call, layer_grid, layer_leaves, leaf,
                     make_kind_pair, named_outputs_and_grads, output_tensors)

pytestmark = pytest.mark.usefixtures("torch_test_state")

# float32 uses a hidden size that spans a full 8-lane float vector plus a scalar tail;
# float64 (4 lanes) gets the same from 5.
HIDDEN = {torch.float64: 5, torch.float32: 10}

FULL_GRID = list(layer_grid(LAYER_KINDS, [1, 2], [False, True], [False, True], [True, False], [False, True],
                            [False, True], INPUT_FORMS))
FLOAT32_GRID = list(layer_grid(LAYER_KINDS, [2], [False, True], [True], [True], [False, True], [True],
                               INPUT_FORMS))


def layer_inputs(kind, module, form, with_h0, dtype):
    """Leaf tensors (input, h0[, c0]) and a function call(module) that runs a module on them in `form`."""
    leaves, run = layer_leaves(kind, module, form, with_h0, dtype), layer_call(kind, form)
    return leaves, lambda m: run(m, leaves)


def check_layer_parity(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, dtype):
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                  dtype=dtype)
    if proj:
        kwargs["proj_size"] = PROJ_SIZE
    ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN[dtype], **kwargs)
    assert_state_dicts_identical(ref, ours)
    leaves, call = layer_inputs(kind, ours, form, with_h0, dtype)
    assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)


@pytest.mark.parametrize(LAYER_GRID_ARGS, FULL_GRID)
def test_layer_matches_nn_float64(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form):
    check_layer_parity(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, torch.float64)


@pytest.mark.parametrize(LAYER_GRID_ARGS, FLOAT32_GRID)
def test_layer_matches_nn_float32(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form):
    check_layer_parity(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, torch.float32)


def test_float64_grid_covers_every_axis():
    """Guards the grid itself: 4 kinds x 2 layers x 2 dirs x 2 layouts x 2 bias x 2 h0 x 4 forms,
    plus proj_size for LSTM."""
    assert len(FULL_GRID) == (4 + 1) * 2 * 2 * 2 * 2 * 2 * 4


# ---- dropout ---------------------------------------------------------------------------------

def dropout_pair(kind, dropout, dtype=torch.float64):
    ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN[dtype], num_layers=2, dropout=dropout,
                               bidirectional=True, dtype=dtype)
    assert_state_dicts_identical(ref, ours)
    return ref, ours


def seeded(call, seed):
    """`call` with torch.manual_seed(seed) set right before the forward."""
    def run(m):
        torch.manual_seed(seed)
        return call(m)
    return run


@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_dropout_training_consumes_rng_like_nn(kind, form):
    ref, ours = dropout_pair(kind, 0.5)
    ref.train(), ours.train()
    leaves, call = layer_inputs(kind, ours, form, True, torch.float64)
    our_out, _ = assert_same_outputs_and_grads(ref, ours, leaves, seeded(call, 7), torch.float64)
    # Both draw exactly the same random numbers: the generator ends in the same state.
    states_after = []
    for m in (ref, ours):
        with torch.no_grad():
            seeded(call, 7)(m)
        states_after.append(torch.get_rng_state())
    assert torch.equal(*states_after)
    # Dropout really is active: another seed, or eval mode, gives a different output.
    with torch.no_grad():
        other_seed = seeded(call, 8)(ours)
        ours.eval()
        no_dropout = call(ours)
    assert not torch.equal(output_tensors(other_seed)[0], output_tensors(our_out)[0])
    assert not torch.equal(output_tensors(no_dropout)[0], output_tensors(our_out)[0])


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_eval_mode_ignores_dropout(kind):
    ref, ours = dropout_pair(kind, 0.5)
    _, no_dropout = dropout_pair(kind, 0.0)
    for m in (ref, ours, no_dropout):
        m.eval()
    leaves, call = layer_inputs(kind, ours, "3d", True, torch.float64)
    with torch.no_grad():
        first, second = seeded(call, 1)(ours), seeded(call, 2)(ours)
        assert_close_nested(first, second, torch.float64)
        assert_close_nested(first, call(no_dropout), torch.float64)
    assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_changing_dropout_after_construction_takes_effect(kind):
    ref, ours = dropout_pair(kind, 0.0)
    leaves, call = layer_inputs(kind, ours, "3d", True, torch.float64)
    with torch.no_grad():
        before = call(ours)
    ref.dropout = ours.dropout = 0.5
    our_out, _ = assert_same_outputs_and_grads(ref, ours, leaves, seeded(call, 3), torch.float64)
    assert not torch.equal(our_out[0], before[0])
    ref.dropout = ours.dropout = 0.0
    with torch.no_grad():
        assert_close_nested(seeded(call, 4)(ours), before, torch.float64)


# ---- cells -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_matches_nn(kind, bias, batched, with_hx, dtype):
    hidden = HIDDEN[dtype]
    ref, ours = make_kind_pair(kind, INPUT_SIZE, hidden, bias=bias, dtype=dtype)
    assert_state_dicts_identical(ref, ours)
    batch_shape = (BATCH,) if batched else ()
    leaves = {"input": leaf(*batch_shape, INPUT_SIZE, dtype=dtype)}
    if with_hx:
        leaves["h0"] = leaf(*batch_shape, hidden, dtype=dtype)
        if kind == "LSTMCell":
            leaves["c0"] = leaf(*batch_shape, hidden, dtype=dtype)

    def call(m):
        if not with_hx:
            return m(leaves["input"])
        return m(leaves["input"], (leaves["h0"], leaves["c0"]) if kind == "LSTMCell" else leaves["h0"])

    our_out, ref_out = assert_same_outputs_and_grads(ref, ours, leaves, call, dtype)
    shapes = [t.shape for t in (our_out if kind == "LSTMCell" else [our_out])]
    assert all(s == (*batch_shape, hidden) for s in shapes)


@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_unrolled_over_steps_matches_nn(kind):
    """A cell fed its own state for several steps (the usual manual-unroll loop)."""
    ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN[torch.float64], dtype=torch.float64)
    leaves = {"input": leaf(STEPS, BATCH, INPUT_SIZE)}

    def call(m):
        state, outs = None, []
        for x_t in leaves["input"]:
            state = m(x_t, state)
            outs.append(state)
        return outs

    assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_layer_matches_nn_with_intra_op_threads(kind, dtype):
    """A batch large enough for the pointwise pass to be split across two threads. The weight
    gradients sum 900 rows' products: in float32 compared within SCALED_TOLERANCE, whose absolute
    part follows each tensor's magnitude (an element that such a sum cancels to 0.08 among terms of
    up to 60 differs by 2e-5 between MKL's order and the panels', each within 6e-5 of float64)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN[dtype], bidirectional=True, dtype=dtype)
        leaves = {"input": leaf(3, 300, INPUT_SIZE, dtype=dtype)}
        if dtype == torch.float64:
            assert_same_outputs_and_grads(ref, ours, leaves, lambda m: m(leaves["input"]), dtype)
        else:
            call = lambda m, ls: m(ls["input"])
            assert_same_results(named_outputs_and_grads(ours, leaves, call),
                                named_outputs_and_grads(ref, leaves, call), SCALED_TOLERANCE[dtype])
    finally:
        torch.set_num_threads(threads)


def call_with_mixed_lengths(x, form):
    """m -> m(x) for form "3d"; for "packed_unsorted", x packed unsorted with random lengths, one
    of them the full length."""
    steps, batch = x.shape[:2]
    lengths = [steps] + [int(n) for n in torch.randint(1, steps + 1, (batch - 1,))]
    if form == "packed_unsorted":
        return lambda m: m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    return lambda m: m(x)


# From 8 rows per thread the CPU backend gives each thread its own rows for every step (no
# synchronisation between steps); packed, the rows are grouped by their number of steps. Three
# threads on 41 rows: groups of unequal size, each with a partial register block. LSTM projects
# with three threads only: without projection its input projection is folded into the steps.
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_layer_matches_nn_with_rows_split_between_threads(kind, form, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch, steps = 41, 9
        proj = {"proj_size": 7} if kind == "LSTM" and threads == 3 else {}
        ref, ours = make_kind_pair(kind, INPUT_SIZE, 20, num_layers=2, bidirectional=True, dtype=torch.float64, **proj)
        leaves = {"input": leaf(steps, batch, INPUT_SIZE)}
        call = call_with_mixed_lengths(leaves["input"], form)
        assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("steps,batch", [(1, 3), (1, 1), (3, 1)], ids=["T1", "T1-B1", "B1"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_single_step_and_single_sequence(kind, steps, batch, form):
    ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN[torch.float64], num_layers=2, bidirectional=True,
                               dtype=torch.float64)
    leaves = {"input": leaf(steps, batch, INPUT_SIZE), "h0": leaf(4, batch, HIDDEN[torch.float64])}
    if kind == "LSTM":
        leaves["c0"] = leaf(4, batch, HIDDEN[torch.float64])
    lengths = [steps] * batch

    def call(m):
        x = leaves["input"]
        if form == "packed_unsorted":
            x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        return m(x, (leaves["h0"], leaves["c0"]) if kind == "LSTM" else leaves["h0"])

    assert_same_outputs_and_grads(ref, ours, leaves, call, torch.float64)


# Calls of fewer than 4 steps lay the per-step weights out in panels only from 16 rows in all
# (forward; 32 for the backward's), else their GEMMs go to BLAS: each side of both thresholds,
# with a partial register block of rows (17, 33), both directions and the LSTM projection.
@pytest.mark.parametrize("steps,batch", [(1, 15), (1, 17), (1, 33), (2, 8), (3, 11)])
@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_few_steps_either_side_of_the_panel_thresholds(kind, form, steps, batch):
    proj = {"proj_size": 7} if kind == "LSTM" else {}
    ref, ours = make_kind_pair(kind, INPUT_SIZE, 20, num_layers=2, bidirectional=True, dtype=torch.float64, **proj)
    leaves = {"input": leaf(steps, batch, INPUT_SIZE)}
    assert_same_outputs_and_grads(ref, ours, leaves, call_with_mixed_lengths(leaves["input"], form), torch.float64)


@pytest.mark.parametrize("batch", [15, 17, 33])
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_either_side_of_the_panel_thresholds(kind, batch):
    ref, ours = make_kind_pair(kind, INPUT_SIZE, 20, dtype=torch.float64)
    leaves = {"input": leaf(batch, INPUT_SIZE), "h0": leaf(batch, 20)}
    if kind == "LSTMCell":
        leaves["c0"] = leaf(batch, 20)
    state = lambda: (leaves["h0"], leaves["c0"]) if kind == "LSTMCell" else leaves["h0"]  # noqa: E731
    assert_same_outputs_and_grads(ref, ours, leaves, lambda m: m(leaves["input"], state()), torch.float64)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_expanded_and_partial_upstream_gradients(kind):
    """Losses whose upstream gradients are stride-0 expansions (plain .sum()), or that use
    only the final state, or only a strided slice of the output."""
    ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN[torch.float64], num_layers=2, bidirectional=True,
                               dtype=torch.float64)
    leaves = {"input": leaf(STEPS, BATCH, INPUT_SIZE)}
    last_state = (lambda out: out[1][0]) if kind == "LSTM" else (lambda out: out[1])
    losses = [lambda out: out[0].sum(), lambda out: last_state(out).sum(),
              lambda out: out[0].transpose(0, 1)[:, ::2].pow(2).sum()]
    for loss in losses:
        grads = []
        for m in (ref, ours):
            grads.append(torch.autograd.grad(loss(m(leaves["input"])), [leaves["input"], *m.parameters()]))
        assert_close_nested(grads[1], grads[0], torch.float64)


# Inference (no_grad) keeps no activations. With batches of 16 and more, LSTM and (small) RNN
# fold the input projection into every step's GEMM and each step reuses the same gate rows;
# else (GRU, batch 8) the input is projected a chunk of steps at a time, about 2^18 gate values:
# 520 steps of batch 8 x hidden 64 cross chunk borders for every cell.
@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("steps,batch", [(30, 64), (520, 8)], ids=["B64", "B8-chunked"])
def test_inference_without_reserve_matches_torch_nn(kind, form, steps, batch):
    ref, ours = make_kind_pair(kind, 8, 64, num_layers=2, bidirectional=True, dtype=torch.float32)
    call = call_with_mixed_lengths(torch.randn(steps, batch, 8), form)
    with torch.no_grad():
        expected, actual = call(ref), call(ours)
    assert_close_nested(actual, expected, torch.float32)


def test_reserve_is_kept_only_when_differentiating():
    w_ih, w_hh, hx = torch.randn(20, 3), torch.randn(20, 5), torch.zeros(2, 5)
    x = torch.randn(4, 2, 3)
    kept = torch.ops.fused_rnn.lstm_layer(x, None, hx, hx, w_ih, w_hh, None, None, None, False, True)
    skipped = torch.ops.fused_rnn.lstm_layer(x, None, hx, hx, w_ih, w_hh, None, None, None, False, False)
    assert kept[3].shape == (8, 25) and skipped[3].shape == (0, 25)
    for a, b in zip(kept[:3], skipped[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="save_reserve=False"):
        torch.ops.fused_rnn.lstm_layer(x.requires_grad_(), None, hx, hx, w_ih, w_hh, None, None, None, False, False)


# The CPU kernels' blocking: hidden sizes that are not a multiple of the SIMD width (72, and
# LSTM's 40 projected to 24), a batch that leaves a partial block of rows (13), and enough
# steps for the backward pass to run in more than one chunk (2^17 gate values, at least 256 rows).
@pytest.mark.parametrize("form", ["3d", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_layer_matches_nn_across_kernel_blocks_and_backward_chunks(kind, form):
    batch, hidden = 13, 72
    proj = {"proj_size": 24} if kind == "LSTM" else {}
    steps = 2 ** 20 // (batch * GATES[kind] * hidden) + 17
    ref, ours = make_kind_pair(kind, 5, hidden, bidirectional=True, dtype=torch.float64, **proj)
    leaves = {"input": leaf(steps, batch, 5)}
    assert_same_outputs_and_grads(ref, ours, leaves, call_with_mixed_lengths(leaves["input"], form), torch.float64)


class BackwardOpCalls(TorchDispatchMode):
    """Records the (input_grad, weight_grads, hx_grad) arguments of every fused_rnn backward op call."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fused_rnn" and func.__name__.endswith("_backward.default"):
            named = {a.name: a.default_value for a in func._schema.arguments}
            named.update(zip([a.name for a in func._schema.arguments], args), **kwargs)
            self.flags.append((named["input_grad"], named["weight_grads"], named["hx_grad"]))
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_data_input_needs_no_input_gradient(kind):
    # The first layer's input is data: its backward ops leave out the input gradient, the next
    # layer's compute it (for the first layer's output); the parameters' gradients match torch.nn.
    # The initial states are zeros: no op computes their gradient.
    ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN[torch.float64], num_layers=2, bidirectional=True,
                               dtype=torch.float64)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    recorder = BackwardOpCalls()
    with recorder:
        assert_same_outputs_and_grads(ref, ours, {}, lambda m: m(x), torch.float64)
    assert recorder.flags == [(True, True, False)] * 2 + [(False, True, False)] * 2


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_initial_state_gradients_are_computed_where_wanted(kind):
    # Initial states that need a gradient get it from every layer's op (and match torch.nn's);
    # without one passed (zeros), no op computes it (data_input test above).
    ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN[torch.float64], num_layers=2, bidirectional=True,
                               dtype=torch.float64)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    leaves = {"h0": leaf(4, BATCH, HIDDEN[torch.float64])}
    if kind == "LSTM":
        leaves["c0"] = leaf(4, BATCH, HIDDEN[torch.float64])
    state = (leaves["h0"], leaves["c0"]) if kind == "LSTM" else leaves["h0"]
    recorder = BackwardOpCalls()
    with recorder:
        assert_same_outputs_and_grads(ref, ours, leaves, lambda m: m(x, state), torch.float64)
    assert recorder.flags == [(True, True, True)] * 2 + [(False, True, True)] * 2


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_frozen_layers_compute_no_weight_gradients(kind):
    # A frozen model whose input needs a gradient (an attribution, or a trainable embedding
    # below): its backward ops leave out the weights' gradients, and the input's matches torch.nn.
    ref, ours = make_kind_pair(kind, INPUT_SIZE, HIDDEN[torch.float64], num_layers=2, bidirectional=True,
                               dtype=torch.float64)
    for module in (ref, ours):
        module.requires_grad_(False)
    x = leaf(STEPS, BATCH, INPUT_SIZE)
    recorder = BackwardOpCalls()
    with recorder:
        assert_same_outputs_and_grads(ref, ours, {"input": x}, lambda m: m(x), torch.float64, module_params=False)
    assert recorder.flags == [(True, False, False)] * 4
    assert all(p.grad is None for p in ours.parameters())
