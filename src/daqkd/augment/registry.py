"""Candidate data augmentations by name.

A candidate is ``NAME`` or ``NAME+MIXER``:

- ``identity``: the clean images, no augmentation at all (for large images the evaluation
  resize + center crop);
- ``none``: the base augmentation only (random crop + flip, see :mod:`daqkd.augment.base`);
- a registered policy (:mod:`daqkd.augment.policies`: ``autoaugment-cifar10``,
  ``autoaugment-imagenet``, ``autoaugment-svhn``, ``randaugment``, ``trivialaugment``, ``augmix``,
  ``randomerasing``): the base augmentation, then that policy, per image;
- ``+cutmix`` or ``+mixup``: then a batch-level mixer from :data:`MIXERS` (CutMix, Yun et al., ICCV
  2019; MixUp, Zhang et al., ICLR 2018; alpha 1, as torchvision's ``v2.CutMix``/``v2.MixUp``), which
  mixes neighbouring images of the (shuffled) batch and makes soft labels.

``all`` stands for the paper's 16 candidates (:data:`PAPER_CANDIDATES`, a fixed list: registering a
DA does not change it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torchvision.transforms import v2

from ..errors import DaqkdError
from . import policies as _policies  # noqa: F401  (registers the built-in policies)
from .base import POLICIES, SMALL_IMAGE_MAX, Policy, center_view, random_crop_flip, random_resized_crop_flip

# The candidates of Kur & Zhao's experiments, in their order: 8 DAs, then the same with CutMix.
PAPER_CANDIDATES = [
    "none", "autoaugment-cifar10", "autoaugment-imagenet", "autoaugment-svhn", "randaugment",
    "trivialaugment", "augmix", "randomerasing",
    "none+cutmix", "autoaugment-cifar10+cutmix", "autoaugment-imagenet+cutmix", "autoaugment-svhn+cutmix",
    "randaugment+cutmix", "trivialaugment+cutmix", "augmix+cutmix", "randomerasing+cutmix",
]


def known_names() -> list[str]:
    """Every candidate name: ``identity`` first, then each registered policy alone and with each mixer."""
    names = ["identity", *POLICIES]
    return names + [f"{name}+{mixer}" for mixer in MIXERS for name in names]


def parse_candidates(text: str) -> list[str]:
    """Split a comma-separated list of names; ``all`` expands to the paper's 16 candidates.

    Raises DaqkdError naming the known names for an unknown one.
    """
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        expanded = PAPER_CANDIDATES if item == "all" else [item]
        for name in expanded:
            if name not in known_names():
                raise DaqkdError(
                    f"unknown augmentation {name!r}: use 'all' or any of {', '.join(known_names())}"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise DaqkdError("no augmentation given: pass --augs NAME[,NAME...] or --augs all")
    return names


def check_candidate(name: str, option: str = "--aug") -> str:
    """``name`` if it is exactly one known candidate (not a list, not ``all``); DaqkdError naming
    ``option`` otherwise. A list or ``all`` where one DA is trained would otherwise pass
    :func:`parse_candidates` and train with no policy at all."""
    if name in known_names():
        return name
    if "," in name or name.strip() == "all":
        raise DaqkdError(f"{option} takes one augmentation, got {name!r}: pass one name (e.g. none+cutmix); "
                         "lists and 'all' go to --augs")
    raise DaqkdError(f"unknown augmentation {name!r}: use any of {', '.join(known_names())}")


@dataclass
class Candidate:
    """One candidate DA. ``__call__`` turns a batch of cached images into what the model sees.

    images: (N, 3, H, W) uint8 tensor (uniform small images) or a list of (3, H_i, W_i) uint8
    tensors; labels (N,) int64. Returns images (N, 3, S, S) uint8 and targets: (N,) int64, or
    (N, num_classes) float soft labels under CutMix.
    """

    name: str
    num_classes: int
    crop_size: int = 224
    mix_group: int = 0  # mixers: one draw per this many images (0: per batch, as in training)

    def __post_init__(self) -> None:
        check_candidate(self.name)
        self.policy_name, _, self.mixer = self.name.partition("+")
        factory = POLICIES.get(self.policy_name)
        self.policy: Policy | None = factory() if factory is not None else None

    def base_view(self, images: torch.Tensor | Sequence[torch.Tensor],
                  generator: torch.Generator) -> torch.Tensor:
        """The base augmentation (crop + flip) of every image; the clean view for ``identity``."""
        small = isinstance(images, torch.Tensor) and max(images.shape[-2:]) <= SMALL_IMAGE_MAX
        if self.policy_name == "identity":
            return images if small else center_view(images, self.crop_size)
        if small:
            return random_crop_flip(images, generator)
        return random_resized_crop_flip(images, self.crop_size, generator)

    def __call__(
        self, images: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor,
        generator: torch.Generator, base: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch; pass ``base`` to reuse an already drawn base view."""
        out = self.base_view(images, generator) if base is None else base
        if self.policy is not None:
            out = self.policy(out, generator)
        if self.mixer:
            return MIXERS[self.mixer](out, labels, self.num_classes, generator, self.mix_group)
        return out, labels

    @property
    def mixes(self) -> bool:
        """Whether a batch-level mixer makes soft labels."""
        return bool(self.mixer)


def batch_mix(transform: type[v2.CutMix | v2.MixUp], images: torch.Tensor, labels: torch.Tensor,
              num_classes: int, generator: torch.Generator, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``transform(alpha=1)`` (v2.CutMix or v2.MixUp) on the batch, seeded from ``generator``.

    Returns mixed uint8 images and (N, num_classes) float32 soft labels. One draw (box, lambda) per
    batch, by design of these mixers; the images are paired with their neighbours in the batch.
    ``group`` > 0 applies it to consecutive chunks of ``group`` images instead, each with its own
    draw: every image is still mixed with a neighbour under a lambda ~ Beta(1, 1), so each mixed
    sample has the same distribution, but a ranking pass over few images then averages over many
    draws instead of resting on one (a batch of 256 gets 32 draws at group 8). Mixing in groups of g
    is the same as mixing batches of g; a remainder of one image joins the group before it. MixUp
    blends in float32 and rounds back to uint8 (at most half a level from the exact blend).
    """
    labels = labels.to(images.device)
    if 0 < group < images.shape[0]:
        starts = list(range(0, images.shape[0], group))
        if images.shape[0] - starts[-1] == 1:
            starts.pop()  # a last image alone would be paired with itself, unmixed: the group before takes it
        ends = [*starts[1:], images.shape[0]]
        parts = [batch_mix(transform, images[a:b], labels[a:b], num_classes, generator) for a, b in zip(starts, ends)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    seed = int(torch.randint(2**62, (1,), generator=generator))
    blend = transform is v2.MixUp
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds CUDA too
        mixed, soft = transform(alpha=1.0, num_classes=num_classes)(images.float() if blend else images, labels)
    if blend:
        mixed = mixed.round_().clamp_(0, 255).to(torch.uint8)
    return mixed, soft.float()


cutmix = partial(batch_mix, v2.CutMix)
mixup = partial(batch_mix, v2.MixUp)

# Batch-level mixers by suffix: (images, labels, num_classes, generator, group) -> (images, soft labels).
MIXERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"cutmix": cutmix, "mixup": mixup}
