"""The persistent CUDA kernels (csrc/cuda/persistent.cu), forced with FUSED_RNN_CUDA_KERNEL=persistent:
they run (fused_rnn.cuda_recurrence_counts), they are at least as accurate as cuDNN against a float64
truth and agree with the per-step path, on sizes that cross every tile boundary (hidden and batch
sizes that are not multiples of the tiles, batches beyond one batch tile, packed batches shrinking
step by step, several launches per chunk), with both grid barriers, in CUDA graphs, on a side
stream, under opcheck; and they step aside (per-step path) where they cannot run. Their index
math and step loops are tested on the CPU by tests/test_persistent.py. Skipped without a GPU."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from helpers import (LAYER_KINDS, OPCHECK_CASE_ARGS, OPCHECK_CASE_IDS, OPCHECK_CASES, Float64Truth,
                     assert_backward_op_opcheck_passes, assert_close_scaled, assert_layer_op_opcheck_passes,
                     assert_results_at_least_as_accurate, assert_same_results, capture_cuda_graph,
                     exact_outputs_and_grads, make_kind_pair, named_outputs_and_grads, output_tensors, rounding_floor)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (or a CPU-only torch)"),
    pytest.mark.skipif(not fused_rnn.backends()["cuda"], reason="fused_rnn was built without its CUDA backend"),
]

CUDA = torch.device("cuda")
HALF_TYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(autouse=True)
def _no_tf32():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture
def kernel(monkeypatch):
    """kernel(path) forces the CUDA recurrence path for the rest of the test."""
    return lambda path: monkeypatch.setenv("FUSED_RNN_CUDA_KERNEL", path)


def counted(fn):
    """(fn(), what fused_rnn.cuda_recurrence_counts() counted during it)."""
    torch.cuda.synchronize()
    before = fused_rnn.cuda_recurrence_counts()
    result = fn()
    torch.cuda.synchronize()
    after = fused_rnn.cuda_recurrence_counts()
    return result, {key: after[key] - before[key] for key in after}


def lengths_shrinking(batch, steps):
    """Lengths of `batch` sequences, at most `steps`, that make the packed batch shrink at many steps."""
    return [max(1, steps - (k * steps) // batch) for k in range(batch)]


def inputs(kind, module, batch, steps, packed, dtype):
    """(leaves, call): input (and h0, c0) drawn on the CPU in float32 and rounded to `dtype` on the GPU."""
    h_out = module.proj_size or module.hidden_size
    states = module.num_layers * (2 if module.bidirectional else 1)
    draw = lambda *shape: torch.randn(*shape).to(CUDA, dtype).requires_grad_()  # noqa: E731
    leaves = {"input": draw(steps, batch, module.input_size), "h0": draw(states, batch, h_out)}
    if kind == "LSTM":
        leaves["c0"] = draw(states, batch, module.hidden_size)
    lengths = lengths_shrinking(batch, steps)

    def call(m, ls):
        x = pack_padded_sequence(ls["input"], lengths, enforce_sorted=False) if packed else ls["input"]
        return m(x, (ls["h0"], ls["c0"]) if kind == "LSTM" else ls["h0"])

    return leaves, call


def assert_runs(path, counts):
    if path == "persistent":
        assert counts["persistent_launches"] > 0 and counts["stepwise_steps"] == 0, counts
    else:
        assert counts["persistent_launches"] == 0 and counts["stepwise_steps"] > 0, counts


# (hidden, batch): not multiples of the FMA (4) or MMA (16 rows, 8 batch) tiles; 70 rows exceed
# one batch tile (64); 1 is the smallest; 300 spreads over more CTAs than rows per granule.
SIZES = [(1, 1), (17, 5), (100, 37), (300, 70)]


@pytest.mark.parametrize("barrier", ["grid", "counter"])
@pytest.mark.parametrize("packed", [False, True], ids=["3d", "packed"])
@pytest.mark.parametrize("hidden,batch", SIZES, ids=[f"H{h}-B{b}" for h, b in SIZES])
@pytest.mark.parametrize("dtype", list(HALF_TYPES.values()), ids=list(HALF_TYPES))
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_at_least_as_accurate_as_cudnn(kind, dtype, hidden, batch, packed, barrier, kernel, monkeypatch):
    """2 layers, both directions, 7 steps: outputs and every gradient against a float64 truth, no
    further off than cuDNN's (plus a rounding floor); in float32 also the per-step path's results."""
    monkeypatch.setenv("FUSED_RNN_CUDA_BARRIER", barrier)
    reference, fused = make_kind_pair(kind, 6, hidden, num_layers=2, bidirectional=True, device=CUDA, dtype=dtype)
    leaves, call = inputs(kind, fused, batch, 7, packed, dtype)
    kernel("persistent")
    ours, counts = counted(lambda: named_outputs_and_grads(fused, leaves, call))
    assert_runs("persistent", counts)
    exact = exact_outputs_and_grads(Float64Truth(reference, dtype), leaves, call)
    assert_results_at_least_as_accurate(ours, named_outputs_and_grads(reference, leaves, call), exact,
                                        floor=rounding_floor(dtype))
    if dtype == torch.float32:
        kernel("stepwise")
        assert_same_results(ours, named_outputs_and_grads(fused, leaves, call), 2e-5)


@pytest.mark.parametrize("dtype", list(HALF_TYPES.values()), ids=list(HALF_TYPES))
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_large_hidden_size_matches_the_per_step_path(kind, dtype, kernel):
    """H = 1024 (W_hh of an LSTM is 16 MiB in float32: about 124 KiB per multiprocessor), batch 16,
    50 steps, one layer: forward and backward, against the per-step path in the same dtype."""
    _, fused = make_kind_pair(kind, 64, 1024, device=CUDA, dtype=dtype)
    leaves, call = inputs(kind, fused, 16, 50, False, dtype)
    kernel("persistent")
    ours, counts = counted(lambda: named_outputs_and_grads(fused, leaves, call))
    assert_runs("persistent", counts)
    kernel("stepwise")
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    assert_same_results(ours, named_outputs_and_grads(fused, leaves, call), tolerance)


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_long_packed_sequence_matches_the_per_step_path(kind, kernel):
    """T = 3000 (thousands of grid barriers; inference runs chunks of 2^24 gate values), and a
    packed batch of 160 sequences of distinct lengths, more runs of equal batch size than one
    launch's schedule holds (128): several launches per chunk."""
    _, fused = make_kind_pair(kind, 8, 32, bidirectional=True, device=CUDA, dtype=torch.float32)
    for batch, steps, packed in [(4, 3000, False), (160, 200, True)]:
        leaves, call = inputs(kind, fused, batch, steps, packed, torch.float32)
        kernel("persistent")
        ours, counts = counted(lambda: named_outputs_and_grads(fused, leaves, call))
        assert_runs("persistent", counts)
        kernel("stepwise")
        assert_same_results(ours, named_outputs_and_grads(fused, leaves, call), 1e-4)


