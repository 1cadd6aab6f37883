"""The base augmentation every candidate starts from, and the clean (eval) view.

32x32-style data (uniform size up to 64 px): random crop to the image size from a zero-padded
image (padding 4) and a horizontal flip with probability 1/2, per image, batched. Larger or mixed
sizes: torchvision's RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3) to ``crop_size`` + flip, and
Resize(crop_size * 8/7) + CenterCrop for the clean view, image by image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torchvision.transforms.v2 import functional as TF

SMALL_IMAGE_MAX = 64

# A policy: (N, C, H, W) uint8 images and a CPU generator -> augmented uint8 images, per image.
Policy = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
# Name -> a factory of the policy; "none" is the base augmentation alone.
POLICIES: dict[str, Callable[[], Policy] | None] = {"none": None}


def register_policy(name: str) -> Callable[[Callable[[], Policy]], Callable[[], Policy]]:
    """Class or function decorator: make the policy ``name`` a candidate DA (``NAME`` and
    ``NAME+<mixer>``). It does not join ``all``, the paper's fixed list."""

    def register(factory: Callable[[], Policy]) -> Callable[[], Policy]:
        if name in POLICIES:
            raise ValueError(f"a DA called {name!r} is already registered")
        POLICIES[name] = factory
        return factory

    return register


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per-image RandomCrop(size, padding) + RandomHorizontalFlip on a batch.

    images (N, C, H, W) uint8 -> same shape; offsets and flips drawn from ``generator`` (CPU).
    One gather over the flattened zero-padded images (4x faster than 4-D advanced indexing).
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    padded_width = w + 2 * padding
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(0), cols) + left[:, None]  # (N, W)
    rows = torch.arange(h)[None, :] + top[:, None]  # (N, H)
    index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(n, 1, h * w).to(images.device)
    return padded.view(n, c, -1).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)


def random_resized_crop_box(
    height: int, width: int, generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, h, w), drawn from ``generator``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=generator)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(
    images: Sequence[torch.Tensor], crop_size: int, generator: torch.Generator
) -> torch.Tensor:
    """RandomResizedCrop(crop_size) + flip for images of any size: list of (C, H, W) uint8 ->
    (N, C, crop_size, crop_size) uint8."""
    out = []
    for image in images:
        top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], generator)
        crop = TF.resized_crop(image, top, left, h, w, [crop_size, crop_size], antialias=True)
        if bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


def center_view(images: Sequence[torch.Tensor], crop_size: int) -> torch.Tensor:
    """The standard evaluation view: Resize(crop_size * 8/7) + CenterCrop(crop_size)."""
    resize = round(crop_size * 8 / 7)
    return torch.stack(
        [TF.center_crop(TF.resize(im, [resize], antialias=True), [crop_size, crop_size]) for im in images]
    )
