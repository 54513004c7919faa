"""float16 and bfloat16 on CPU, and CPU autocast. fused_rnn runs half-precision layers in float32
(state carried between steps unrounded, results rounded to the storage type; on AVX512-BF16 the
bfloat16 GEMMs multiply operands rounded to bfloat16); torch.nn runs them through oneDNN or per-step
ATen ops that round every intermediate. So: close to torch.nn in the same
dtype, at least as accurate as it against float64, same dtypes out, and inside torch.autocast("cpu")
the same dtypes as torch.nn layer by layer."""
import copy
import itertools
import os

import pytest
import torch

import fused_rnn
from benchmarks.measure import _can_reset_rss_peak, _peak_memory_bytes

from helpers import (CELL_KINDS, INPUT_SIZE, LAYER_GRID_ARGS, LAYER_KINDS, OPCHECK_CASE_ARGS, OPCHECK_CASE_IDS,
                     OPCHECK_CASES, PROJ_SIZE, SCALED_TOLERANCE, assert_at_least_as_accurate,
                     assert_backward_op_opcheck_passes, assert_layer_op_opcheck_passes, assert_same_results, layer_call,
                     layer_grid, layer_leaves, make_kind_pair, named_outputs_and_grads, output_tensors, relative_error)

pytestmark = pytest.mark.usefixtures("torch_test_state")

HALF_TYPES = [torch.float16, torch.bfloat16]
HALF_IDS = ["float16", "bfloat16"]
HIDDEN = 10

GRID = list(layer_grid(LAYER_KINDS, [2], [False, True], [False], [True, False], [False, True], [True],
                       ["3d", "unbatched", "packed_unsorted"]))


def cell_leaves(module, dtype, batch=3):
    """Leaves (input, h0[, c0]) for a cell module and call(module, leaves) running it with them."""
    leaves = {"input": torch.randn(batch, module.input_size, dtype=dtype).requires_grad_(),
              "h0": torch.randn(batch, module.hidden_size, dtype=dtype).requires_grad_()}
    if type(module).__name__ == "LSTMCell":
        leaves["c0"] = torch.randn(batch, module.hidden_size, dtype=dtype).requires_grad_()
        return leaves, lambda m, ls: m(ls["input"], (ls["h0"], ls["c0"]))
    return leaves, lambda m, ls: m(ls["input"], ls["h0"])


# ---- against torch.nn in the same dtype ----------------------------------------------------------

# bfloat16 relu is left out: pre-activations near 0 round to opposite signs in the two, so single
# gradients differ by a whole step (0 against full); test_at_least_as_accurate_as_nn covers it.
HALF_GRID = [pytest.param(*case.values, dtype, id=f"{case.id}-{name}") for case in GRID
             for dtype, name in zip(HALF_TYPES, HALF_IDS)
             if not (case.values[0] == "RNN_RELU" and dtype == torch.bfloat16)]


@pytest.mark.parametrize(LAYER_GRID_ARGS + ",dtype", HALF_GRID)
def test_layer_matches_nn(kind, num_layers, bidirectional, batch_first, bias, proj, with_h0, form, dtype):
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, dtype=dtype)
    if proj:
        kwargs["proj_size"] = PROJ_SIZE
    reference, fused = make_kind_pair(kind, INPUT_SIZE, HIDDEN, **kwargs)
    leaves, call = layer_leaves(kind, fused, form, with_h0, dtype), layer_call(kind, form)
    assert_same_results(named_outputs_and_grads(fused, leaves, call), named_outputs_and_grads(reference, leaves, call),
                        SCALED_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=HALF_IDS)
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cell_matches_nn(kind, dtype):
    reference, fused = make_kind_pair(kind, INPUT_SIZE, HIDDEN, dtype=dtype)
    leaves, call = cell_leaves(fused, dtype)
    assert_same_results(named_outputs_and_grads(fused, leaves, call), named_outputs_and_grads(reference, leaves, call),
                        SCALED_TOLERANCE[dtype])


# ---- accuracy against float64 --------------------------------------------------------------------

ACCURACY_CASES = ([(kind, form) for kind in LAYER_KINDS for form in ("3d", "packed_unsorted")] +
                  [(kind, "cell") for kind in CELL_KINDS])


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=HALF_IDS)
@pytest.mark.parametrize("kind, form", ACCURACY_CASES)
def test_at_least_as_accurate_as_nn(kind, form, dtype):
    """Outputs and gradients of 40 steps (2 layers, both directions) or one cell step, against
    float64 runs of the same half-precision weights and inputs: fused_rnn's error is no larger than
    torch.nn's."""
    layer = form != "cell"
    kwargs = dict(num_layers=2, bidirectional=True) if layer else {}
    reference, fused = make_kind_pair(kind, 16, 32, **kwargs, dtype=dtype)
    exact = copy.deepcopy(reference).double()
    if layer:
        leaves, call = layer_leaves(kind, fused, form, True, dtype, steps=40), layer_call(kind, form)
    else:
        leaves, call = cell_leaves(fused, dtype)
    assert_at_least_as_accurate(fused, reference, exact, leaves, call)


