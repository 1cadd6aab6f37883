"""Quantization-aware training: fake-quantized layers for any model.

Methods (registry ``QUANTIZERS``): ``ewgs``, ``lsq``, ``pact``, ``dorefa``, ``ste``; each module's
docstring names its paper and gives its formulas.
"""

from . import dorefa, ewgs, lsq, pact  # noqa: F401  (register the methods)
from .base import FP_BITS, QUANTIZERS, QuantConfig, QuantConv2d, Quantizer, QuantLinear, check_bits
from .ewgs import update_ewgs_delta
from .model import ParamGroups, quantize_model, quantized_layers, split_parameters

__all__ = [
    "FP_BITS", "QUANTIZERS", "ParamGroups", "QuantConfig", "QuantConv2d", "QuantLinear", "Quantizer",
    "check_bits", "quantize_model", "quantized_layers", "split_parameters", "update_ewgs_delta",
]
