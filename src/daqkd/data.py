"""Data sets as decoded uint8 tensors in RAM.

Ranking and training read every image many times (once per candidate DA, epoch or repeat), so each
image is decoded once and kept as uint8 (CIFAR-10's 50,000 train images: 150 MB). Sources:

- an ImageFolder root with ``train/`` and ``test/``, one folder per class (``--data DIR``);
- a NumPy archive with Keras-style keys ``x_train``, ``y_train``, ``x_test``, ``y_test`` and an
  optional ``classes`` (``--data FILE.npz``), read without unpickling;
- CIFAR-10/100 through torchvision's downloaders (``--dataset cifar10|cifar100``), which need a
  network the first time.

``limit_per_class`` keeps the first K images of each class in sorted file order (folders) or in
array order (archives).
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from .errors import DaqkdError
from .errors import first_line as _first_line
from .runtime import mix_seed

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which needs FFmpeg; the
# pinned release still ships them and they decode ~3x faster than PIL here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TORCHVISION_DATASETS = ("cifar10", "cifar100")
ARCHIVE_SUFFIX = ".npz"
ARCHIVE_KEYS = ("x_train", "y_train", "x_test", "y_test")


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


class DataWarning(UserWarning):
    """Something about the data that changes what daqkd does with it (the CLI prints one line)."""


def stack_if_uniform(images: Sequence[torch.Tensor], source: str = "the data") -> torch.Tensor | list[torch.Tensor]:
    """One (N, 3, H, W) tensor if all images share a size; else the list (images of any size: the
    RandomResizedCrop path), unless most images share one small size (<= SMALL_IMAGE_MAX px, a
    CIFAR-like set with a few odd images): those few are resized to it, with a DataWarning that says
    how many, so one stray image never sends the whole set down the large-image path."""
    from collections import Counter

    from torchvision.transforms.v2 import functional as TF

    from .augment.base import SMALL_IMAGE_MAX

    if not images:
        return list(images)
    sizes = Counter(tuple(im.shape[-2:]) for im in images)
    if len(sizes) == 1:
        return torch.stack(list(images))
    (height, width), count = sizes.most_common(1)[0]
    if count * 2 <= len(images) or max(height, width) > SMALL_IMAGE_MAX:
        return list(images)
    odd = len(images) - count
    warnings.warn(f"{odd:,} of {len(images):,} images in {source} are not {height}x{width} like the others "
                  f"(e.g. {next(tuple(s) for s in sizes if s != (height, width))}); resized to {height}x{width}",
                  DataWarning, stacklevel=2)
    return torch.stack([im if tuple(im.shape[-2:]) == (height, width)
                        else TF.resize(im, [height, width], antialias=True) for im in images])


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


def subset(data: ImageSet, indices: Sequence[int], source: str | None = None) -> ImageSet:
    """The images and labels at ``indices`` (in that order), the same classes."""
    index = torch.as_tensor(list(indices), dtype=torch.int64)
    images = data.images[index] if isinstance(data.images, torch.Tensor) else [data.images[i] for i in index.tolist()]
    return ImageSet(images, data.labels[index], data.classes, source or data.source)


# the stream of the validation draw, apart from every other use of the seed (a run's epochs, its batches)
VALIDATION_STREAM = 0x76616C


def split_validation(data: ImageSet, per_class: int, seed: int,
                     train_limit_per_class: int | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, validation): ``per_class`` images of each class drawn at random (seeded by ``seed``
    alone, so every run with that seed holds out the same images) out of the training split, and
    the rest, in their original order, of which ``train_limit_per_class`` keeps the first K per
    class (a data-limited run trains on the first K images the validation split left).

    A held-out split is what a selection may be tuned on: the test split stays unseen by every
    decision (the racing sweep, Jamieson & Talwalkar 2016)."""
    if per_class < 1:
        raise DaqkdError(f"--val-per-class must be at least 1, got {per_class}")
    generator = torch.Generator().manual_seed(mix_seed(seed, VALIDATION_STREAM))
    order = torch.randperm(len(data), generator=generator)
    labels = data.labels[order]
    held: list[int] = []
    counts = torch.bincount(data.labels, minlength=data.num_classes)
    for k in range(data.num_classes):
        if counts[k] <= per_class:
            raise DaqkdError(f"--val-per-class {per_class} leaves class {data.classes[k]!r} ({int(counts[k])} training "
                             f"images) nothing to train on: use at most {int(counts.min()) - 1}")
        held.extend(order[labels == k][:per_class].tolist())
    held.sort()
    held_set = set(held)
    rest = [i for i in range(len(data)) if i not in held_set]
    if train_limit_per_class is not None:
        rest = [rest[i] for i in limit_indices(data.labels[rest].tolist(), train_limit_per_class)]
    return (subset(data, rest, data.source),
            subset(data, held, f"{data.source} (validation: {per_class} per class, seed {seed})"))


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
    if root.is_file():
        raise DaqkdError(f"--data {root} is a file: pass an ImageFolder directory (train/, test/) or a .npz archive")
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
        images=stack_if_uniform(images, str(split_dir)),
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


