"""Batched per-image augmentation: equal to torchvision image by image, random per image, seeded."""

from __future__ import annotations

import re

import pytest
import torch
from torchvision.transforms import v2

from daqkd.augment import PAPER_CANDIDATES, Candidate, cutmix, known_names, parse_candidates
from daqkd.augment.base import random_crop_flip
from daqkd.augment.ops import BATCH_OPS
from daqkd.augment.policies import AugMixPolicy, RandomErasingPolicy, apply_ops, magnitude_table
from daqkd.errors import DaqkdError

# magnitude ranges covering every op's use in torchvision's policies
RANGES = {
    "ShearX": (-0.99, 0.99), "ShearY": (-0.99, 0.99), "TranslateX": (-32, 32), "TranslateY": (-32, 32),
    "Rotate": (-135, 135), "Brightness": (-0.99, 0.99), "Color": (-0.99, 0.99),
    "Contrast": (-0.99, 0.99), "Sharpness": (-0.99, 0.99), "Posterize": (1, 8), "Solarize": (0, 1),
}


def images(n: int = 48, seed: int = 0, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=g)
    batch[: n // 2] = (batch[: n // 2] * 0.3 + 60).to(torch.uint8)  # low contrast: autocontrast acts
    return batch


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("op", sorted(BATCH_OPS))
def test_batched_op_equals_torchvision_per_image(op: str, interpolation: str) -> None:
    batch = images()
    low, high = RANGES.get(op, (0.0, 0.0))
    magnitude = torch.rand(len(batch), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    magnitude = magnitude * (high - low) + low
    if op == "Posterize":
        magnitude = magnitude.round()
    if op == "Rotate":
        magnitude[:4] = torch.tensor([90.0, -90.0, 180.0, 0.0])
    ours = BATCH_OPS[op](batch, magnitude, interpolation)
    reference = v2.TrivialAugmentWide()  # torchvision's single-image kernel dispatcher
    for i in range(len(batch)):
        value = int(magnitude[i]) if op == "Posterize" else float(magnitude[i])
        expected = reference._apply_image_or_video_transform(batch[i], op, value, interpolation, reference._fill)
        assert torch.equal(ours[i], expected), f"{op} differs from torchvision on image {i}"


@pytest.mark.parametrize("size", [(24, 40), (40, 24)])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("op", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_geometric_op_equals_torchvision_on_non_square_images(op: str, interpolation: str,
                                                              size: tuple[int, int]) -> None:
    """The warps normalize x by the width and y by the height: a swap would pass on 32x32 images only."""
    batch = images(n=24, size=size)
    low, high = RANGES[op]
    magnitude = torch.rand(len(batch), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    magnitude = magnitude * (high - low) + low
    if op == "Rotate":
        magnitude[:4] = torch.tensor([90.0, -90.0, 180.0, 270.0])  # rot90's fast path is square-only
    ours = BATCH_OPS[op](batch, magnitude, interpolation)
    reference = v2.TrivialAugmentWide()
    for i in range(len(batch)):
        expected = reference._apply_image_or_video_transform(batch[i], op, float(magnitude[i]), interpolation,
                                                             reference._fill)
        assert torch.equal(ours[i], expected), f"{op} differs from torchvision on {size} image {i}"


@pytest.mark.parametrize("policy", ["autoaugment-cifar10", "trivialaugment", "augmix"])
def test_every_magnitude_bin_of_a_policy_equals_torchvision(policy: str) -> None:
    """The policies' real magnitudes (every bin, both signs), not random ones, for the ops that
    threshold or round pixel values (the warps' magnitudes are covered above): torchvision compares
    Solarize's threshold in float32 (bin 8 of 31 is 187.000004 in float64) and fuses Sharpness's
    multiply-add; either difference showed only at some bins."""
    candidate = Candidate(policy, 10)
    space, bins = candidate.policy.space, 31 if policy == "trivialaugment" else 10
    table = magnitude_table(space, bins, 32, 32)
    batch = images(8 * bins)  # each magnitude on 4 images, low-contrast and full-range ones
    reference = v2.TrivialAugmentWide()
    pixel_ops = {"Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize"}
    for op_index, (op, (_, signed)) in enumerate(space.items()):
        if op not in pixel_ops:
            continue
        magnitude = torch.cat([table[op_index], -table[op_index] if signed else table[op_index]]).repeat(4)
        ours = BATCH_OPS[op](batch, magnitude, "nearest")
        for i in range(len(batch)):
            value = int(magnitude[i]) if op == "Posterize" else float(magnitude[i])
            expected = reference._apply_image_or_video_transform(batch[i], op, value, "nearest", reference._fill)
            assert torch.equal(ours[i], expected), f"{policy} {op}: magnitude {value} differs"


@pytest.mark.parametrize("name", [n for n in known_names() if n.partition("+")[0] != "identity"])
def test_augmentation_is_random_per_image(name: str) -> None:
    same = images(1).expand(64, -1, -1, -1).contiguous()
    out, _ = Candidate(name, 10)(same, torch.zeros(64, dtype=torch.int64), torch.Generator().manual_seed(0))
    distinct = len({tuple(o.flatten().tolist()) for o in out})
    assert distinct > 16, f"{name}: only {distinct} distinct outputs for 64 copies of one image"


@pytest.mark.parametrize("name", ["autoaugment-svhn", "augmix+cutmix", "randomerasing"])
def test_same_seed_same_augmentation(name: str) -> None:
    batch, labels = images(), torch.arange(48) % 10
    a = Candidate(name, 10)(batch, labels, torch.Generator().manual_seed(7))
    b = Candidate(name, 10)(batch, labels, torch.Generator().manual_seed(7))
    c = Candidate(name, 10)(batch, labels, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_identity_leaves_small_images_alone() -> None:
    batch = images()
    out, labels = Candidate("identity", 10)(batch, torch.arange(48), torch.Generator().manual_seed(0))
    assert torch.equal(out, batch) and torch.equal(labels, torch.arange(48))


def test_random_crop_flip_is_a_padded_crop() -> None:
    ramp = (torch.arange(3 * 32 * 32) % 251 + 1).to(torch.uint8).view(1, 3, 32, 32)  # no zeros inside
    batch = ramp.expand(200, -1, -1, -1)
    out = random_crop_flip(batch, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(ramp[0], (4, 4, 4, 4))
    seen = set()
    for o in out:
        matches = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                   if torch.equal(o, padded[:, t:t + 32, l:l + 32].flip(-1) if f else padded[:, t:t + 32, l:l + 32])]
        assert matches, "output is not a crop of the zero-padded image"
        seen.add(matches[0])
    assert len(seen) > 60  # 162 possible (offset, flip) pairs, spread over 200 draws
    assert {f for _, _, f in seen} == {False, True}


def test_autoaugment_changes_as_often_as_torchvision() -> None:
    """The share of images AutoAugment-CIFAR10 leaves unchanged matches torchvision's own."""
    batch = images(600, seed=3)
    ours = Candidate("autoaugment-cifar10", 10).policy(batch, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    tv = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    theirs = torch.stack([tv(im) for im in batch])
    unchanged_ours = (ours == batch).flatten(1).all(1).float().mean()
    unchanged_tv = (theirs == batch).flatten(1).all(1).float().mean()
    assert abs(unchanged_ours - unchanged_tv) < 0.06  # ~3.5 standard errors for p ~ 0.3, n = 600


def test_random_erasing_rate_and_area() -> None:
    batch = torch.full((2000, 3, 32, 32), 200, dtype=torch.uint8)
    out = RandomErasingPolicy()(batch, torch.Generator().manual_seed(0))
    erased = (out == 0).flatten(1)
    rate = erased.any(1).float().mean()
    assert 0.45 < rate < 0.55
    area = erased[erased.any(1)].float().mean()  # scale U(0.02, 0.33) -> mean ~0.175 where it fits
    assert 0.12 < area < 0.2


def test_cutmix_matches_torchvision_and_mixes_label_mass() -> None:
    batch, labels = images(16), torch.arange(16) % 10
    mixed, soft = cutmix(batch, labels, 10, torch.Generator().manual_seed(3))
    assert soft.shape == (16, 10)
    assert torch.allclose(soft.sum(1), torch.ones(16))
    pasted = (mixed != batch).flatten(1).any(0).view(3, 32, 32).any(0)  # where the box is
    lam = soft[0, labels[0]]
    # the rolled neighbour's share equals the pasted box's share of the image (up to equal pixels)
    assert float(1 - lam) >= float(pasted.float().mean()) - 1e-6
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(seed)
    expected_images, expected_soft = v2.CutMix(alpha=1.0, num_classes=10)(batch, labels)
    assert torch.equal(mixed, expected_images) and torch.equal(soft, expected_soft)


def test_parse_candidates() -> None:
    assert parse_candidates("all") == PAPER_CANDIDATES
    assert len(PAPER_CANDIDATES) == 16
    assert parse_candidates("none, augmix+cutmix,none") == ["none", "augmix+cutmix"]
    with pytest.raises(DaqkdError, match="unknown augmentation 'autoaugment'.*autoaugment-cifar10"):
        parse_candidates("none,autoaugment")


@pytest.mark.parametrize("name,message", [
    ("all", "--aug takes one augmentation, got 'all'"), ("randaugment,none", "--aug takes one augmentation"),
    (" randaugment", "unknown augmentation ' randaugment'"), ("none+cutmix ", "unknown augmentation 'none+cutmix '"),
])
def test_one_candidate_is_one_known_name(name: str, message: str) -> None:
    """A list or 'all' where one DA is trained passed parse_candidates and trained with no policy."""
    from daqkd.augment import check_candidate

    assert check_candidate("randaugment+cutmix") == "randaugment+cutmix"
    with pytest.raises(DaqkdError, match=re.escape(message)):
        Candidate(name, 10)


def test_large_mixed_size_images_get_resized_crops() -> None:
    g = torch.Generator().manual_seed(0)
    varied = [torch.randint(0, 256, (3, 80 + 7 * i, 96), dtype=torch.uint8, generator=g) for i in range(5)]
    for name in ("identity", "none", "trivialaugment+cutmix"):
        out, targets = Candidate(name, 4, crop_size=48)(varied, torch.arange(5) % 4, g)
        assert out.shape == (5, 3, 48, 48) and out.dtype == torch.uint8
        assert targets.shape[0] == 5
    # a uniform set is small only when both sides are: 200x48 images are large, whatever their width
    tall = torch.randint(0, 256, (3, 3, 200, 48), dtype=torch.uint8, generator=g)
    assert Candidate("none", 4, crop_size=48).base_view(tall, g).shape == (3, 3, 48, 48)


def test_mixup_equals_torchvision_on_float_images() -> None:
    from torchvision.transforms import v2

    from daqkd.augment import mixup

    batch, labels = images()[:8], torch.arange(8) % 10
    mixed, soft = mixup(batch, labels, 10, torch.Generator().manual_seed(4))
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(seed)
    reference, reference_soft = v2.MixUp(alpha=1.0, num_classes=10)(batch.float(), labels)
    assert mixed.dtype == torch.uint8 and torch.equal(mixed, reference.round().to(torch.uint8))
    assert torch.allclose(soft, reference_soft)
    lam = float(soft[0, labels[0]])  # torchvision pairs image i with image i-1
    assert torch.allclose(soft[0], lam * torch.eye(10)[labels[0]] + (1 - lam) * torch.eye(10)[labels[-1]])
    _, targets = Candidate("randaugment+mixup", 10)(batch, labels, torch.Generator().manual_seed(4))
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))


def test_registering_a_da_is_one_decorator_and_leaves_all_alone() -> None:
    from daqkd.augment import PAPER_CANDIDATES, POLICIES, parse_candidates, register_policy

    paper = list(PAPER_CANDIDATES)
    assert len(paper) == 16 and parse_candidates("all") == paper

    @register_policy("invert-all")
    class InvertAll:
        def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return 255 - batch

    try:
        assert "invert-all" in known_names() and "invert-all+mixup" in known_names()
        assert parse_candidates("all") == paper  # a new DA does not join the paper's list
        batch = images()[:4]
        out, _ = Candidate("invert-all", 10)(batch, torch.zeros(4), torch.Generator().manual_seed(0))
        base = Candidate("none", 10).base_view(batch, torch.Generator().manual_seed(0))
        assert torch.equal(out, 255 - base)  # the base crop + flip, then the policy
        with pytest.raises(ValueError, match="already registered"):
            register_policy("invert-all")(InvertAll)
    finally:
        del POLICIES["invert-all"]


def augmix_chain_by_chain(policy: AugMixPolicy, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """AugMix as torchvision runs it: each chain to its end before the next one starts."""
    n, _, h, w = images.shape
    table = magnitude_table(policy.space, 10, h, w)
    m = torch._sample_dirichlet(torch.full((n, 2), policy.alpha, dtype=torch.float64), generator=generator)
    weights = torch._sample_dirichlet(torch.full((n, policy.width), policy.alpha, dtype=torch.float64),
                                      generator=generator) * m[:, 1:]
    mix = images * m[:, 0].float().view(-1, 1, 1, 1)
    for i in range(policy.width):
        depth = torch.full((n,), policy.depth) if policy.depth > 0 else torch.randint(1, 4, (n,), generator=generator)
        chain = images
        for step in range(int(depth.max())):
            op = torch.randint(len(policy.op_names), (n,), generator=generator)
            level = torch.randint(policy.severity, (n,), generator=generator)
            magnitude = policy.magnitudes(table, op, level, generator)
            chain = policy.apply(chain, torch.where(depth > step, op, -1), magnitude)
        mix += chain * weights[:, i].float().view(-1, 1, 1, 1)
    return mix.to(torch.uint8)


@pytest.mark.parametrize("depth", [-1, 2])
def test_augmix_batched_chains_equal_chain_by_chain(depth: int) -> None:
    policy = AugMixPolicy(depth=depth)
    batch = images()
    for seed in range(3):
        ours = policy(batch, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, augmix_chain_by_chain(policy, batch, torch.Generator().manual_seed(seed)))


def apply_ops_one_by_one(images: torch.Tensor, op_index: torch.Tensor, magnitude: torch.Tensor,
                         op_names: list[str], interpolation: str) -> torch.Tensor:
    """The naive reference: every op on its own images through its own kernel."""
    out = images.clone()
    for k, name in enumerate(op_names):
        chosen = (op_index == k).nonzero().squeeze(1)
        if chosen.numel():
            out[chosen] = BATCH_OPS[name](out[chosen], magnitude[chosen], interpolation)
    return out


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_one_shared_warp_equals_each_geometric_op_alone(interpolation: str) -> None:
    batch = images(400)
    g = torch.Generator().manual_seed(3)
    for space in (v2.TrivialAugmentWide._AUGMENTATION_SPACE, v2.AugMix._AUGMENTATION_SPACE,
                  v2.AutoAugment._AUGMENTATION_SPACE):
        names = list(space)
        op_index = torch.randint(-1, len(names), (400,), generator=g)
        magnitude = torch.rand(400, generator=g, dtype=torch.float64) * 1.6 - 0.8
        for k, name in enumerate(names):  # each op's own magnitude range, some rotations exact
            rows = op_index == k
            low, high = RANGES.get(name, (0.0, 1.0))
            magnitude[rows] = low + (high - low) * torch.rand(int(rows.sum()), generator=g, dtype=torch.float64)
            if name == "Posterize":
                magnitude[rows] = magnitude[rows].round()
        rotations = (op_index == names.index("Rotate")).nonzero().squeeze(1)
        magnitude[rotations[:6]] = torch.tensor([90.0, -90.0, 180.0, 0.0, 270.0, 45.0], dtype=torch.float64)
        ours = apply_ops(batch, op_index, magnitude, names, interpolation)
        assert torch.equal(ours, apply_ops_one_by_one(batch, op_index, magnitude, names, interpolation))
        assert not torch.equal(ours, batch)


def test_seeded_mixers_and_custom_das_leave_the_cuda_generators_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """CutMix and per-image custom DAs seed torchvision's draws on the CPU generator only; reseeding
    CUDA's (as torch.manual_seed does) would make GPU-side randomness depend on --augment-workers."""
    from daqkd.augment.custom import PerImageDA

    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 4
    first = cutmix(images, labels, 4, torch.Generator().manual_seed(0))
    again = cutmix(images, labels, 4, torch.Generator().manual_seed(0))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # still seeded
    PerImageDA("flip", v2.RandomHorizontalFlip())(images, labels, torch.Generator().manual_seed(0))
    assert reseeded == []
