"""Per-image random augmentation policies on batches.

Each policy samples, for every image of a batch independently, what torchvision's transform of the
same name samples for one image, from an explicit ``torch.Generator``, then applies the batched
kernels of :mod:`daqkd.augment.ops`. The operation spaces and the AutoAugment sub-policies are
read from torchvision itself, so the distributions are torchvision's:

- AutoAugment: Cubuk et al., "AutoAugment: Learning Augmentation Strategies from Data", CVPR 2019
  (CIFAR-10, ImageNet and SVHN policies);
- RandAugment: Cubuk et al., CVPR-W 2020 (N = 2 ops, magnitude 9 of 31 bins);
- TrivialAugmentWide: Müller & Hutter, ICCV 2021 (one op, uniform magnitude of 31 bins);
- AugMix: Hendrycks et al., ICLR 2020 (3 chains of depth 1-3, severity 3, Dirichlet(1) weights);
- RandomErasing: Zhong et al., AAAI 2020 (p 0.5, area 2-33 %, aspect 0.3-3.3, zero fill).

Input and output: uint8 images (N, C, H, W) on any device; random draws happen on the CPU
generator, so a seed gives the same augmentation on CPU and CUDA. Each policy registers itself by
name (:func:`daqkd.augment.base.register_policy`): adding a DA is a class in this file (or any
module the registry imports) with that decorator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torchvision.transforms import v2

from .base import register_policy
from .ops import AFFINE_MATRICES, BATCH_OPS, rotate_exactly, warp_affine

# name -> (magnitude bins for (num_bins, height, width), whether the sign is random)
OpSpace = dict[str, tuple[Callable[[int, int, int], torch.Tensor | None], bool]]


def apply_ops(
    images: torch.Tensor,
    op_index: torch.Tensor,
    magnitude: torch.Tensor,
    op_names: list[str],
    interpolation: str,
) -> torch.Tensor:
    """Apply to image i the op ``op_names[op_index[i]]`` with ``magnitude[i]``; -1 skips the image.

    images (N, C, H, W) uint8; op_index (N,) int64; magnitude (N,) float64. The images under any
    geometric op share one warp (an inverse affine matrix each): each op alone would cost ~80
    operator calls, most of them in the warp.
    """
    out = images.clone()
    affine = [k for k, name in enumerate(op_names) if name in AFFINE_MATRICES]
    warped_rows = torch.isin(op_index, torch.tensor(affine, dtype=op_index.dtype)).nonzero().squeeze(1)
    if warped_rows.numel():
        h, w = images.shape[-2:]
        ops = op_index[warped_rows]
        matrices = torch.empty(len(warped_rows), 2, 3, dtype=torch.float64)
        for k in affine:
            rows = (ops == k).nonzero().squeeze(1)
            if rows.numel():
                matrices[rows] = AFFINE_MATRICES[op_names[k]](magnitude[warped_rows[rows]], h, w)
        on_device = warped_rows.to(images.device)
        sources = out[on_device]
        warped = warp_affine(sources, matrices, interpolation)
        if "Rotate" in op_names:
            rows = (ops == op_names.index("Rotate")).nonzero().squeeze(1)
            if rows.numel():
                rows_on_device = rows.to(images.device)
                warped[rows_on_device] = rotate_exactly(sources[rows_on_device], warped[rows_on_device],
                                                        magnitude[warped_rows[rows]])
        out[on_device] = warped
    for k, name in enumerate(op_names):
        if name == "Identity" or name in AFFINE_MATRICES:
            continue
        chosen = (op_index == k).nonzero().squeeze(1)
        if chosen.numel() == 0:
            continue
        on_device = chosen.to(images.device)
        out[on_device] = BATCH_OPS[name](out[on_device], magnitude[chosen], interpolation)
    return out


def magnitude_table(space: OpSpace, num_bins: int, height: int, width: int) -> torch.Tensor:
    """(num_ops, num_bins) float64 table of magnitudes; ops without magnitude get zeros."""
    rows = []
    for fn, _ in space.values():
        bins = fn(num_bins, height, width)
        rows.append(torch.zeros(num_bins) if bins is None else bins.double())
    return torch.stack([r.double() for r in rows])


def random_signs(signed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """-1 with probability 1/2 where ``signed`` (N,) bool is true, else +1; float64."""
    flip = signed & (torch.rand(signed.shape, generator=generator) <= 0.5)
    return 1.0 - 2.0 * flip.double()


class OpSpacePolicy:
    """Base of the policies that draw ops from one of torchvision's op spaces (AutoAugment,
    RandAugment, TrivialAugmentWide, AugMix): the space, its op names and signs, signed magnitudes,
    and the batched application. Subclasses implement ``__call__(images, generator)``."""

    def __init__(self, space: OpSpace, interpolation: str) -> None:
        self.space = space
        self.op_names = list(space)
        self.interpolation = interpolation
        self.signed = torch.tensor([sig for _, sig in space.values()])

    def magnitudes(self, table: torch.Tensor, op: torch.Tensor, column: torch.Tensor | int,
                   generator: torch.Generator) -> torch.Tensor:
        """(N,) magnitudes ``table[op, column]``, negated with probability 1/2 for signed ops."""
        return table[op, column] * random_signs(self.signed[op], generator)

    def apply(self, images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """Op ``op[i]`` (-1: none) at ``magnitude[i]`` on image i."""
        return apply_ops(images, op, magnitude, self.op_names, self.interpolation)


class AutoAugmentPolicy(OpSpacePolicy):
    """AutoAugment: one of 25 learned sub-policies per image, each two ops with probabilities."""

    def __init__(self, policy: v2.AutoAugmentPolicy, interpolation: str = "nearest") -> None:
        super().__init__(v2.AutoAugment._AUGMENTATION_SPACE, interpolation)
        sub_policies = v2.AutoAugment(policy)._policies
        self.op_id = torch.tensor([[self.op_names.index(op) for op, _, _ in p] for p in sub_policies])
        self.prob = torch.tensor([[prob for _, prob, _ in p] for p in sub_policies])
        self.bin = torch.tensor([[b if b is not None else 0 for _, _, b in p] for p in sub_policies])

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        table = magnitude_table(self.space, 10, h, w)
        chosen = torch.randint(len(self.op_id), (n,), generator=generator)
        for slot in range(2):
            op = self.op_id[chosen, slot]
            applied = torch.rand(n, generator=generator) <= self.prob[chosen, slot]
            magnitude = self.magnitudes(table, op, self.bin[chosen, slot], generator)
            images = self.apply(images, torch.where(applied, op, -1), magnitude)
        return images


for _policy in (v2.AutoAugmentPolicy.CIFAR10, v2.AutoAugmentPolicy.IMAGENET, v2.AutoAugmentPolicy.SVHN):
    register_policy(f"autoaugment-{_policy.value}")(partial(AutoAugmentPolicy, _policy))


@register_policy("randaugment")
class RandAugmentPolicy(OpSpacePolicy):
    """RandAugment: ``num_ops`` uniformly chosen ops per image at a fixed magnitude bin."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31,
                 interpolation: str = "nearest") -> None:
        super().__init__(v2.RandAugment._AUGMENTATION_SPACE, interpolation)
        self.num_ops, self.magnitude_bin, self.num_bins = num_ops, magnitude, num_bins

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        table = magnitude_table(self.space, self.num_bins, h, w)
        for _ in range(self.num_ops):
            op = torch.randint(len(self.op_names), (n,), generator=generator)
            images = self.apply(images, op, self.magnitudes(table, op, self.magnitude_bin, generator))
        return images


