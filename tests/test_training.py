"""Tutorial-style training: the same small sine-wave regressor trained with a torch.nn recurrent
layer and with its fused_rnn drop-in, from the same seed, follows the same loss curve."""
import math

import pytest
import torch
from torch import nn

import fused_rnn

pytestmark = pytest.mark.usefixtures("torch_test_state")

STEPS, LR, HIDDEN = 30, 1e-2, 16


class SineRegressor(nn.Module):
    """recurrent layer (batch_first) -> Linear head predicting the next value at every step."""

    def __init__(self, lib, kind, dropout):
        super().__init__()
        self.rnn = getattr(lib, kind)(1, HIDDEN, 2, batch_first=True, dropout=dropout, dtype=torch.float64)
        self.head = nn.Linear(HIDDEN, 1, dtype=torch.float64)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


def sine_batches(batch=8, length=20):
    """Sine waves with random phases and frequencies: inputs x[:, :-1], next-value targets x[:, 1:]."""
    g = torch.Generator().manual_seed(0)
    phase = torch.rand(batch, 1, generator=g, dtype=torch.float64) * 2 * math.pi
    freq = 0.2 + 0.3 * torch.rand(batch, 1, generator=g, dtype=torch.float64)
    t = torch.arange(length + 1, dtype=torch.float64)
    wave = torch.sin(freq * t + phase).unsqueeze(-1)
    return wave[:, :-1], wave[:, 1:]


def train(lib, kind, dropout):
    """Trains one regressor; returns (per-step losses, final eval-mode predictions)."""
    torch.manual_seed(0)
    model = SineRegressor(lib, kind, dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = sine_batches()
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        return torch.tensor(losses, dtype=torch.float64), model(x)


@pytest.mark.parametrize("kind,dropout", [("LSTM", 0.0), ("GRU", 0.0), ("LSTM", 0.2)],
                         ids=["LSTM", "GRU", "LSTM-dropout"])
def test_loss_curve_matches_nn(kind, dropout):
    ref_losses, ref_pred = train(nn, kind, dropout)
    our_losses, our_pred = train(fused_rnn, kind, dropout)
    torch.testing.assert_close(our_losses, ref_losses, rtol=1e-9, atol=0)
    torch.testing.assert_close(our_pred, ref_pred, rtol=1e-8, atol=1e-10)
    assert our_losses[-1] < 0.5 * our_losses[0], our_losses


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "GRUCell"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    """torch.utils.checkpoint (both implementations) recomputes the layer in the backward pass and
    gets the gradients of a plain backward; torch.inference_mode gets the plain outputs."""
    torch.manual_seed(0)
    module = getattr(fused_rnn, kind)(3, 4, dtype=torch.float64)
    shape = (2, 3) if kind.endswith("Cell") else (5, 2, 3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def loss(input):
        out = module(input)
        return (out[0] if isinstance(out, tuple) else out).pow(2).sum()

    def gradients(compute):  # by .backward(), which the reentrant checkpoint needs
        wrt = [x, *module.parameters()]
        for t in wrt:
            t.grad = None
        compute().backward()
        return [t.grad for t in wrt]

    plain = gradients(lambda: loss(x))
    for reentrant in (False, True):
        checkpointed = gradients(lambda: torch.utils.checkpoint.checkpoint(loss, x, use_reentrant=reentrant))
        for a, b in zip(checkpointed, plain):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        in_inference_mode = loss(x)
    torch.testing.assert_close(in_inference_mode, loss(x).detach(), rtol=0, atol=0)
