"""Data sets as decoded uint8 tensors in RAM.

Ranking and training read every image many times (once per candidate DA, epoch or repeat), so each
image is decoded once and kept as uint8 (CIFAR-10's 50,000 train images: 150 MB). Sources:

- an ImageFolder root with ``train/`` and ``test/``, one folder per class (``--data DIR``);
- CIFAR-10/100 through torchvision's downloaders (``--dataset cifar10|cifar100``), which need a
  network the first time.

``limit_per_class`` keeps the first K images of each class in sorted file order.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from .errors import DaqkdError

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which needs FFmpeg; the
# pinned release still ships them and they decode ~3x faster than PIL here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TORCHVISION_DATASETS = ("cifar10", "cifar100")


@dataclass
class ImageSet:
    """Decoded images and their labels.

    images: (N, 3, H, W) uint8 when every image has the same size, else a list of (3, H_i, W_i)
    uint8 tensors; labels: (N,) int64 indices into ``classes``.
    """

    images: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def take(self, indices: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The images at ``indices`` (a batch tensor, or a list for mixed sizes)."""
        if isinstance(self.images, torch.Tensor):
            return self.images[indices]
        return [self.images[i] for i in indices.tolist()]


def stack_if_uniform(images: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One (N, 3, H, W) tensor if all images share a size, else the list."""
    if images and all(im.shape == images[0].shape for im in images):
        return torch.stack(list(images))
    return list(images)


def limit_indices(labels: Sequence[int], limit_per_class: int | None) -> list[int]:
    """Indices of the first ``limit_per_class`` samples of each class, in their original order."""
    if limit_per_class is None:
        return list(range(len(labels)))
    if limit_per_class < 1:
        raise DaqkdError("--limit-per-class must be at least 1")
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        if seen.get(y, 0) < limit_per_class:
            seen[y] = seen.get(y, 0) + 1
            keep.append(i)
    return keep


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of an ImageFolder split."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_folder(root: str | Path, split: str = "train",
                      limit_per_class: int | None = None) -> ImageSet:
    """Decode ``root/split/<class>/<image>`` (ImageFolder layout) into RAM.

    Classes are the sorted folder names of ``root/train`` (so train and test share indices); files
    are taken in sorted order. Raises DaqkdError for a missing folder, no images, or a file that
    does not decode.
    """
    root = Path(root)
    split_dir = root / split
    if not root.is_dir():
        raise DaqkdError(f"--data {root} does not exist: pass an ImageFolder root with train/ and test/")
    if not split_dir.is_dir():
        raise DaqkdError(
            f"--data {root} has no {split}/ folder: an ImageFolder root holds train/ and test/, "
            "each with one folder of images per class"
        )
    train_dir = root / "train"
    classes = find_classes(train_dir if train_dir.is_dir() else split_dir)
    if not classes:
        raise DaqkdError(f"{train_dir} has no class folders: put each class's images in its own folder")
    unknown = set(find_classes(split_dir)) - set(classes)
    if unknown:
        raise DaqkdError(
            f"{split_dir} has classes that train/ lacks ({', '.join(sorted(unknown)[:3])}): "
            "train/ and test/ must hold the same class folders"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        found = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    if not files:
        raise DaqkdError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {split_dir}/<class>/")
    keep = limit_indices(labels, limit_per_class)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # decoding releases the GIL
        images = list(pool.map(decode_file, [files[i] for i in keep], chunksize=256))
    return ImageSet(
        images=stack_if_uniform(images),
        labels=torch.tensor([labels[i] for i in keep], dtype=torch.int64),
        classes=classes,
        source=str(split_dir),
    )


def decode_file(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB image; DaqkdError naming the file if it cannot be decoded."""
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DaqkdError(f"cannot decode image {path} ({first_line}): replace or delete the file") from exc


def load_torchvision_dataset(name: str, root: str | Path, split: str = "train",
                             limit_per_class: int | None = None, download: bool = True) -> ImageSet:
    """CIFAR-10/100 through torchvision, downloaded into ``root`` if absent.

    Raises DaqkdError naming ``--data`` when the download fails (no network).
    """
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}.get(name)
    if cls is None:
        raise DaqkdError(f"unknown --dataset {name!r}: use {' or '.join(TORCHVISION_DATASETS)}, "
                         "or --data DIR for an ImageFolder")
    try:
        ds = cls(root=str(root), train=(split == "train"), download=download)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise DaqkdError(
            f"could not get {name} into {root} ({type(exc).__name__}: no network?): pass --data DIR "
            "with the data set as an ImageFolder (e.g. --data ../shared/data/cifar10)"
        ) from exc
    targets = list(ds.targets)
    keep = limit_indices(targets, limit_per_class)
    images = torch.from_numpy(ds.data[keep]).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor([targets[i] for i in keep]), list(ds.classes), f"{name}:{split}")


def load_data(data: str | None, dataset: str | None, split: str = "train",
              limit_per_class: int | None = None, download_root: str | Path = "~/.cache/daqkd") -> ImageSet:
    """Dispatch on the CLI's ``--data`` / ``--dataset`` options (exactly one must be given)."""
    if split not in ("train", "test"):
        raise DaqkdError(f"unknown --split {split!r}: use train or test")
    if (data is None) == (dataset is None):
        raise DaqkdError("pass exactly one of --data DIR (an ImageFolder root) or --dataset cifar10|cifar100")
    if data is not None:
        return load_image_folder(data, split, limit_per_class)
    return load_torchvision_dataset(dataset, Path(download_root).expanduser(), split, limit_per_class)
