"""Input normalization, which belongs to the model.

The data pipeline hands models uint8 images (B, 3, H, W) in [0, 255]; :class:`NormalizedModel`
scales them to [0, 1] and standardizes them with the statistics the weights were trained with, on
the model's device, in one batched op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DaqkdError


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of images scaled to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def spec(self) -> str:
        """The ``m1,m2,m3:s1,s2,s3`` form that :func:`parse_normalization` reads back."""
        return ",".join(map(repr, self.mean)) + ":" + ",".join(map(repr, self.std))


# Published weights only work with the statistics they were trained with, which differ in the third
# or fourth decimal between code bases; each set is named after whose it is.
NAMED_NORMALIZATIONS: dict[str, Normalization] = {
    # The train splits' own statistics (CIFAR-100 measured on ../shared/data/cifar100/cifar100.npz).
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # torchvision's ImageNet statistics; the akamaster CIFAR-10 ResNets (../shared/weights/cifar10) use them.
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # chenyaofo/pytorch-cifar-models, whose CIFAR-100 ResNet-56 is ../shared/weights/cifar100.
    "cifar100-chenyaofo": Normalization((0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)),
    # The CIFAR-100 loader of RepDistiller (Tian et al., CRD, ICLR 2020), which the DAQKD authors'
    # training code builds on.
    "cifar100-authors": Normalization((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


def parse_normalization(spec: str) -> Normalization:
    """Read a name in NAMED_NORMALIZATIONS or ``m1,m2,m3:s1,s2,s3``."""
    if spec in NAMED_NORMALIZATIONS:
        return NAMED_NORMALIZATIONS[spec]
    try:
        mean_text, std_text = spec.split(":")
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        mean, std = (), ()
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise DaqkdError(
            f"bad --normalize {spec!r}: use {', '.join(NAMED_NORMALIZATIONS)} or "
            "m1,m2,m3:s1,s2,s3 with three finite means and three positive finite stds of [0, 1] images"
        )
    return Normalization(mean, std)  # type: ignore[arg-type]


class NormalizedModel(nn.Module):
    """Wraps ``model`` so that it takes uint8 (or [0, 255] float) images.

    forward: (B, 3, H, W) uint8 -> (B, num_classes) logits. The statistics are buffers that are
    not saved in the state dict, so checkpoints hold the bare model's keys.
    """

    def __init__(self, model: nn.Module, normalization: Normalization) -> None:
        super().__init__()
        self.model = model
        self.normalization = normalization
        mean = torch.tensor(normalization.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(normalization.std).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        return self.model(x)
