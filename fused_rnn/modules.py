"""Drop-in replacements for torch.nn.RNN/LSTM/GRU and their cells.

Constructors, attributes, parameter names/order/shapes, initialisation (and so the RNG
stream they consume), extra_repr and input validation follow torch.nn; the computation runs
in the torch.ops.fused_rnn kernels. Stacking, directions, dropout and packing are handled
here, once, for every cell type.
"""
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init
from torch.nn.utils.rnn import PackedSequence

from .ops import run_layer

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _check_devices(input, hidden, weight):
    if input.device != weight.device:
        raise RuntimeError("Input and parameter tensors are not at the same device, found input tensor at "
                           f"{input.device} and parameter tensor at {weight.device}")
    for h in hidden:
        if h.device != input.device:
            raise RuntimeError("Input and hidden tensors are not at the same device, found input tensor at "
                               f"{input.device} and hidden tensor at {h.device}")


def _autocasting():
    return torch.is_autocast_enabled("cuda")


# Inside torch.autocast("cpu"), torch.nn's layers run their GEMMs in the region's dtype (autocast
# linear ops, or oneDNN's LSTM op, which autocast casts), but GRU, LSTMCell, GRUCell and the LSTM
# off oneDNN then mix the gates with the previous state (the LSTM's cell state), so their results
# take the promotion of the region's dtype and that state's: float32 for float32 input or for the
# other half type, unless a state is given in another dtype. fused_rnn's layers run in that dtype
# (torch 2.13's behaviour, tests/test_half_precision.py).
# The input dtypes oneDNN runs torch.nn's LSTM in on this CPU (none in a build without oneDNN).
_ONEDNN_LSTM_DTYPES = ({torch.float32} | {dtype for dtype, supported in (
    (torch.bfloat16, torch.ops.mkldnn._is_mkldnn_bf16_supported),
    (torch.float16, torch.ops.mkldnn._is_mkldnn_fp16_supported)) if supported()}
    if torch.backends.mkldnn.is_available() else set())


def _onednn_runs_lstm(input, packed, projected):
    """Whether torch.nn's LSTM runs this call on oneDNN (ATen's use_mkldnn): not packed, no projection,
    oneDNN enabled, and float32 input, or a half type oneDNN runs on this CPU (float16 only for
    inference: oneDNN has no float16 LSTM backward)."""
    return (not packed and not projected and input.dtype in _ONEDNN_LSTM_DTYPES and torch.backends.mkldnn.enabled
            and not (input.dtype == torch.float16 and torch.is_grad_enabled()))


def _cpu_autocasting(input):
    """Whether a CPU autocast region casts this input (not float64 or non-floating input)."""
    return (torch.is_autocast_enabled("cpu") and input.device.type == "cpu" and input.is_floating_point()
            and input.dtype != torch.float64)


def _cpu_autocast_dtypes(name, input, state_dtype, onednn=False, projected=False):
    """Inside a CPU autocast region, the dtype layer or cell `name` runs `input` in and the dtype its
    (cell) state comes out in, given the dtype of the state it starts from; (None, None) where no
    region casts the input. A projected LSTM (off oneDNN) projects h in the region's dtype but its
    cell state takes the promotion."""
    if not _cpu_autocasting(input):
        return None, None
    region = torch.get_autocast_dtype("cpu")
    if name in ("RNN", "RNNCell") or onednn:
        return region, region
    promoted = torch.promote_types(region, state_dtype)
    return (region if projected else promoted), promoted


def _cast(tensors, dtype):
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _check_hidden_dtype(hidden, dtype):
    for h in hidden:
        if h.dtype != dtype and not _autocasting():  # the ops' autocast casts every floating input
            raise RuntimeError(f"Expected hidden state of dtype {dtype} (the parameters' dtype), got {h.dtype}")


def _exporting_to_onnx():
    """Whether torch.onnx.export is capturing this call: its TorchScript-based exporter traces it with
    torch.jit, its dynamo=True one with non-strict torch.export (the cheap tests come first: eager calls
    pay only those)."""
    return (torch.jit.is_tracing() or torch.compiler.is_exporting()) and torch.onnx.is_in_onnx_export()


def _torch_nn_forward(module, *args):
    """`module`'s forward as torch.nn computes it, on `module`'s weights: under ONNX export the layers
    and cells run as their torch.nn twins, so that each exporter emits what it emits for torch.nn
    (ONNX's own LSTM, GRU and RNN ops where it has them) and fails where it fails for torch.nn."""
    from .convert import torch_twin_sharing_weights  # here: convert imports this module
    twin = torch_twin_sharing_weights(module)
    return type(twin).forward(twin, *args)  # in `module`'s call: its hooks and trace scope, none of the twin's


def _tensors(module, names):
    """The module's tensors `names` (None where one is None): from its parameters, where
    torch.func.functional_call also puts the tensors it swaps in, else as attributes (a
    parametrization's property). Cheaper than attribute lookups through nn.Module.__getattr__,
    which small calls feel."""
    found = module._parameters
    return [found[name] if name in found else getattr(module, name, None) for name in names]


