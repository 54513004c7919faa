"""One layer direction in plain torch ops, step by step: what the fused ops compute, differentiable
any number of times. The ops' backward runs it when asked for gradients that are themselves
differentiable (create_graph=True, e.g. for double backward); everything else runs the fused
kernels. Same conventions as the ops (csrc/ops.cpp): input [T, B, I], or packed rows [N, I] with
batch_sizes; gate order LSTM (i, f, g, o), GRU (r, z, n)."""
import torch
import torch.nn.functional as F


def _cell_step(mode, relu, x_gates, h, c, w_hh, b_hh, w_hr):
    """One step on the rows of h: x_gates = x W_ih^T + b_ih. Returns the new (h, c)."""
    h_gates = F.linear(h, w_hh, b_hh)
    if mode == "lstm":
        i, f, g, o = (x_gates + h_gates).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c
    if mode == "gru":
        x_r, x_z, x_n = x_gates.chunk(3, 1)
        h_r, h_z, h_n = h_gates.chunk(3, 1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    pre = x_gates + h_gates
    return (torch.relu(pre) if relu else torch.tanh(pre)), None


def layer(mode, input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, relu=False):
    """(output, h_n, c_n) of one layer direction; `mode` is "lstm", "gru" or "rnn", c_n None but
    for LSTM. Step t updates the first batch_sizes[t] rows of the state; the other rows keep
    theirs, so each row ends at its own last step and, time reversed, starts from hx."""
    if batch_sizes is None:
        sizes, x_gates = [input.size(1)] * input.size(0), F.linear(input, w_ih, b_ih).unbind(0)
    else:
        sizes = batch_sizes.tolist()
        x_gates = F.linear(input, w_ih, b_ih).split(sizes)
    h, c = hx, cx
    outputs = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        rows = sizes[t]
        h_new, c_new = _cell_step(mode, relu, x_gates[t], h[:rows], None if c is None else c[:rows], w_hh, b_hh, w_hr)
        h = torch.cat([h_new, h[rows:]])
        c = None if c is None else torch.cat([c_new, c[rows:]])
        outputs[t] = h_new
    if batch_sizes is None:
        output = torch.stack(outputs) if outputs else input.new_empty((0, input.size(1), hx.size(1)))
    else:
        output = torch.cat(outputs) if outputs else input.new_empty((0, hx.size(1)))
    return output, h, c