def is_array_archive(data: str | Path) -> bool:
    """True when ``--data`` names a NumPy archive rather than an ImageFolder root."""
    return str(data).lower().endswith(ARCHIVE_SUFFIX)


def load_array_archive(path: str | Path, split: str = "train", limit_per_class: int | None = None) -> ImageSet:
    """Read one split of a NumPy ``.npz`` archive with Keras-style keys into RAM.

    Keys: ``x_train``/``x_test`` uint8 images (N, H, W, C) with C = 3 (RGB) or 1, or (N, H, W)
    (grayscale, both replicated to 3 channels as folders decode them); ``y_train``/``y_test``
    integer labels (N,) or (N, 1) in 0..K-1; optional ``classes``, K names in label order (else
    ``0``..``K-1`` with K = max(y_train) + 1). Every class needs at least one train image, so train
    and test agree on K. Nothing is unpickled. Every member streams through once (checked against
    its header's shape before anything is allocated and against its CRC-32 at the end), and only
    the images ``limit_per_class`` keeps are copied, so a limit costs the kept images in memory even
    for a compressed archive (``np.savez_compressed``). Raises DaqkdError naming the key of any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DaqkdError(f"--data {path} does not exist: pass a .npz archive with x_train, y_train, x_test, y_test")
    with open(path, "rb") as file:
        magic = file.read(6)
    if not magic.startswith(b"PK") and not magic.startswith(b"\x93NUMPY"):
        # np.load takes any other bytes for a pickle and advises loading it unsafely: never the advice here
        raise DaqkdError(f"{path} is not a NumPy archive (neither a .npz zip file nor a .npy array): write it with "
                         "np.savez or np.savez_compressed")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DaqkdError(f"cannot read {path} as a NumPy .npz archive ({_first_line(exc)}): "
                         "write it with np.savez or np.savez_compressed") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DaqkdError(f"{path} holds a single array, not a .npz archive: save x_train, y_train, x_test, y_test "
                         "with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    with archive:
        missing = [k for k in ARCHIVE_KEYS if k not in archive.files]
        if missing:
            raise DaqkdError(f"{path} has no key {missing[0]}: an array archive holds {', '.join(ARCHIVE_KEYS)} "
                             "(and optionally classes), as np.savez(path, x_train=..., ...) writes them")
        train_labels = _labels(_read_member(path, archive, "y_train"), "y_train")
        classes = _class_names(path, archive, train_labels)
        labels = train_labels if split == "train" else _labels(_read_member(path, archive, f"y_{split}"), f"y_{split}")
        _check_label_range(labels, f"y_{split}", len(classes))
        image_key = f"x_{split}"
        member = _open_member(path, archive, image_key)
        _check_images(member.shape, member.dtype, image_key, len(labels), f"y_{split}")
        keep = limit_indices(labels.tolist(), limit_per_class)
        picked = _read_body(path, member, keep if len(keep) < len(labels) else None)
    tensor = torch.from_numpy(np.ascontiguousarray(picked))
    tensor = tensor.unsqueeze(-1) if tensor.ndim == 3 else tensor
    tensor = tensor.permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()
    return ImageSet(tensor, torch.from_numpy(labels[keep].astype(np.int64)), classes, f"{path}:{split}")


# zlib's bound on DEFLATE's expansion (1032:1): a compressed member whose recorded size exceeds it lies
DEFLATE_MAX_EXPANSION = 1032
# bytes decompressed at a time when only some images are kept: memory stays at the kept images plus this
READ_CHUNK_BYTES = 1 << 20


@dataclass
class _Member:
    """An open ``.npy`` member of an archive, its header read: the array body comes next in ``stream``."""

    key: str
    stream: Any  # zipfile.ZipExtFile: checks the CRC-32 when the body has been read to its end
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


def _open_member(path: Path, archive: np.lib.npyio.NpzFile, key: str) -> _Member:
    """Open member ``key`` and read its .npy header, checking before anything is allocated that the
    header's shape fits the member's recorded size (a lying header once read past the member's end, or
    asked for terabytes). ``np.load``'s own reader trusts the header, so this is done by hand."""
    try:
        info = archive.zip.getinfo(key + ".npy")
        if info.compress_type == zipfile.ZIP_DEFLATED and \
                info.file_size > DEFLATE_MAX_EXPANSION * info.compress_size + 1024:
            raise ValueError(f"the zip records {info.file_size:,} bytes for {info.compress_size:,} compressed, "
                             "more than DEFLATE can expand to")
        stream = archive.zip.open(info)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        if dtype.hasobject:
            raise DaqkdError(f"{path}: {key} is an array of Python objects, which would need unpickling (daqkd "
                             f"never unpickles data): store {key} as a numeric array")
        declared = stream.tell() + math.prod(shape) * dtype.itemsize
        if declared != info.file_size:
            raise ValueError(f"its header declares shape {tuple(shape)} ({declared:,} bytes with the header) but the "
                             f"member holds {info.file_size:,} bytes")
    except ValueError as exc:
        raise DaqkdError(f"{path}: cannot read {key} ({_first_line(exc)}): rewrite the archive with np.savez") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DaqkdError(f"{path}: cannot read {key} ({_first_line(exc)}): is the file complete?") from exc
    return _Member(key, stream, tuple(shape), dtype, fortran_order)