@register_policy("trivialaugment")
class TrivialAugmentWidePolicy(OpSpacePolicy):
    """TrivialAugment (wide space): one uniformly chosen op per image, uniform magnitude bin."""

    def __init__(self, num_bins: int = 31, interpolation: str = "nearest") -> None:
        super().__init__(v2.TrivialAugmentWide._AUGMENTATION_SPACE, interpolation)
        self.num_bins = num_bins

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        table = magnitude_table(self.space, self.num_bins, h, w)
        op = torch.randint(len(self.op_names), (n,), generator=generator)
        level = torch.randint(self.num_bins, (n,), generator=generator)
        return self.apply(images, op, self.magnitudes(table, op, level, generator))


@register_policy("augmix")
class AugMixPolicy(OpSpacePolicy):
    """AugMix: a convex mix of the image and ``width`` chains of 1-3 random ops, per image.

    m ~ Dirichlet(alpha, alpha); chain weights ~ Dirichlet(alpha * ones(width)) * m[1];
    output = trunc(m[0] * x + sum_i w_i * chain_i(x)) as uint8, as torchvision's tensor kernel.

    Every draw is made first, chain by chain in torchvision's order; then step k of all ``width``
    chains runs as one batch of width x N images, a third of the operator calls of chain after
    chain (ops act on each image alone, so the pixels are the same).
    """

    def __init__(self, severity: int = 3, width: int = 3, depth: int = -1, alpha: float = 1.0,
                 interpolation: str = "bilinear") -> None:
        super().__init__(v2.AugMix._AUGMENTATION_SPACE, interpolation)
        self.severity, self.width, self.depth, self.alpha = severity, width, depth, alpha

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        table = magnitude_table(self.space, 10, h, w)
        m = torch._sample_dirichlet(torch.full((n, 2), self.alpha, dtype=torch.float64),
                                    generator=generator)
        weights = torch._sample_dirichlet(
            torch.full((n, self.width), self.alpha, dtype=torch.float64), generator=generator
        ) * m[:, 1:]
        steps: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per chain: (op or -1, magnitude) per step
        for _ in range(self.width):
            if self.depth > 0:
                depth = torch.full((n,), self.depth)
            else:
                depth = torch.randint(1, 4, (n,), generator=generator)
            chain_steps = []
            for step in range(int(depth.max())):
                op = torch.randint(len(self.op_names), (n,), generator=generator)
                level = torch.randint(self.severity, (n,), generator=generator)
                magnitude = self.magnitudes(table, op, level, generator)
                chain_steps.append((torch.where(depth > step, op, -1), magnitude))
            steps.append(chain_steps)
        skip = (torch.full((n,), -1), torch.zeros(n, dtype=torch.float64))
        chains = images.repeat(self.width, 1, 1, 1)  # chain i is rows i*N .. (i+1)*N-1
        for step in range(max(len(chain_steps) for chain_steps in steps)):
            drawn = [chain_steps[step] if step < len(chain_steps) else skip for chain_steps in steps]
            chains = self.apply(chains, torch.cat([op for op, _ in drawn]), torch.cat([mag for _, mag in drawn]))
        to_device = {"device": images.device, "dtype": torch.float32}
        mix = images * m[:, 0].to(**to_device).view(-1, 1, 1, 1)
        for i, chain in enumerate(chains.split(n)):
            mix += chain * weights[:, i].to(**to_device).view(-1, 1, 1, 1)
        return mix.to(torch.uint8)