@pytest.mark.parametrize("batch", [3, 16])
@pytest.mark.parametrize("kind", list(LAYER_KINDS) + ["LSTM_PROJ"])
def test_long_sequence_at_least_as_accurate_as_nn(kind, batch):
    """400 steps, hidden 64 in bfloat16, both directions, in training and in inference: a training
    forward converts the input to float32 and rounds the saved activations to bfloat16 a chunk of
    51-341 steps at a time, and the backward converts them back 32-86 steps at a time. So the
    conversions cross chunk borders (40 steps stay in one chunk), and at batch 16 LSTM and RNN
    fold the input projection into each step's GEMM, which reads the converted rows."""
    proj = {"proj_size": 16} if kind == "LSTM_PROJ" else {}
    kind = kind.replace("_PROJ", "")
    reference, fused = make_kind_pair(kind, 8, 64, bidirectional=True, dtype=torch.bfloat16, **proj)
    exact = copy.deepcopy(reference).double()
    leaves = layer_leaves(kind, fused, "3d", True, torch.bfloat16, steps=400, batch=batch)
    call = layer_call(kind, "3d")
    exact_outputs, their_output_error = assert_at_least_as_accurate(fused, reference, exact, leaves, call)
    with torch.no_grad():
        inference = output_tensors(call(fused, leaves))
    inference_error = max(relative_error(a, e) for a, e in zip(inference, exact_outputs))
    assert inference_error <= 1.5 * their_output_error, \
        f"inference: error {inference_error:.2e}, torch.nn's {their_output_error:.2e}"


def test_state_is_not_rounded_between_steps():
    """A bfloat16 LSTM whose state moves by less than bfloat16's resolution each step: computed in
    float32, the small steps add up; rounded to bfloat16 at each step, they would vanish. Inputs
    are 0 and W_hh is 0, so c_t = c_{t-1} + i*g with a constant i*g ~ 1e-3 while |c| ~ 1."""
    from fused_rnn import LSTM
    lstm = LSTM(1, 1, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lstm.weight_ih_l0.zero_(), lstm.weight_hh_l0.zero_(), lstm.bias_hh_l0.zero_()
        # gates (i, f, g, o): i = sigmoid(-5) ~ 0.0067, f = sigmoid(30) = 1, g = tanh(0.2) ~ 0.197, o ~ 1
        lstm.bias_ih_l0.copy_(torch.tensor([-5.0, 30.0, 0.2, 30.0]))
    steps = 200
    c0 = torch.ones(1, 1, 1, dtype=torch.bfloat16)
    _, (_, c_n) = lstm(torch.zeros(steps, 1, 1, dtype=torch.bfloat16), (torch.zeros_like(c0), c0))
    i = torch.sigmoid(torch.tensor(-5.0, dtype=torch.bfloat16).float())
    g = torch.tanh(torch.tensor(0.2, dtype=torch.bfloat16).float())
    expected = 1.0 + steps * (i * g).item()
    assert abs(c_n.item() - expected) <= 0.01 * expected, (c_n.item(), expected)


# ---- the raw ops ---------------------------------------------------------------------------------

# Every LSTM case, and packed, reversed, with biases for the other ops.
HALF_OPCHECK = [i for i, case in enumerate(OPCHECK_CASES) if case[0] == "LSTM" or case[1:] == (True, True, True, False)]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=HALF_IDS)
@pytest.mark.parametrize(OPCHECK_CASE_ARGS, [OPCHECK_CASES[i] for i in HALF_OPCHECK],
                         ids=[OPCHECK_CASE_IDS[i] for i in HALF_OPCHECK])
def test_forward_op_opcheck(kind, packed, reverse, bias, proj, dtype):
    assert_layer_op_opcheck_passes(kind, packed, reverse, bias, proj, dtype=dtype)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=HALF_IDS)
@pytest.mark.parametrize(OPCHECK_CASE_ARGS, [OPCHECK_CASES[i] for i in HALF_OPCHECK],
                         ids=[OPCHECK_CASE_IDS[i] for i in HALF_OPCHECK])
def test_backward_op_opcheck(kind, packed, reverse, bias, proj, dtype):
    assert_backward_op_opcheck_passes(kind, packed, reverse, bias, proj, dtype=dtype)


# ---- CPU autocast --------------------------------------------------------------------------------

