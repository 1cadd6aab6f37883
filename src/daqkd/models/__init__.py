"""Model registry and the normalizing wrapper."""

from .normalize import NAMED_NORMALIZATIONS, Normalization, NormalizedModel, parse_normalization
from .registry import create_model, is_cifar_model, list_models

__all__ = [
    "NAMED_NORMALIZATIONS",
    "Normalization",
    "NormalizedModel",
    "create_model",
    "is_cifar_model",
    "list_models",
    "parse_normalization",
]