def test_steps_aside_where_it_cannot_run(kernel):
    """float64, an LSTM projection and a W_hh larger than the GPU's shared memory run per step,
    with the same results as asked for per step."""
    cases = [("LSTM", torch.float64, 16, {}), ("LSTM", torch.float32, 16, {"proj_size": 8}),
             ("LSTM", torch.float32, 2048, {})]  # W_hh 64 MiB: more than all shared memory
    for kind, dtype, hidden, extra in cases:
        _, fused = make_kind_pair(kind, 8, hidden, device=CUDA, dtype=dtype, **extra)
        leaves, call = inputs(kind, fused, 3, 4, False, dtype)
        kernel("persistent")
        ours, counts = counted(lambda: named_outputs_and_grads(fused, leaves, call))
        assert_runs("stepwise", counts)
        kernel("stepwise")
        assert_same_results(ours, named_outputs_and_grads(fused, leaves, call), 0.0)


def test_auto_runs_per_step_until_validated(kernel):
    _, fused = make_kind_pair("LSTM", 8, 32, device=CUDA)
    kernel("auto")
    _, counts = counted(lambda: fused(torch.randn(5, 3, 8, device=CUDA)))
    assert_runs("stepwise", counts)


def test_unknown_choices_are_refused(kernel, monkeypatch):
    _, fused = make_kind_pair("GRU", 8, 32, device=CUDA)
    x = torch.randn(5, 3, 8, device=CUDA)
    kernel("fastest")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_KERNEL must be auto, persistent or stepwise, got 'fastest'"):
        fused(x)
    kernel("persistent")
    monkeypatch.setenv("FUSED_RNN_CUDA_BARRIER", "spin")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_BARRIER must be grid or counter, got 'spin'"):
        fused(x)


@pytest.mark.parametrize("packed", [False, True], ids=["3d", "packed"])
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_captured_in_a_cuda_graph_replays_like_eager(kind, packed, kernel):
    kernel("persistent")
    _, fused = make_kind_pair(kind, 8, 24, num_layers=2, bidirectional=True, device=CUDA)
    lengths = lengths_shrinking(5, 9)

    def run(x):
        return output_tensors(fused(pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x))

    static_input = torch.randn(9, 5, 8, device=CUDA)
    with torch.no_grad():
        graph, static_output = capture_cuda_graph(run, static_input)
        for _ in range(3):
            fresh = torch.randn_like(static_input)
            static_input.copy_(fresh)
            _, counts = counted(graph.replay)
            assert counts == {"persistent_launches": 0, "stepwise_steps": 0}  # a replay launches from the graph
            for k, (replayed, eager) in enumerate(zip(static_output, run(fresh))):
                assert_close_scaled(replayed, eager, 1e-5, f"output[{k}]")


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_runs_on_the_current_stream(kind, kernel):
    kernel("persistent")
    _, fused = make_kind_pair(kind, 8, 24, num_layers=2, bidirectional=True, device=CUDA)
    leaves, call = inputs(kind, fused, 5, 9, False, torch.float32)
    expected = named_outputs_and_grads(fused, leaves, call)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        late = {name: (t.detach() * 1).requires_grad_() for name, t in leaves.items()}
        actual = named_outputs_and_grads(fused, late, call)
    torch.cuda.current_stream().wait_stream(side)
    assert_same_results(actual, expected, 0.0)


@pytest.mark.parametrize(OPCHECK_CASE_ARGS, [c for c in OPCHECK_CASES if not c[-1]],
                         ids=[i for c, i in zip(OPCHECK_CASES, OPCHECK_CASE_IDS) if not c[-1]])
def test_opcheck(kind, packed, reverse, bias, proj, kernel):
    """The layer and backward ops on the persistent path (float32; projections run per step)."""
    kernel("persistent")
    options = dict(device=CUDA, dtype=torch.float32, input_size=4)
    _, counts = counted(lambda: assert_layer_op_opcheck_passes(kind, packed, reverse, bias, proj, **options))
    assert counts["persistent_launches"] > 0
    assert_backward_op_opcheck_passes(kind, packed, reverse, bias, proj, **options)