def _read_body(path: Path, member: _Member, keep: Sequence[int] | None = None) -> np.ndarray:
    """The member's array, or only its rows ``keep`` (in that order): those are picked while the body
    streams past, so a compressed archive costs the kept rows in memory, not the whole array. The
    stream is read to its end either way, so zipfile checks every byte against the CRC-32."""
    shape, dtype = member.shape, member.dtype
    row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
    pick = keep is not None and not member.fortran_order and len(shape) >= 1
    try:
        out = np.empty((len(keep),) + shape[1:] if pick else shape, dtype=dtype,
                       order="F" if member.fortran_order else "C")
    except MemoryError as exc:
        raise DaqkdError(f"{path}: {member.key} of shape {shape} does not fit in memory: pass --limit-per-class "
                         "to keep fewer images") from exc
    flat = out.reshape(-1, order="A").view(np.uint8)
    try:
        if pick:
            order = np.argsort(np.asarray(keep, dtype=np.int64), kind="stable")
            sorted_keep = np.asarray(keep, dtype=np.int64)[order]
            rows_per_chunk = max(1, READ_CHUNK_BYTES // max(row_bytes, 1))
            next_pick, first_row = 0, 0
            while first_row < shape[0]:
                rows = min(rows_per_chunk, shape[0] - first_row)
                chunk = _read_exactly(member.stream, rows * row_bytes)
                end = np.searchsorted(sorted_keep, first_row + rows)
                for target, row in zip(order[next_pick:end].tolist(), sorted_keep[next_pick:end].tolist()):
                    start = (row - first_row) * row_bytes
                    flat[target * row_bytes:(target + 1) * row_bytes] = np.frombuffer(chunk, np.uint8, row_bytes, start)
                next_pick, first_row = end, first_row + rows
        else:
            for start in range(0, flat.size, READ_CHUNK_BYTES):
                size = min(READ_CHUNK_BYTES, flat.size - start)
                flat[start:start + size] = np.frombuffer(_read_exactly(member.stream, size), np.uint8)
        if member.stream.read(1):  # the end: also where zipfile compares the CRC-32
            raise ValueError("the member holds more bytes than its header declares")
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise DaqkdError(f"{path}: cannot read {member.key} ({_first_line(exc)}): is the file complete?") from exc
    finally:
        member.stream.close()
    # a Fortran-ordered body holds no row contiguously, so it is read whole and the rows picked after
    return out[np.asarray(keep, dtype=np.int64)] if keep is not None and not pick else out


def _read_exactly(stream: Any, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"the member ends {size - len(data):,} bytes early")
    return data


def _read_member(path: Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    """The whole array ``key`` of the archive."""
    return _read_body(path, _open_member(path, archive, key))


def _labels(array: np.ndarray, key: str) -> np.ndarray:
    """Integer labels as a 1-D int64 array; (N, 1) as Keras stores them is accepted."""
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DaqkdError(f"{key} has shape {array.shape}: store one integer label per image, shape (N,)")
    if array.dtype.kind not in "iu":
        raise DaqkdError(f"{key} has dtype {array.dtype}: store integer class indices 0..K-1 (e.g. .astype(np.int64))")
    if len(array) == 0:
        raise DaqkdError(f"{key} is empty: the archive needs images in both splits")
    if array.dtype.kind == "u" and int(array.max()) > np.iinfo(np.int64).max:  # would wrap to a negative int64
        raise DaqkdError(f"{key} has label {int(array.max())}: labels are class indices 0..K-1")
    return np.asarray(array, dtype=np.int64)


def _class_names(path: Path, archive: np.lib.npyio.NpzFile, train_labels: np.ndarray) -> list[str]:
    """The ``classes`` key as strings, else ``0..K-1``; every class must have train images."""
    if int(train_labels.min()) < 0:
        raise DaqkdError(f"y_train has label {int(train_labels.min())}: labels are class indices 0..K-1")
    if "classes" in archive.files:
        names = _read_member(path, archive, "classes")
        if names.ndim != 1 or names.dtype.kind not in "US" or len(names) == 0:
            raise DaqkdError(f"classes has shape {names.shape} and dtype {names.dtype}: store the K class names "
                             "in label order as a 1-D string array (np.array(['apple', ...]))")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
        if len(set(classes)) != len(classes):
            duplicate = next(n for n in classes if classes.count(n) > 1)
            raise DaqkdError(f"classes names {duplicate!r} twice: class names must be unique")
    else:
        classes = [str(k) for k in range(int(train_labels.max()) + 1)]
    _check_label_range(train_labels, "y_train", len(classes))
    counts = np.bincount(train_labels, minlength=len(classes))
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise DaqkdError(f"y_train has no images of class {empty} ({classes[empty]}): every class needs train images; "
                         "drop the class from classes and renumber the labels")
    return classes


def _check_label_range(labels: np.ndarray, key: str, num_classes: int) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DaqkdError(f"{key} has label {bad} but there are {num_classes} classes: labels must lie in "
                         f"0..{num_classes - 1} (one name per class in classes)")


def _check_images(shape: tuple[int, ...], dtype: np.dtype, key: str, count: int, label_key: str) -> None:
    """Check an image member's header before its pixels are read."""
    if dtype != np.uint8:
        raise DaqkdError(f"{key} has dtype {dtype}: store uint8 pixels 0..255 "
                         "(from [0, 1] floats: (x * 255).round().astype(np.uint8))")
    if len(shape) == 4 and shape[-1] not in (1, 3) and shape[1] in (1, 3):
        raise DaqkdError(f"{key} has shape {shape}, channels first: store N x H x W x C "
                         "(x.transpose(0, 2, 3, 1))")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):
        raise DaqkdError(f"{key} has shape {shape}: store images as N x H x W x 3 (RGB) or N x H x W (gray)")
    if shape[0] != count:
        raise DaqkdError(f"{key} holds {shape[0]} images but {label_key} has {count} labels: "
                         "they must pair up one to one")
    if 0 in shape[1:3]:
        raise DaqkdError(f"{key} has shape {shape}: images of zero height or width hold no pixels; "
                         "store N x H x W x 3 with H, W >= 1")


def image_set_from_dataset(dataset: Any, classes: Sequence[str] | None = None, source: str = "dataset") -> ImageSet:
    """A torch ``Dataset`` of (image, label) pairs as an ImageSet, every image read once into RAM.

    Images: uint8 (C, H, W) tensors (C = 1 or 3) or PIL images (use no ToTensor/Normalize in the
    data set: augmentation and normalization belong to daqkd). ``classes`` default to the data
    set's ``classes`` attribute, else ``0..K-1``.
    """
    from torchvision.transforms.v2 import functional as TF

    images, labels = [], []
    for i in range(len(dataset)):
        image, label = dataset[i]
        if not isinstance(image, torch.Tensor):
            image = TF.pil_to_tensor(image.convert("RGB"))
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise DaqkdError(f"item {i} of the data set is a {image.dtype} {tuple(image.shape)} tensor: give uint8 "
                             "(3, H, W) images (or PIL images), without ToTensor or Normalize")
        images.append(image.expand(3, -1, -1).contiguous())
        labels.append(int(label))
    if not images:
        raise DaqkdError("the data set is empty")
    names = list(classes or getattr(dataset, "classes", None) or [str(k) for k in range(max(labels) + 1)])
    return ImageSet(stack_if_uniform(images, source), torch.tensor(labels, dtype=torch.int64), names, source)


def load_data(data: str | None, dataset: str | None, split: str = "train",
              limit_per_class: int | None = None, download_root: str | Path = "~/.cache/daqkd") -> ImageSet:
    """Dispatch on the CLI's ``--data`` / ``--dataset`` options (exactly one must be given)."""
    if split not in ("train", "test"):
        raise DaqkdError(f"unknown --split {split!r}: use train or test")
    if (data is None) == (dataset is None):
        raise DaqkdError("pass exactly one of --data DIR (an ImageFolder root), --data FILE.npz (an array archive) "
                         "or --dataset cifar10|cifar100")
    if data is not None and is_array_archive(data):
        return load_array_archive(data, split, limit_per_class)
    if data is not None:
        return load_image_folder(data, split, limit_per_class)
    return load_torchvision_dataset(dataset, Path(download_root).expanduser(), split, limit_per_class)
