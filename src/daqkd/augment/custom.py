"""User DAs: any per-image callable (a torchvision v2 ``Compose``, a timm policy, a function) as a
ranking candidate beside the built-in batched ones.

The callable gets each cached image, a (3, H, W) uint8 CPU tensor, and returns a (3, S, S) uint8
tensor (the same S for every image); it owns the whole pipeline, crop and flip included, e.g.
``v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4)])``.
Images go through it one by one on the CPU, so this path is slower than the built-in batched DAs:
5-8x for torchvision's policies on 32x32 images on one CPU thread (benchmarks/custom_da.py,
benchmarks/RESULTS.md), and it cannot run on the GPU. torchvision's
transforms draw from torch's global random generator: each batch reseeds it (in a forked RNG
state) from the pass's generator, so a seed gives the same draws, and each image its own draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import DaqkdError
from .registry import Candidate, known_names


class PerImageDA:
    """A ranking candidate made of a per-image callable; the interface of :class:`Candidate`.

    name: how reports call it (must differ from the built-in names); transform: (3, H, W) uint8 ->
    (3, S, S) uint8. Labels pass through unchanged (no batch-level mixing).
    """

    mixes = False

    def __init__(self, name: str, transform: Callable[[torch.Tensor], torch.Tensor], crop_size: int = 224) -> None:
        if name in known_names():
            raise DaqkdError(f"a custom DA cannot be called {name!r}: that is a built-in candidate's name")
        self.name = name
        self.transform = transform
        self.crop_size = crop_size  # rank_candidates sets it to the ranking's --crop-size

    def base_view(self, images: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The built-in crop + flip view (the paired view of the variance baseline)."""
        return Candidate("none", 1, self.crop_size).base_view(images, generator)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor,
                 generator: torch.Generator, base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = images.device if isinstance(images, torch.Tensor) else images[0].device
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds CUDA too
            views = [self.transform(image.cpu()) for image in images]
        for view in views:
            if not isinstance(view, torch.Tensor) or view.dtype != torch.uint8 or view.shape != views[0].shape:
                got = f"{type(view).__name__} {getattr(view, 'dtype', '')} {tuple(getattr(view, 'shape', ()))}"
                raise DaqkdError(f"DA {self.name!r} returned {got}: a per-image DA must return uint8 (3, S, S) "
                                 "tensors of one size (end it with a crop or resize; v2.ToDtype(torch.uint8))")
        return torch.stack(views).to(device), labels
