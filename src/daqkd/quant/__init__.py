"""Quantization-aware training: fake-quantized layers for any model.

Methods (registry ``QUANTIZERS``): ``ewgs``, ``lsq``, ``pact``, ``dorefa``, ``ste``; each module's
docstring names its paper and gives its formulas. A new method is one module in this package with a
``@register_quantizer`` factory (the package imports every module in it).
"""

import importlib
import pkgutil

from .base import FP_BITS, QUANTIZERS, QuantConfig, QuantConv2d, Quantizer, QuantLinear, check_bits
from .ewgs import update_ewgs_delta
from .model import ParamGroups, quantize_model, quantized_layers, split_parameters

__all__ = [
    "FP_BITS", "QUANTIZERS", "ParamGroups", "QuantConfig", "QuantConv2d", "QuantLinear", "Quantizer",
    "check_bits", "quantize_model", "quantized_layers", "split_parameters", "update_ewgs_delta",
]

for _module in pkgutil.iter_modules(__path__):  # each method's module registers itself
    importlib.import_module(f"{__name__}.{_module.name}")