AUTOCAST_KINDS = ["LSTM", "GRU", "RNN_TANH", "LSTMCell", "GRUCell", "RNNCell_TANH"]


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("region_dtype", HALF_TYPES, ids=HALF_IDS)
@pytest.mark.parametrize("kind", AUTOCAST_KINDS)
def test_autocast_matches_nn(kind, region_dtype, input_dtype):
    """float32 modules inside torch.autocast("cpu"): the same output and gradient dtypes as
    torch.nn's, layer by layer (each runs in the region's dtype or in float32, see modules.py), and
    close values."""
    layer = kind in LAYER_KINDS
    reference, fused = make_kind_pair(kind, INPUT_SIZE, HIDDEN, **(dict(num_layers=2) if layer else {}))
    if layer:
        leaves, call = layer_leaves(kind, fused, "3d", True, input_dtype), layer_call(kind, "3d")
    else:
        leaves, call = cell_leaves(fused, input_dtype)
    mixed_half_types = input_dtype not in (torch.float32, region_dtype)
    with torch.autocast("cpu", dtype=region_dtype):
        ours = named_outputs_and_grads(fused, leaves, call)
        if kind == "LSTM" and region_dtype == torch.float16 and input_dtype != torch.float16:
            # torch.nn fails here: its LSTM takes float32 input, and bfloat16 where oneDNN runs it, to
            # oneDNN, which has no float16 LSTM backward (nor any float16 LSTM without AVX512-FP16 or
            # AMX-FP16). fused_rnn runs there in float16, elsewhere (bfloat16 input) in float32.
            onednn = input_dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
            expected = torch.float16 if onednn else torch.float32
            assert all(t.dtype == expected for t in ours[0])
            return
        if mixed_half_types:
            # torch.nn's backward fails here ("Unexpected floating ScalarType in at::autocast::prioritize"):
            # compare the forward, in grad mode as ours ran (grad mode can choose torch.nn's kernels).
            theirs = [t.detach() for t in output_tensors(call(reference, leaves))]
    if mixed_half_types:
        ours_outputs = [t.detach() for t in ours[0]]
        assert [t.dtype for t in ours_outputs] == [t.dtype for t in theirs]
        assert_same_results((ours_outputs, {}), (theirs, {}), 2 * SCALED_TOLERANCE[region_dtype])
        return
    try:
        with torch.autocast("cpu", dtype=region_dtype):
            theirs = named_outputs_and_grads(reference, leaves, call)
    except RuntimeError as error:
        if not (kind == "LSTM" and "could not create a primitive descriptor" in str(error)):
            raise
        # torch.nn's LSTM under autocast insists on oneDNN, which has no bfloat16 LSTM on CPUs
        # without AVX-512: what the region asks of it, an LSTM in bfloat16, torch.nn runs outside
        # autocast on its own kernels. Its results then have bfloat16 gradients, ours float32 ones.
        region_leaves = {name: t.detach().to(region_dtype).requires_grad_() for name, t in leaves.items()}
        theirs = named_outputs_and_grads(copy.deepcopy(reference).to(region_dtype), region_leaves, call)
        assert all(t.dtype == region_dtype for t in ours[0])
        assert all(g.dtype == torch.float32 for g in ours[1].values())
        assert_same_results(ours, theirs, 2 * SCALED_TOLERANCE[region_dtype], same_dtypes=False)
        return
    assert all(g.dtype == torch.float32 for name, g in ours[1].items() if name.startswith("param."))
    assert_same_results(ours, theirs, 2 * SCALED_TOLERANCE[region_dtype])