class RNNBase(nn.Module):
    """Multi-layer, optionally bidirectional recurrent layer over fused kernels (see torch.nn.RNNBase)."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", stacklevel=2)
        for name, value in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if mode not in _GATES:
            raise ValueError("Unrecognized RNN mode: " + mode)
        if proj_size > 0 and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")

        factory = {"device": device, "dtype": dtype}
        gate_size = _GATES[mode] * hidden_size
        directions = 2 if bidirectional else 1
        out_size = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names = []
        self._all_weights = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else out_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (gate_size, layer_input)), ("weight_hh", (gate_size, out_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes.append(("weight_hr", (proj_size, hidden_size)))
                names = []
                for base, shape in shapes:
                    setattr(self, base + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(base + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self):
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    # Weights are looked up on every access, so .to(), functional_call and reassignment
    # never leave a stale copy behind.
    @property
    def _flat_weights(self):
        return _tensors(self, self._flat_weights_names)

    @property
    def all_weights(self):
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self):
        """Kept for torch.nn compatibility; the fused kernels need no flattened weight buffer."""

    def extra_repr(self):
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # ---- torch.nn-compatible validation ---------------------------------------------

    def check_input(self, input, batch_sizes):
        weight = _tensors(self, ("weight_ih_l0",))[0]
        if input.dtype != weight.dtype and not _autocasting() and not _cpu_autocasting(input):
            # Inside a CPU autocast region (float64 input) torch.nn fails later, in a GEMM.
            error = RuntimeError if torch.is_autocast_enabled(input.device.type) else ValueError
            raise error(f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                        f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.size(-1)}")

    def get_expected_hidden_size(self, input, batch_sizes):
        if batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        directions = 2 if self.bidirectional else 1
        size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (self.num_layers * directions, mini_batch, size)

    def check_hidden_size(self, hx, expected_hidden_size, msg="Expected hidden size {}, got {}"):
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input, hidden, batch_sizes):
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))

    def permute_hidden(self, hx, permutation):
        if permutation is None:
            return hx
        return hx.index_select(1, permutation)

    # ---- forward ------------------------------------------------------------------------

    def _zero_state(self, input, batch, size):
        directions = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * directions, batch, size, dtype=input.dtype, device=input.device)

    def _run(self, input, batch_sizes, h0, c0, dtype=None):
        """The stack: layers × directions, dropout between layers. `input` is time-major
        [T, B, I] or packed rows [N, I]; the weights are cast to `dtype` if given."""
        directions = 2 if self.bidirectional else 1
        weights = self._flat_weights
        per_direction = len(weights) // (self.num_layers * directions)
        h_n, c_n = [], []
        x = input
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                w = weights[k * per_direction:(k + 1) * per_direction]
                if dtype is not None:
                    w = _cast(w, dtype)
                w_ih, w_hh = w[0], w[1]
                b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                w_hr = w[-1] if self.proj_size > 0 else None
                out, h, c = run_layer(self.mode, x, batch_sizes, h0[k], None if c0 is None else c0[k],
                                      (w_ih, w_hh, b_ih, b_hh, w_hr), direction == 1)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        if len(h_n) == 1:  # one layer, one direction: a view, cheaper than a stack of one
            return x, h_n[0].unsqueeze(0), (c_n[0].unsqueeze(0) if c0 is not None else None)
        return x, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            if self.proj_size > 0 and not torch.jit.is_tracing():
                # ONNX's LSTM op has no projection. torch.nn's TorchScript-based export refuses it (so does the
                # twin's); its dynamo=True export ignores it, writing a model that onnxruntime refuses to run.
                raise torch.onnx.errors.OnnxExporterError(
                    "Unsupported: ONNX export of LSTM with proj_size > 0: ONNX's LSTM operator has no projection")
            return _torch_nn_forward(self, input, hx)
        lstm = self.mode == "LSTM"
        name = "LSTM" if lstm else ("GRU" if self.mode == "GRU" else "RNN")
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        orig_input = input
        is_batched = True
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = orig_input
            max_batch = int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                suffix = " tensor" if name == "RNN" else ""
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{suffix} instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                hidden = hx if lstm else (hx,)
                want = 3 if is_batched else 2
                if any(h.dim() != want for h in hidden):
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    if lstm:
                        raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                           f"({hidden[0].dim()}-D, {hidden[1].dim()}-D) tensors")
                    raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
                if not is_batched:
                    hx = tuple(h.unsqueeze(1) for h in hidden) if lstm else hx.unsqueeze(1)
            max_batch = input.size(0) if self.batch_first else input.size(1)
        state_dtype = input.dtype if hx is None else (hx[1] if lstm else hx).dtype
        run_dtype, cell_state_dtype = _cpu_autocast_dtypes(
            name, input, state_dtype, lstm and _onednn_runs_lstm(input, batch_sizes is not None, self.proj_size > 0),
            self.proj_size > 0)
        if run_dtype is not None:
            input = input.to(run_dtype)

        if hx is None:
            h0 = self._zero_state(input, max_batch, out_size)
            c0 = self._zero_state(input, max_batch, self.hidden_size) if lstm else None
        elif lstm:
            h0, c0 = self.permute_hidden(hx[0], sorted_indices), self.permute_hidden(hx[1], sorted_indices)
        else:
            h0, c0 = self.permute_hidden(hx, sorted_indices), None
        if run_dtype is not None:
            h0, c0 = _cast((h0, c0), run_dtype)

        self.check_input(input, batch_sizes)
        expected = self.get_expected_hidden_size(input, batch_sizes)
        if lstm:
            self.check_hidden_size(h0, expected, "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(c0, expected[:2] + (self.hidden_size,), "Expected hidden[1] size {}, got {}")
        else:
            self.check_hidden_size(h0, expected)
        states = (h0,) if c0 is None else (h0, c0)
        _check_devices(input, states, _tensors(self, ("weight_ih_l0",))[0])
        _check_hidden_dtype(states, input.dtype)

        if batch_sizes is None and self.batch_first:
            input = input.transpose(0, 1)
        output, h_n, c_n = self._run(input, batch_sizes, h0, c0, run_dtype)

        if batch_sizes is not None:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        else:
            if self.batch_first:
                output = output.transpose(0, 1)
            if not is_batched:
                output = output.squeeze(batch_dim)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if c_n is not None else None
        h_n = self.permute_hidden(h_n, unsorted_indices)
        if lstm:
            if cell_state_dtype is not None:
                c_n = c_n.to(cell_state_dtype)
            return output, (h_n, self.permute_hidden(c_n, unsorted_indices))
        return output, h_n


class RNN(RNNBase):
    """Drop-in for torch.nn.RNN (Elman RNN, tanh or relu)."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__("RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)