@register_policy("randomerasing")
class RandomErasingPolicy:
    """Random erasing: with probability p, zero a random rectangle of each image.

    Area fraction ~ U(scale), log aspect ~ U(log ratio); up to 10 tries for a rectangle that fits,
    else the image is left as it is (torchvision's sampling, vectorized over images and tries).
    """

    def __init__(self, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3), tries: int = 10) -> None:
        self.p, self.scale, self.ratio, self.tries = p, scale, ratio, tries

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        erased = torch.rand(n, generator=generator) < self.p
        area = h * w * (torch.rand(n, self.tries, generator=generator, dtype=torch.float64)
                        * (self.scale[1] - self.scale[0]) + self.scale[0])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(torch.rand(n, self.tries, generator=generator, dtype=torch.float64)
                           * (log_hi - log_lo) + log_lo)
        eh = torch.sqrt(area * aspect).round().long()
        ew = torch.sqrt(area / aspect).round().long()
        fits = (eh < h) & (ew < w)
        first = fits.long().argmax(dim=1)
        erased &= fits.any(dim=1)
        eh = eh.gather(1, first[:, None]).squeeze(1)
        ew = ew.gather(1, first[:, None]).squeeze(1)
        top = (torch.rand(n, generator=generator, dtype=torch.float64) * (h - eh + 1)).long()
        left = (torch.rand(n, generator=generator, dtype=torch.float64) * (w - ew + 1)).long()
        rows = torch.arange(h)
        cols = torch.arange(w)
        in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
        mask = (in_rows[:, :, None] & in_cols[:, None, :]) & erased[:, None, None]
        return images.masked_fill(mask[:, None].to(images.device), 0)