def autocast_call_dtypes(module_class, region, input_dtype, state_dtype, packed=False, proj_size=0,
                         grad=True, onednn=True):
    """The dtypes of what `module_class` (a layer of 2 layers or a cell, I=8, H=16) returns for
    input of `input_dtype` (and a given state of `state_dtype`, or none) inside
    torch.autocast("cpu", region); None where the call raises."""
    torch.manual_seed(0)
    cell = module_class.__name__.endswith("Cell")
    options = ({} if cell else dict(num_layers=2)) | ({"proj_size": proj_size} if proj_size else {})
    module = module_class(8, 16, **options)
    x = torch.randn(*(() if cell else (5,)), 3, 8, dtype=input_dtype)
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 4, 2])
    state_shape = (3,) if cell else (2, 3)
    args = (x,)
    if state_dtype is not None:
        h = torch.zeros(*state_shape, proj_size or 16, dtype=state_dtype)
        args = (x, (h, torch.zeros(*state_shape, 16, dtype=state_dtype)) if "LSTM" in module_class.__name__ else h)
    try:
        with torch.backends.mkldnn.flags(enabled=onednn), torch.autocast("cpu", dtype=region), \
                torch.set_grad_enabled(grad):
            out = module(*args)
    except RuntimeError:
        return None
    flat = [out[0], *out[1]] if isinstance(out, tuple) and isinstance(out[1], tuple) else \
        list(out) if isinstance(out, tuple) else [out]
    return [(t.data if isinstance(t, torch.nn.utils.rnn.PackedSequence) else t).dtype for t in flat]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_autocast_dtypes_match_nn_in_every_case(kind):
    """Inside torch.autocast("cpu"), every combination of region, input dtype, given state's dtype,
    grad mode, oneDNN on or off, packed input and projection gives torch.nn's dtypes, wherever
    torch.nn runs. They depend on this CPU (oneDNN runs torch.nn's LSTM in the half types the CPU
    has instructions for) and on how a layer mixes the gates with its previous state."""
    layer = not kind.endswith("Cell")
    cases = list(itertools.product(HALF_TYPES, [torch.float32, *HALF_TYPES], [None, torch.float32, *HALF_TYPES],
                              [False, True], [True, False], [False, True] if layer else [False],
                              [0, 4] if kind == "LSTM" else [0]))
    compared = 0
    for region, input_dtype, state_dtype, grad, onednn, packed, proj_size in cases:
        theirs = autocast_call_dtypes(getattr(torch.nn, kind), region, input_dtype, state_dtype, packed, proj_size,
                                      grad, onednn)
        if theirs is None:
            continue
        ours = autocast_call_dtypes(getattr(fused_rnn, kind), region, input_dtype, state_dtype, packed, proj_size,
                                    grad, onednn)
        assert ours == theirs, (f"region {region}, input {input_dtype}, state {state_dtype}, grad {grad}, "
                                f"oneDNN {onednn}, packed {packed}, proj_size {proj_size}")
        compared += 1
    assert compared >= 0.9 * len(cases)  # torch.nn fails only in some float16 regions


