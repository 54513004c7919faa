"""fused_rnn.convert: to_fused swaps every torch.nn recurrent module in a model for its fused
twin (configuration, weights, device, dtype, training mode and requires_grad kept), to_torch
swaps back, and the converted model computes what the original computed."""
import warnings

import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn.convert import to_fused, to_torch
from helpers import assert_all_close, assert_all_equal, outputs_and_grads

FLOAT64 = dict(atol=1e-10, rtol=1e-10)
RECURRENT = (nn.RNNBase, nn.RNNCellBase, fused_rnn.RNNBase, fused_rnn.RNNCellBase)


class Encoder(nn.Module):
    """A 'pretrained' model with recurrent modules at several depths and in every container."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.body = nn.Sequential(nn.LSTM(4, 6, num_layers=2, proj_size=3, dropout=0.25, bidirectional=True))
        self.heads = nn.ModuleList([nn.GRU(6, 3, bias=False), nn.RNN(6, 2, nonlinearity="relu")])
        self.cells = nn.ModuleDict({"lstm": nn.LSTMCell(3, 2), "gru": nn.GRUCell(2, 2, bias=False),
                                    "rnn": nn.RNNCell(2, 2, nonlinearity="relu")})

    def forward(self, x):
        y, (h, c) = self.body[0](self.embed(x))
        gru_y, gru_h = self.heads[0](y)
        rnn_y, rnn_h = self.heads[1](y)
        outputs = [y, h, c, gru_y, gru_h, rnn_y, rnn_h]
        state = None
        for x_t in gru_y.unbind(0):
            state = self.cells["lstm"](x_t, state)
            outputs.append(self.cells["rnn"](self.cells["gru"](state[0])))
        return outputs


def make_encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder().double()


def recurrent_modules(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, RECURRENT)}


def assert_same_model(actual, expected):
    """Same module names and configuration; bitwise-equal state_dict; same requires_grad flags."""
    assert [name for name, _ in actual.named_modules()] == [name for name, _ in expected.named_modules()]
    assert {n: repr(m) for n, m in actual.named_modules()} == {n: repr(m) for n, m in expected.named_modules()}
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert list(actual_state) == list(expected_state)
    assert_all_equal(list(actual_state.values()), list(expected_state.values()))
    assert ({n: p.requires_grad for n, p in actual.named_parameters()}
            == {n: p.requires_grad for n, p in expected.named_parameters()})


def test_to_fused_replaces_every_recurrent_module_with_its_fused_twin():
    original = make_encoder()
    fused = to_fused(original)
    for name, module in recurrent_modules(fused).items():
        assert type(module) is getattr(fused_rnn, type(original.get_submodule(name)).__name__), name
    assert type(fused.embed) is nn.Linear
    assert_same_model(fused, original)


def test_to_fused_keeps_configuration_including_dropout_and_projection():
    lstm = to_fused(make_encoder()).body[0]
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.proj_size) == (4, 6, 2, 3)
    assert (lstm.dropout, lstm.bidirectional, lstm.bias, lstm.batch_first) == (0.25, True, True, False)
    heads = to_fused(make_encoder()).heads
    assert heads[0].bias is False
    assert heads[1].nonlinearity == "relu" and heads[1].mode == "RNN_RELU"


def test_converted_model_gives_identical_outputs_and_grads():
    original = make_encoder().eval()  # eval: dropout off, so both sides are deterministic
    fused = to_fused(original)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    expected_outputs, expected_grads = outputs_and_grads(lambda: original(x), [x, *original.parameters()])
    actual_outputs, actual_grads = outputs_and_grads(lambda: fused(x), [x, *fused.parameters()])
    assert_all_close(actual_outputs, expected_outputs, **FLOAT64)
    assert_all_close(actual_grads, expected_grads, **FLOAT64)


def test_round_trip_restores_torch_nn_classes_and_weights():
    original = make_encoder()
    restored = to_torch(to_fused(original))
    for name, module in recurrent_modules(restored).items():
        assert type(module) is type(original.get_submodule(name)), name
    assert_same_model(restored, original)
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        assert_all_equal(restored.eval()(x), original.eval()(x))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_mode_and_dtype_are_kept(training, dtype):
    original = make_encoder().to(dtype).train(training)
    for converted in (to_fused(original), to_torch(to_fused(original))):
        for name, module in converted.named_modules():
            assert module.training is training, name
        assert {p.dtype for p in converted.parameters()} == {dtype}
        assert {p.device for p in converted.parameters()} == {torch.device("cpu")}


def test_device_is_kept():
    """The meta device stands in for an accelerator: the twins are built where the originals live."""
    original = make_encoder().to("meta")
    for converted in (to_fused(original), to_torch(to_fused(original))):
        assert {p.device for p in converted.parameters()} == {torch.device("meta")}


def test_frozen_parameters_stay_frozen():
    original = make_encoder()
    original.body[0].weight_hh_l1_reverse.requires_grad_(False)
    original.cells["gru"].requires_grad_(False)
    assert_same_model(to_fused(original), original)


def test_root_module_is_converted_and_returned():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, proj_size=2, batch_first=True)
    fused = to_fused(lstm)
    assert type(fused) is fused_rnn.LSTM and (fused.proj_size, fused.batch_first) == (2, True)
    assert type(to_torch(fused)) is nn.LSTM
    assert_same_model(fused, lstm)


def test_default_leaves_the_input_untouched_and_inplace_mutates_it():
    original = make_encoder()
    copy = to_fused(original)
    assert copy is not original and type(original.body[0]) is nn.LSTM
    assert copy.embed is not original.embed

    same = to_fused(original, inplace=True)
    assert same is original and type(original.body[0]) is fused_rnn.LSTM


def test_shared_module_stays_shared():
    shared = nn.GRU(2, 2)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    fused = to_fused(model)
    assert type(fused["a"]) is fused_rnn.GRU and fused["a"] is fused["b"][0]


def test_subclasses_are_left_alone():
    """A subclass may override forward, so only the exact torch.nn classes are swapped."""

    class CustomLSTM(nn.LSTM):
        pass

    model = nn.Sequential(CustomLSTM(2, 3))
    assert type(to_fused(model)[0]) is CustomLSTM


def test_conversion_draws_nothing_from_the_global_rng():
    model = make_encoder()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    to_torch(to_fused(model))
    assert torch.equal(torch.rand(3), expected)


def test_conversion_repeats_no_construction_warning():
    with pytest.warns(UserWarning, match="dropout"):
        lstm = nn.LSTM(2, 3, dropout=0.5)  # one layer: dropout has no effect, torch.nn warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_fused(lstm).dropout == 0.5


def test_non_module_is_rejected():
    with pytest.raises(TypeError, match="Module"):
        to_fused([nn.LSTM(2, 3)])
