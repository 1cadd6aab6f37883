"""Models by name.

Our 32x32 models (``resnet20/32/44/56/110`` with option-A shortcuts, ``resnet20b/32b/44b/56b/110b``
with option-B shortcuts, ``vgg8/11/13``, ``mobilenetv2``) come first; any other
name is looked up among torchvision's classification models (``resnet18``, ``mobilenet_v3_small``,
...), built without pretrained weights for the data set's class count.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torchvision
from torch import nn

from ..errors import DaqkdError
from .mobilenet_cifar import cifar_mobilenet_v2
from .resnet_cifar import CifarResNet
from .vgg_cifar import CifarVGG

ModelFactory = Callable[[int], nn.Module]
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)

CIFAR_MODELS: dict[str, ModelFactory] = {
    **{f"resnet{d}": partial(CifarResNet, d) for d in CIFAR_RESNET_DEPTHS},
    **{f"resnet{d}b": partial(CifarResNet, d, shortcut="B") for d in CIFAR_RESNET_DEPTHS},
    **{f"vgg{d}": partial(CifarVGG, d) for d in (8, 11, 13)},
    "mobilenetv2": cifar_mobilenet_v2,
}


def torchvision_models() -> list[str]:
    """Names of torchvision's image classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Every name :func:`create_model` accepts."""
    return sorted(CIFAR_MODELS) + [n for n in torchvision_models() if n not in CIFAR_MODELS]


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs, randomly initialized.

    Raises DaqkdError naming the known models if ``name`` is unknown.
    """
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes)
    if name in torchvision_models():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise DaqkdError(
        f"unknown --arch {name!r}: use one of {', '.join(sorted(CIFAR_MODELS))} "
        "or a torchvision classification model (e.g. resnet18, mobilenet_v3_small)"
    )


def is_cifar_model(name: str) -> bool:
    """True for the models designed for 32x32 input."""
    return name in CIFAR_MODELS
