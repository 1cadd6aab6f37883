"""Shared fixtures: tiny synthetic ImageFolders and the paths of ../shared."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR10 = SHARED / "data" / "cifar10"
RESNET20 = SHARED / "weights" / "cifar10" / "resnet20-12fca82f.th"


@pytest.fixture(autouse=True, scope="session")
def eager_quantizer_kernels():
    """Eager quantizer kernels: compiling them costs ~6 s each, which the tests need not pay
    (test_quant checks the compiled ones against the eager ones). The environment variable too, so
    that processes the tests start (sweep workers, torchrun ranks) run the same eager formulas as
    this one: compiled kernels round differently, and those tests compare weights bit for bit."""
    from daqkd.quant import kernels

    saved = os.environ.get("DAQKD_FUSED_KERNELS")
    os.environ["DAQKD_FUSED_KERNELS"] = "0"
    kernels.set_fused_kernels("0")
    yield
    if saved is None:
        os.environ.pop("DAQKD_FUSED_KERNELS", None)
    else:
        os.environ["DAQKD_FUSED_KERNELS"] = saved


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: tuple[int, int] = (32, 32),
                      splits: tuple[str, ...] = ("train", "test"), seed: int = 0) -> Path:
    """Write ``root/{split}/class_k/img_i.png``: noise around a class-specific color."""
    generator = torch.Generator().manual_seed(seed)
    for split in splits:
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            color = torch.tensor([60 + 80 * (k % 3), 60 + 60 * (k % 2), 200 - 70 * (k % 3)]).view(3, 1, 1)
            for i in range(per_class):
                noise = torch.randint(-40, 41, (3, *size), generator=generator)
                image = (color + noise).clamp(0, 255).to(torch.uint8)
                write_png(image, str(folder / f"img_{i:03d}.png"))
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "tiny")


@pytest.fixture
def shared_cifar10() -> Path:
    assert CIFAR10.is_dir(), f"tests need the shared CIFAR-10 ImageFolder at {CIFAR10}"
    return CIFAR10


@pytest.fixture
def shared_resnet20() -> Path:
    assert RESNET20.is_file(), f"tests need the shared ResNet-20 weights at {RESNET20}"
    return RESNET20


@contextlib.contextmanager
def threads_of_two_workers() -> Iterator[None]:
    """Torch threads as each of 2 sweep workers gets them (half the cores), restored after: a serial
    run inside computes the same float sums as the workers, so their results compare bit for bit."""
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // 2))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
