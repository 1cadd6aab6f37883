"""Turning any model into a quantized one, and the parameter groups QAT optimizers need."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import DaqkdError
from .base import FP_BITS, QUANTIZERS, QuantConfig, QuantConv2d, Quantizer, QuantLinear, make_quantizer


def _quantized(module: nn.Conv2d | nn.Linear, config: QuantConfig, w_bits: int, a_bits: int) -> nn.Module:
    """A QuantConv2d/QuantLinear with ``module``'s hyper-parameters and its parameter objects."""
    opts = {"bias": module.bias is not None, "device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Conv2d):
        new: nn.Module = QuantConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, padding_mode=module.padding_mode, **opts)
    else:
        new = QuantLinear(module.in_features, module.out_features, **opts)
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    new.weight_quantizer = make_quantizer(config, w_bits, True, module.weight.shape[0]).to(module.weight.device)
    new.act_quantizer = make_quantizer(config, a_bits, False, None).to(module.weight.device)
    return new


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace every Conv2d and Linear of ``model`` in place by its quantized form; returns ``model``.

    The first conv/linear and the last one (in module order: the stem and the classifier) follow
    ``config.first_last``. Weights are kept (quantizers initialize from them and from the first
    batch); layers without parameters (pooling, option-A shortcuts) are left alone. With
    ``config.residual_bits`` below 32 the model's ``quantize_residuals(make_quantizer)`` places
    LSQ quantizers at that width on its residual stream (``make_quantizer()`` returns a new one).
    """
    config.validate()
    if config.residual_bits != FP_BITS:
        if not hasattr(model, "quantize_residuals"):
            raise DaqkdError(f"--residual-bits is implemented for the CIFAR ResNets, not {type(model).__name__}: "
                             "drop --residual-bits")
        bits = config.residual_bits
        model.quantize_residuals(lambda: QUANTIZERS["lsq"](bits, False, None, config))
    layers = [(name, m) for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if not layers:
        return model
    edge_names = {layers[0][0], layers[-1][0]}
    for name, module in layers:
        w_bits, a_bits = config.w_bits, config.a_bits
        if name in edge_names and config.first_last != "same":
            if config.first_last == "fp":
                continue
            w_bits = a_bits = int(config.first_last)
        if w_bits == FP_BITS and a_bits == FP_BITS:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(module, config, w_bits, a_bits))
    return model


@dataclass
class ParamGroups:
    """Model weights; quantizer parameters (own LR, no weight decay); quantizer parameters that
    want L2 regularization (PACT's alpha)."""

    model: list[nn.Parameter]
    quantizer: list[nn.Parameter]
    quantizer_decay: list[nn.Parameter]


def split_parameters(model: nn.Module) -> ParamGroups:
    """Split ``model``'s parameters for separate optimizers or learning rates (EWGS, LSQ, PACT)."""
    quantizer, decay = [], []
    for module in model.modules():
        if isinstance(module, Quantizer):
            wants_l2 = set(module.l2_parameters)
            for name, p in module.named_parameters(recurse=False):
                (decay if name in wants_l2 else quantizer).append(p)
    seen = {id(p) for p in quantizer + decay}
    return ParamGroups([p for p in model.parameters() if id(p) not in seen], quantizer, decay)


def quantized_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """Name -> quantized layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