class LSTM(RNNBase):
    """Drop-in for torch.nn.LSTM, including proj_size."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)


class GRU(RNNBase):
    """Drop-in for torch.nn.GRU."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


# ---- cells ----------------------------------------------------------------------------------


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_CELL_NAMES = {"LSTM": "LSTMCell", "GRU": "GRUCell", "RNN_TANH": "RNNCell", "RNN_RELU": "RNNCell"}


class RNNCellBase(nn.Module):
    """Single-step cell over the fused kernels (see torch.nn.RNNCellBase)."""

    def __init__(self, input_size, hidden_size, bias, num_chunks, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def extra_repr(self):
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    def reset_parameters(self):
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def _step(self, mode, input, hidden):
        """Validates like ATen's cell ops and runs one fused step: (input [B, I], hidden states
        [B, H]) -> new states."""
        weights = (*_tensors(self, _CELL_WEIGHTS), None)
        run_dtype, _ = _cpu_autocast_dtypes(_CELL_NAMES[mode], input, hidden[-1].dtype)
        if run_dtype is not None:
            input, hidden, weights = input.to(run_dtype), _cast(hidden, run_dtype), _cast(weights, run_dtype)
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for k, h in enumerate(hidden):
            if input.size(0) != h.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{k} batch size {h.size(0)}")
            if h.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {h.size(1)}, "
                                   f"expected {self.hidden_size}")
        if input.dtype != weights[0].dtype and not _autocasting():
            raise RuntimeError(f"Expected input of dtype {self.weight_ih.dtype} (the parameters' dtype), "
                               f"got {input.dtype}")
        _check_hidden_dtype(hidden, input.dtype)
        _check_devices(input, hidden, weights[0])
        _, h, c = run_layer(mode, input.unsqueeze(0), None, hidden[0], hidden[1] if len(hidden) > 1 else None,
                            weights, False)
        return h, c

    def _prepare(self, name, input, hx, count):
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for k, h in enumerate(hx):
                if h.dim() not in (1, 2):
                    what = f"hx[{k}]" if count == 2 else "hidden"
                    raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {h.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros,) * count
        elif not is_batched:
            hx = tuple(h.unsqueeze(0) for h in hx)
        return input, hx, is_batched


class RNNCell(RNNCellBase):
    """Drop-in for torch.nn.RNNCell."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            return _torch_nn_forward(self, input, hx)
        input, (h0,), is_batched = self._prepare("RNNCell", input, None if hx is None else (hx,), 1)
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        h, _ = self._step("RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU", input, (h0,))
        return h if is_batched else h.squeeze(0)


class LSTMCell(RNNCellBase):
    """Drop-in for torch.nn.LSTMCell."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            return _torch_nn_forward(self, input, hx)
        input, hidden, is_batched = self._prepare("LSTMCell", input, hx, 2)
        h, c = self._step("LSTM", input, hidden)
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(RNNCellBase):
    """Drop-in for torch.nn.GRUCell."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            return _torch_nn_forward(self, input, hx)
        input, (h0,), is_batched = self._prepare("GRUCell", input, None if hx is None else (hx,), 1)
        h, _ = self._step("GRU", input, (h0,))
        return h if is_batched else h.squeeze(0)