@pytest.mark.parametrize("kind", ["LSTM-proj", "GRU-float32-h0"])
def test_autocast_values_match_nn_where_the_state_promotes(kind):
    """A projected LSTM (bfloat16 output and h, float32 cell state) and a GRU fed bfloat16 input with
    a float32 h0 (all float32) inside a bfloat16 region: torch.nn's values and gradients."""
    proj = kind == "LSTM-proj"
    reference, fused = make_kind_pair(kind.split("-")[0], INPUT_SIZE, HIDDEN, num_layers=2,
                                      **({"proj_size": PROJ_SIZE} if proj else {}))
    leaves = {"input": torch.randn(5, 3, INPUT_SIZE, dtype=torch.float32 if proj else torch.bfloat16,
                                   requires_grad=True)}
    if proj:
        call = lambda m, ls: m(ls["input"])
    else:
        leaves["h0"] = torch.randn(2, 3, HIDDEN, requires_grad=True)
        call = lambda m, ls: m(ls["input"], ls["h0"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = named_outputs_and_grads(fused, leaves, call)
        theirs = named_outputs_and_grads(reference, leaves, call)
    expected = [torch.bfloat16, torch.bfloat16, torch.float32] if proj else [torch.float32] * 2
    assert [t.dtype for t in ours[0]] == expected
    assert_same_results(ours, theirs, 2 * SCALED_TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_autocast_leaves_float64_alone(kind):
    """float64 input to a float32 module: autocast does not cast it, and both fail with RuntimeError."""
    layer = kind in LAYER_KINDS
    reference, fused = make_kind_pair(kind, INPUT_SIZE, HIDDEN)
    x = torch.randn(*((5,) if layer else ()), 3, INPUT_SIZE, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for module in (reference, fused):
            with pytest.raises(RuntimeError, match="(?i)double|float64"):
                module(x)
    _, fused64 = make_kind_pair(kind, INPUT_SIZE, HIDDEN, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused64(x)
    assert (out[0] if isinstance(out, tuple) else out).dtype == torch.float64


# ---- bfloat16 products (AVX512-BF16, or the AVX2 kernels widening the operands) ------------------

def bf16_products_expected():
    """Where the AVX-512 kernels run on a CPU with AVX512-BF16, and wherever the AVX2 kernels run
    (widening the operands to float32), a bfloat16 layer's GEMMs multiply in bfloat16
    (csrc/cpu/backend.cpp, bf16_products_for)."""
    isa = fused_rnn.cpu_instruction_set()
    return isa == "avx2" or (isa == "avx512" and torch.cpu._is_avx512_bf16_supported())


def test_bf16_products_follow_the_cpu():
    assert fused_rnn._cpu.bfloat16_products == bf16_products_expected()


def amx_products_expected():
    """Where bfloat16 products run and the CPU has AMX tiles (Sapphire Rapids on), they run on
    them, through ATen's oneDNN micro-kernel, while oneDNN is enabled and FUSED_RNN_AMX is not 0
    (panels.h, amx_bf16_products)."""
    return bf16_products_expected() and torch.cpu._is_amx_tile_supported() and os.environ.get("FUSED_RNN_AMX") != "0"


def test_amx_products_follow_the_cpu_and_onednn():
    assert fused_rnn._cpu.amx_products() == amx_products_expected()
    with torch.backends.mkldnn.flags(enabled=False):
        assert not fused_rnn._cpu.amx_products()
    try:
        fused_rnn._cpu.set_amx_products(False)
        assert not fused_rnn._cpu.amx_products()
        fused_rnn._cpu.set_amx_products(True)
        assert fused_rnn._cpu.amx_products() == (bf16_products_expected() and torch.cpu._is_amx_tile_supported())
    finally:
        fused_rnn._cpu.set_amx_products(amx_products_expected())


@pytest.fixture(params=["amx", "avx512-bf16"])
def bf16_kernel(request):
    """Runs a test with each kernel a CPU with AMX has for bfloat16 products: AMX tiles, and
    AVX512-BF16's dot-product instruction (set_amx_products(False)); elsewhere with the one it has."""
    amx = request.param == "amx"
    if amx and not amx_products_expected():
        pytest.skip("no AMX tiles here (or FUSED_RNN_AMX=0)")
    fused_rnn._cpu.set_amx_products(amx)
    yield request.param
    fused_rnn._cpu.set_amx_products(amx_products_expected())


# A bfloat16 layer's backward multiplies by W_hh and W_ih on bfloat16 panels laid out from the
# weights as they are, with no float32 copy of either (4 bytes a weight). GRU I=H=1024 (6 MiB of
# bfloat16 W_hh, 6 of W_ih), 8 steps of 16 rows: the training call peaked at 36 MiB (Zen 4), at 60
# with the float32 copies (0416c44).
@pytest.mark.skipif(not bf16_products_expected(), reason="bfloat16 products need the AVX2 module or AVX512-BF16")
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
def test_bf16_backward_makes_no_float32_copy_of_the_weights():
    torch.manual_seed(0)
    module = fused_rnn.GRU(1024, 1024).to(torch.bfloat16)
    x = torch.randn(8, 16, 1024, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(8, 16, 1024, dtype=torch.bfloat16)
    w_hh_bytes = module.weight_hh_l0.numel() * module.weight_hh_l0.element_size()
    assert training_peak_bytes(module, x, grad) < 8 * w_hh_bytes


def least_peak_bytes(step):
    """The least peak memory of three calls of step (after one to warm)."""
    step()
    return min(_peak_memory_bytes(step, torch.device("cpu")) for _ in range(3))


def training_peak_bytes(module, x, grad):
    """The least peak memory of three forward and backward calls (after one to warm)."""
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x)[0].backward(grad)

    return least_peak_bytes(step)


def inference_peak_bytes(module, x):
    """The least peak memory of three inference calls (after one to warm)."""
    def step():
        with torch.no_grad():
            module(x)

    return least_peak_bytes(step)


# Inference calls that make no float32 copy of what they can read as stored, each peaking below the
# float32 size of what the copy would be, on bfloat16 products (the cache sizes and, where there are
# AMX tiles, the AVX512-BF16 kernel make the LSTMs fold their input projection into the steps on any
# machine: on the tiles 16 rows a step hoist it for I=1024):
# - folded: no float32 copy of W_ih for a projection that never runs (made until 2026-12-06: LSTM
#   I=1024 H=256, 4 steps of 16 rows, peaked at 6.8 MiB, now 2.8, where the folded bfloat16 panels
#   of [W_hh, W_ih] take 2.5);
# - folded, an odd number of features (not read as stored): the input converted to float32 a chunk
#   of steps at a time, never whole (LSTM I=1023 H=256, 200 steps of 16 rows: 8.8 MiB, where the
#   whole input in float32 is 12.5);
# - hoisted (GRU): the projection reads the input's rows as they are, not a float32 copy rounded
#   back to bfloat16 (I=1024 H=64, 8 steps of 64 rows in one chunk: 4.1 MiB before, now 1.0).
@pytest.mark.skipif(not bf16_products_expected(), reason="bfloat16 products need the AVX2 module or AVX512-BF16")
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
@pytest.mark.parametrize("case", ["folded-w_ih", "folded-odd-input", "hoisted-input"])
def test_bf16_inference_makes_no_float32_copy_of_what_it_reads_as_stored(case, set_cache_sizes):
    set_cache_sizes(1 << 20, 64 << 20)
    torch.manual_seed(0)
    kind, input_size, hidden, steps, batch = {"folded-w_ih": ("LSTM", 1024, 256, 4, 16),
                                              "folded-odd-input": ("LSTM", 1023, 256, 200, 16),
                                              "hoisted-input": ("GRU", 1024, 64, 8, 64)}[case]
    module = getattr(fused_rnn, kind)(input_size, hidden).to(torch.bfloat16).eval()
    x = torch.randn(steps, batch, input_size, dtype=torch.bfloat16)
    copied = module.weight_ih_l0 if case == "folded-w_ih" else x
    fused_rnn._cpu.set_amx_products(amx_products_expected() and kind == "GRU")
    try:
        assert inference_peak_bytes(module, x) < copied.numel() * 4
    finally:
        fused_rnn._cpu.set_amx_products(amx_products_expected())


# On AMX tiles a bfloat16 LSTM of fewer than 64 rows a step hoists a wide input's projection out of
# the steps (csrc/cpu/backend.cpp, amx_hoists_input), a chunk of at most 128 rows at a time
# (max_projection_chunk_rows): B=16 I=H=256 T=100 in chunks of 256 rows peaked at 2.9 MiB, above
# torch.nn's 2.7 (oneDNN), now at 2.4 (Xeon guest).
@pytest.mark.skipif(not amx_products_expected(), reason="needs AMX tiles")
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
def test_bf16_amx_hoisted_projection_peaks_at_most_at_nn():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(256, 256).to(torch.bfloat16).eval()
    module = fused_rnn.LSTM(256, 256).to(torch.bfloat16).eval()
    x = torch.randn(100, 16, 256, dtype=torch.bfloat16)
    assert inference_peak_bytes(module, x) <= inference_peak_bytes(reference, x)


# At batch 1 the steps read the bfloat16 W_hh where it lies and the input projection lays W_ih out a
# panel at a time as it multiplies (csrc/cpu/backend.cpp: recurrent_weight, dense_weight): no copy of
# either weight. I=H=1024, 100 steps: until 2026-12-06 both were laid out in bfloat16 panels, the
# call peaking above twice the size of W_hh (LSTM 16+ MiB); now LSTM 2.0 MiB, GRU 1.6, RNN 0.8 (Zen 4).
@pytest.mark.skipif(not bf16_products_expected(), reason="bfloat16 products need the AVX2 module or AVX512-BF16")
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
@pytest.mark.parametrize("class_name", ["LSTM", "GRU", "RNN"])
def test_bf16_inference_at_batch_1_makes_no_copy_of_the_weights(class_name):
    torch.manual_seed(0)
    module = getattr(fused_rnn, class_name)(1024, 1024).to(torch.bfloat16).eval()
    x = torch.randn(100, 1, 1024, dtype=torch.bfloat16)
    w_hh = module.weight_hh_l0
    assert inference_peak_bytes(module, x) < w_hh.numel() * w_hh.element_size()


# A bfloat16 layer's chunk of float32 gates holds at most half the steps (csrc/layer.h,
# narrow_steps): GRU I=H=64, 100 steps of 16 rows, hoisted, until 2026-12-06 one chunk of 85 steps
# (1 MiB), the call peaking at 1.25 MiB, above the 1.17 MiB all the steps' gates take in float32;
# now two of 50, 0.84 MiB (torch.nn 1.05, Zen 4). (With float32 products the input's and the
# output's chunks in float32 come on top.)
@pytest.mark.skipif(not bf16_products_expected(), reason="bfloat16 products need the AVX2 module or AVX512-BF16")
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
def test_bf16_inference_chunks_hold_half_the_steps_gates():
    torch.manual_seed(0)
    steps, batch, hidden = 100, 16, 64
    module = fused_rnn.GRU(hidden, hidden).to(torch.bfloat16).eval()
    x = torch.randn(steps, batch, hidden, dtype=torch.bfloat16)
    assert inference_peak_bytes(module, x) < steps * batch * 3 * hidden * 4


# A bfloat16 layer's backward converts each chunk's rows of the output (h_prev with them), dL/d
# output and x to float32, and computes its input gradient there: a chunk's copies take at most half
# of what those tensors take in bfloat16 (csrc/layer.h, layer_backward_in_compute_type). RNN
# I=H=64, 100 steps of 16 rows: until 2026-12-06 one chunk of all the steps, the call peaking at
# 3.4 MiB (torch.nn 1.1), above the 1.6 MiB four whole float32 copies take; now five chunks, 0.9 MiB
# (Zen 4).
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
def test_bf16_training_chunks_count_the_float32_copies():
    torch.manual_seed(0)
    steps, batch, hidden = 100, 16, 64
    module = fused_rnn.RNN(hidden, hidden).to(torch.bfloat16)
    x = torch.randn(steps, batch, hidden, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(steps, batch, hidden, dtype=torch.bfloat16)
    assert training_peak_bytes(module, x, grad) < 4 * steps * batch * hidden * 4


# A bfloat16 training call at batch 1 makes no copy of the weights nor of their gradients: its
# backward's steps read W_hh where it lies (csrc/cpu/backend.cpp, step_weight), the input gradient
# lays W_ih out a panel at a time (dense_weight), and W_ih's and W_hh's gradients, one GEMM each
# over all the steps, are rounded to bfloat16 a slab of rows at a time (weight_grad_out), not
# computed whole in float32. I=H=1024, 50 steps: until 2026-12-06 the call peaked above twice the
# size of the bfloat16 weights (LSTM 36 MiB, GRU 29, RNN 13.5, beyond the gradients it replaces);
# now LSTM 4.3 MiB, GRU 4.1, RNN 1.3 (Zen 4).
@pytest.mark.skipif(not bf16_products_expected(), reason="bfloat16 products need the AVX2 module or AVX512-BF16")
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
@pytest.mark.parametrize("class_name", ["LSTM", "GRU", "RNN"])
def test_bf16_training_at_batch_1_makes_no_copy_of_the_weights(class_name):
    torch.manual_seed(0)
    module = getattr(fused_rnn, class_name)(1024, 1024).to(torch.bfloat16)
    x = torch.randn(50, 1, 1024, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(50, 1, 1024, dtype=torch.bfloat16)
    w_hh = module.weight_hh_l0
    assert training_peak_bytes(module, x, grad) < w_hh.numel() * w_hh.element_size()


# At batch 1 a backward chunk holds far more steps than its float32 copies may (it keeps the GEMMs'
# minimum of rows); a GRU's or RNN's steps then convert the reserve's and dL/d output's rows in
# parts as they reach them (csrc/layer.h, by_parts). GRU I=H=2048, 250 steps (one chunk): until
# 2026-12-06 the whole chunk's were converted at once (9.8 MiB), the call peaking at 37.4 MiB; now
# in four parts, 30.2-30.6 (Zen 4; at I=H=1024 this RSS measure spread by 1.5 MiB from process to
# process, more than the parts saved there).
@pytest.mark.skipif(not bf16_products_expected(), reason="bfloat16 products need the AVX2 module or AVX512-BF16")
@pytest.mark.skipif(not _can_reset_rss_peak(), reason="needs a writable /proc/self/clear_refs")
def test_bf16_training_at_batch_1_converts_the_reserve_in_parts():
    torch.manual_seed(0)
    steps, hidden = 250, 2048
    module = fused_rnn.GRU(hidden, hidden).to(torch.bfloat16)
    x = torch.randn(steps, 1, hidden, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(steps, 1, hidden, dtype=torch.bfloat16)
    whole_float32_copies = steps * (4 * hidden + hidden) * 4  # the reserve's and dL/d output's
    assert training_peak_bytes(module, x, grad) < 3.5 * whole_float32_copies


def emulated_layer(mode, x, hx, cx, w_ih, w_hh, b_ih, b_hh, round_h):
    """Output of one unpacked layer in float64 from the same bfloat16 values, with h_prev rounded to
    bfloat16 before each step's recurrent GEMM where round_h (x already is bfloat16)."""
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = (t.double() for t in (x, hx, cx, w_ih, w_hh, b_ih, b_hh))
    h, c, outputs = hx, cx, []
    for x_t in x:
        x_gates = torch.nn.functional.linear(x_t, w_ih, b_ih)
        h_gates = torch.nn.functional.linear(h.bfloat16().double() if round_h else h, w_hh, b_hh)
        if mode == "lstm":
            i, f, g, o = (x_gates + h_gates).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif mode == "gru":
            x_r, x_z, x_n = x_gates.chunk(3, 1)
            h_r, h_z, h_n = h_gates.chunk(3, 1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
        else:
            h = torch.tanh(x_gates + h_gates)
        outputs.append(h)
    return torch.stack(outputs)


# (steps, batch, input, hidden): odd sizes (padding of the bfloat16 pairs), batches below and above
# the one where the input is folded into the recurrent GEMM, and enough rows for the input
# projection's own bfloat16 GEMM; batch 1 (W_hh read in place, its rows' k odd, or a whole vector
# and half of one); inputs wide enough for AMX tiles to hoist an LSTM's projection at 16 and 32 rows
# (in row groups of 16), over chunks of 128 rows.
BF16_PRODUCT_SHAPES = [(12, 5, 7, 33), (12, 20, 17, 40), (6, 130, 9, 16), (10, 24, 64, 48), (20, 1, 17, 33),
                       (24, 1, 64, 48), (20, 16, 200, 40), (12, 32, 200, 40)]


@pytest.mark.parametrize("shape", BF16_PRODUCT_SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn"])
def test_bf16_layer_rounds_exactly_the_gemm_operands(mode, shape, bf16_kernel):
    """A bfloat16 layer op equals, to the rounding of its output, float64 arithmetic on its bfloat16
    inputs with h_prev rounded to bfloat16 for each step's GEMM (bfloat16 products) or not (float32
    products: the default module, or AVX-512 without AVX512-BF16): >= 98% of outputs identical to
    the expected model (measured 99.3-100%), while the other model agrees on only 67-87%, so the
    test tells the two apart."""
    assert_layer_rounds_exactly_the_gemm_operands(mode, shape)


def assert_layer_rounds_exactly_the_gemm_operands(mode, shape, reverse=False):
    steps, batch, input_size, hidden = shape
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[mode]
    scale = hidden ** -0.5
    x, hx, cx = (torch.randn(*s).bfloat16() for s in ((steps, batch, input_size), (batch, hidden), (batch, hidden)))
    w_ih, w_hh = ((torch.randn(gates * hidden, n) * scale).bfloat16() for n in (input_size, hidden))
    b_ih, b_hh = ((torch.randn(gates * hidden) * scale).bfloat16() for _ in range(2))
    ops = torch.ops.fused_rnn
    if mode == "lstm":
        y = ops.lstm_layer(x, None, hx, cx, w_ih, w_hh, b_ih, b_hh, None, reverse, False)[0]
    elif mode == "gru":
        y = ops.gru_layer(x, None, hx, w_ih, w_hh, b_ih, b_hh, reverse, False)[0]
    else:
        y = ops.rnn_layer(x, None, hx, w_ih, w_hh, b_ih, b_hh, False, reverse, False)[0]
    if reverse:  # the emulation runs forward in time
        x, y = x.flip(0), y.flip(0)
    expected_rounding = bf16_products_expected()
    agreement = {}
    for round_h in (True, False):
        exact = emulated_layer(mode, x, hx, cx, w_ih, w_hh, b_ih, b_hh, round_h)
        agreement[round_h] = (y == exact.bfloat16()).double().mean().item()
    assert agreement[expected_rounding] >= 0.98, agreement
    assert agreement[not expected_rounding] < 0.92, agreement


# Each step's pointwise passes round the h_new of their units for the next step's GEMM, and into
# the bfloat16 output (fused_bf16_step): with the steps split between the threads by units (a small
# L2) or run in row groups (a large one: each thread the steps of its rows), over chunks of steps
# (64 rows x 40 steps: an LSTM's hoisted gates take 3 chunks), in reverse, with odd sizes (pairs
# padded, panels of fewer units than a vector), the input projection folded in or hoisted (a
# small L3).
@pytest.mark.parametrize("groups", [False, True], ids=["by-units", "row-groups"])
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "hoisted"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", [(40, 64, 16, 48), (40, 160, 15, 49), (9, 20, 17, 33)],
                         ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn"])
def test_bf16_steps_round_the_next_h_prev_exactly(mode, shape, reverse, folded, groups, set_cache_sizes, bf16_kernel):
    torch.set_num_threads(2)  # the fixture restores it
    l2 = 64 << 20 if groups else 1 << 12
    set_cache_sizes(l2, max(2 * l2, fused_rnn._cpu.cache_sizes()[1]) if folded else 1 << 12)
    assert_layer_rounds_exactly_the_gemm_operands(mode, shape, reverse)


@pytest.mark.parametrize("batch", [1, 5, 20], ids=["B1", "B5", "B20"])
@pytest.mark.parametrize("class_name", ["LSTM", "GRU", "RNN"])
def test_bf16_odd_sizes_against_float64(class_name, batch, bf16_kernel):
    """Odd input and hidden sizes (bfloat16 panels pad each part of k to pairs, in the forward's
    [h_prev, x_t] and the backward's gate gradients) and, with B1 and B5, an odd number of rows (the
    k of the weight gradients' GEMMs), batches below and above the folding one; with B1, W_hh read
    where it lies by both directions' steps (an odd k of gate rows for GRU and RNN, a part of a
    vector of units) and the weight gradients rounded by slabs: outputs and every gradient within
    bfloat16 rounding of the float64 layer (a misplaced pair is off by the size of the values)."""
    torch.manual_seed(0)
    module = getattr(fused_rnn, class_name)(17, 33, num_layers=2, bidirectional=True).bfloat16()
    exact = copy.deepcopy(module).double()
    x = torch.randn(13 if batch > 1 else 41, batch, 17).bfloat16()  # B1: 41 rows, enough for panels
    results = []
    for m, inp in ((module, x.requires_grad_()), (exact, x.detach().double().requires_grad_())):
        out, _ = m(inp)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out.double() * weights).sum().backward()
        results.append([out.detach(), inp.grad] + [p.grad for p in m.parameters()])
    for name, ours, ref in zip(["output", "input grad"] + [n for n, _ in module.named_parameters()], *results):
        error = (ours.double() - ref).abs().max().item() / ref.abs().max().item()
        assert error < 2e-2, f"{name}: relative error {error:.3g}"
