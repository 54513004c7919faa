"""Property-based agreement with torch.nn: hypothesis draws a layer or cell configuration and an
input layout (empty batch, single step, unbatched, packed with random lengths, sorted or not,
with or without an initial state), and the fused module must reproduce torch.nn's outputs and
every gradient in float64 to 1e-10. Derandomized and database-free, so every run checks the
same examples."""
from typing import NamedTuple, Optional

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from helpers import CELL_KINDS, LAYER_KINDS, assert_twins_agree, leaf, make_kind_pair

FLOAT64 = dict(atol=1e-10, rtol=1e-10)
SIZES = st.integers(1, 6)

# Derandomized: the examples come from a fixed seed, not from the clock or a saved database.
# The autouse seeding fixture in conftest.py is function-scoped; that is harmless here, since
# every example seeds torch itself.
PROPERTY_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class LayerConfig(NamedTuple):
    kind: str
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = False
    proj_size: int = 0

    def build_pair(self, seed):
        options = self._asdict()
        del options["kind"]
        if self.kind != "LSTM":
            del options["proj_size"]  # GRU and RNN reject the argument
        return make_kind_pair(self.kind, **options, seed=seed, dtype=torch.float64)

    def state_shapes(self, batch):
        """Shapes of h_0, and c_0 for LSTM; batch None for an unbatched input."""
        stack = self.num_layers * (2 if self.bidirectional else 1)
        batch_dims = () if batch is None else (batch,)
        sizes = [self.proj_size or self.hidden_size] + ([self.hidden_size] if self.kind == "LSTM" else [])
        return [(stack, *batch_dims, size) for size in sizes]


class Layout(NamedTuple):
    """How the input is presented. form: 'batched' (steps x batch), 'unbatched' (steps only)
    or 'packed' (one sequence per entry of `lengths`)."""
    form: str
    steps: int
    batch: int = 1
    lengths: Optional[tuple] = None
    enforce_sorted: bool = True
    with_state: bool = False
    seed: int = 0


@st.composite
def layer_configs(draw, kind):
    hidden_size = draw(SIZES)
    proj_size = draw(st.integers(0, hidden_size - 1)) if kind == "LSTM" else 0
    return LayerConfig(kind, draw(SIZES), hidden_size, num_layers=draw(st.integers(1, 2)), bias=draw(st.booleans()),
                       batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()), proj_size=proj_size)


@st.composite
def layouts(draw):
    form = draw(st.sampled_from(["batched", "unbatched", "packed"]))
    steps = draw(st.integers(1, 4))
    batch, lengths, enforce_sorted = 1, None, True
    if form == "batched":
        batch = draw(st.integers(0, 3))
    elif form == "packed":
        lengths = draw(st.lists(st.integers(1, steps), min_size=1, max_size=3))
        enforce_sorted = draw(st.booleans())
        lengths = tuple(sorted(lengths, reverse=True) if enforce_sorted else lengths)
        steps, batch = max(lengths), len(lengths)
    return Layout(form, steps, batch, lengths, enforce_sorted, draw(st.booleans()), draw(st.integers(0, 2**16)))


def assert_layer_matches_torch_nn(config, layout):
    reference, fused = config.build_pair(seed=layout.seed)
    torch.manual_seed(layout.seed)
    if layout.form == "unbatched":
        x = leaf(layout.steps, config.input_size)
    elif config.batch_first:
        x = leaf(layout.batch, layout.steps, config.input_size)
    else:
        x = leaf(layout.steps, layout.batch, config.input_size)
    state_batch = None if layout.form == "unbatched" else layout.batch
    states = [leaf(*shape) for shape in config.state_shapes(state_batch)] if layout.with_state else []
    hx = None if not states else (tuple(states) if config.kind == "LSTM" else states[0])

    def call(module):
        if layout.form != "packed":
            return module(x, hx)
        packed = pack_padded_sequence(x, list(layout.lengths), batch_first=config.batch_first,
                                      enforce_sorted=layout.enforce_sorted)
        output, hidden = module(packed, hx)
        padded, lengths = pad_packed_sequence(output, batch_first=config.batch_first)  # undoes the sorting
        assert lengths.tolist() == list(layout.lengths)
        return padded, hidden

    assert_twins_agree(reference, fused, call, [x, *states], **FLOAT64)


# Layouts that must always be checked, whatever hypothesis draws.
EDGE_CASES = {
    "empty_batch": (LayerConfig("LSTM", 3, 4, num_layers=2, bidirectional=True, proj_size=2),
                    Layout("batched", steps=3, batch=0, with_state=True)),
    "single_step": (LayerConfig("GRU", 2, 3, batch_first=True), Layout("batched", steps=1, batch=2)),
    "unbatched": (LayerConfig("RNN_RELU", 2, 3, num_layers=2, bias=False),
                  Layout("unbatched", steps=3, with_state=True)),
    "packed_unsorted": (LayerConfig("LSTM", 2, 5, bidirectional=True, batch_first=True, proj_size=3),
                        Layout("packed", steps=4, batch=3, lengths=(2, 4, 1), enforce_sorted=False, with_state=True)),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_layer_edge_cases_match_torch_nn(case):
    assert_layer_matches_torch_nn(*EDGE_CASES[case])


@pytest.mark.parametrize("kind", sorted(LAYER_KINDS))  # every kind gets its own examples
@PROPERTY_SETTINGS
@given(data=st.data())
def test_layers_match_torch_nn(kind, data):
    assert_layer_matches_torch_nn(data.draw(layer_configs(kind), label="config"), data.draw(layouts(), label="layout"))


@pytest.mark.parametrize("kind", sorted(CELL_KINDS))
@PROPERTY_SETTINGS
@given(input_size=SIZES, hidden_size=SIZES, bias=st.booleans(), batch=st.one_of(st.none(), st.integers(0, 3)),
       with_state=st.booleans(), seed=st.integers(0, 2**16))
@example(input_size=2, hidden_size=3, bias=True, batch=0, with_state=True, seed=0)
@example(input_size=2, hidden_size=3, bias=False, batch=None, with_state=True, seed=0)
def test_cells_match_torch_nn(kind, input_size, hidden_size, bias, batch, with_state, seed):
    """batch None means an unbatched input."""
    reference, fused = make_kind_pair(kind, input_size, hidden_size, bias=bias, seed=seed, dtype=torch.float64)
    torch.manual_seed(seed)
    leading = () if batch is None else (batch,)
    x = leaf(*leading, input_size)
    states = [leaf(*leading, hidden_size) for _ in range(2 if kind == "LSTMCell" else 1)] if with_state else []
    hx = None if not states else (tuple(states) if kind == "LSTMCell" else states[0])
    assert_twins_agree(reference, fused, lambda module: module(x, hx), [x, *states], **FLOAT64)
