"""Swapping torch.nn recurrent layers for their fused_rnn twins in an existing model, and back.

    model = fused_rnn.to_fused(model)   # every nn.LSTM/GRU/RNN/*Cell inside now runs fused
    model = fused_rnn.to_torch(model)   # and back to plain torch.nn

Each replaced module is rebuilt from its constructor configuration on the same device, with
the same dtype and training mode, and gets an exact copy of the original weights (state_dict)
and of each parameter's requires_grad flag. Only modules of exactly the listed classes are
converted: a user subclass may override forward, so it is left alone. Hooks registered on a
replaced module and attributes set on it after construction are not carried over. Converting
builds the new modules on the meta device first, so it draws nothing from the global RNG.
"""
import copy
import warnings

from torch import nn

from . import modules

_TORCH_TO_FUSED = {
    nn.LSTM: modules.LSTM,
    nn.GRU: modules.GRU,
    nn.RNN: modules.RNN,
    nn.LSTMCell: modules.LSTMCell,
    nn.GRUCell: modules.GRUCell,
    nn.RNNCell: modules.RNNCell,
}
_FUSED_TO_TORCH = {fused: torch_class for torch_class, fused in _TORCH_TO_FUSED.items()}

# The torch.nn class of each layer mode (by mode: a bare RNNBase has nothing else to tell it by).
_TORCH_LAYERS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}

_LAYER_OPTIONS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
_CELL_OPTIONS = ("input_size", "hidden_size", "bias")


def to_fused(module, inplace=False):
    """Returns `module` with every torch.nn RNN/LSTM/GRU/RNNCell/LSTMCell/GRUCell in it (the
    module itself included) replaced by the fused_rnn equivalent.

    With inplace=False (the default) `module` is left untouched and a converted deep copy is
    returned; with inplace=True its submodules are replaced where they are. Either way use
    the return value: a root module that is itself recurrent can only be replaced, not
    changed in place."""
    return _convert(module, _TORCH_TO_FUSED, inplace)


def to_torch(module, inplace=False):
    """The inverse of to_fused: every fused_rnn layer or cell in `module` (the module itself
    included) becomes the torch.nn class it replaces. Same `inplace` semantics as to_fused."""
    return _convert(module, _FUSED_TO_TORCH, inplace)


def _convert(module, class_map, inplace):
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if not inplace:
        module = copy.deepcopy(module)
    return _replace_tree(module, class_map, replaced={})


def _replace_tree(module, class_map, replaced):
    """Converts `module` and everything below it. `replaced` maps id(original) to its
    replacement, so a module shared between several parents stays shared."""
    if id(module) in replaced:
        return replaced[id(module)]
    target = class_map.get(type(module))
    if target is not None:
        replacement = _rebuild(module, target)
    else:
        replacement = module
        for name, child in list(module.named_children()):
            new_child = _replace_tree(child, class_map, replaced)
            if new_child is not child:
                setattr(module, name, new_child)
    replaced[id(module)] = replacement
    return replacement


def _constructor_options(module):
    """The keyword arguments that rebuild `module` (torch.nn or fused_rnn, same attributes)."""
    is_layer = hasattr(module, "num_layers")
    options = {name: getattr(module, name) for name in (_LAYER_OPTIONS if is_layer else _CELL_OPTIONS)}
    if is_layer and getattr(module, "proj_size", 0):
        options["proj_size"] = module.proj_size  # only LSTM can have one; GRU/RNN reject the argument
    if hasattr(module, "nonlinearity"):
        options["nonlinearity"] = module.nonlinearity
    return options


def _build_on_meta(module_class, options, **factory_kwargs):
    """module_class(**options) on the meta device, without repeating the construction-time warnings
    (dropout with one layer) the user has seen when building the module it stands for."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return module_class(**options, device="meta", **factory_kwargs)


def _rebuild(module, target_class):
    """A `target_class` twin of `module`: same configuration, device, dtype, training mode,
    weights (bitwise) and requires_grad flags."""
    reference = next(module.parameters())
    twin = _build_on_meta(target_class, _constructor_options(module), dtype=reference.dtype)
    twin.to_empty(device=reference.device)
    twin.load_state_dict(module.state_dict(), strict=True)
    for name, parameter in twin.named_parameters():
        parameter.requires_grad_(module.get_parameter(name).requires_grad)
    return twin.train(module.training)


def torch_twin_sharing_weights(module):
    """The torch.nn twin of fused_rnn layer or cell `module` (of a subclass too): built on the meta
    device, in `module`'s training mode, and holding `module`'s own weight tensors as they are set on
    it now (under torch.export, the tracer's stand-ins), not copies. Its forward computes what
    `module`'s does, in torch.nn's code."""
    if isinstance(module, modules.RNNBase):
        torch_class = _TORCH_LAYERS[module.mode]
        weight_names = module._flat_weights_names
    else:
        torch_class = next(twin for fused, twin in _FUSED_TO_TORCH.items() if isinstance(module, fused))
        weight_names = modules._CELL_WEIGHTS
    options = _constructor_options(module)
    if torch_class is nn.RNN:  # from the mode, which a bare RNNBase has without a nonlinearity attribute
        options["nonlinearity"] = "relu" if module.mode == "RNN_RELU" else "tanh"
    twin = _build_on_meta(torch_class, options)
    for name, weight in zip(weight_names, modules._tensors(module, weight_names)):
        if weight is not None:
            delattr(twin, name)  # the meta parameter; torch.nn's layers pick up the replacement on the next forward
            setattr(twin, name, weight)
    return twin.train(module.training)
