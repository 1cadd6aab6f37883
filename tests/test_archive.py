"""NumPy array archives as data (``--data FILE.npz``): layout, limits, memory-mapping, bad archives."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from daqkd.cli import main
from daqkd.data import load_array_archive, load_data
from daqkd.errors import DaqkdError


def make_archive(path: Path, num_classes: int = 3, train_per_class: int = 6, test_per_class: int = 2,
                 size: int = 8, compressed: bool = True, **overrides: object) -> Path:
    """A tiny archive with Keras keys; labels interleaved (0, 1, 2, 0, 1, 2, ...) so that array order
    differs from class order; each image's pixels encode (split, index) for identification."""
    arrays: dict[str, object] = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        count = num_classes * per_class
        labels = np.arange(count) % num_classes
        images = np.zeros((count, size, size, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = np.arange(count)
        images[:, 0, 0, 1] = 0 if split == "train" else 1
        images[:, 1:, :, :] = (labels * 60 + 20)[:, None, None, None]
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    arrays["classes"] = np.array([f"c{k}" for k in range(num_classes)])
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@pytest.mark.parametrize("compressed", [True, False])
def test_archive_layout_labels_and_limit(tmp_path: Path, compressed: bool) -> None:
    archive = make_archive(tmp_path / "d.npz", compressed=compressed)
    train = load_data(str(archive), None, "train")
    assert train.classes == ["c0", "c1", "c2"] and train.source == f"{archive}:train"
    assert train.images.dtype == torch.uint8 and train.images.shape == (18, 3, 8, 8)
    assert train.labels.tolist() == [0, 1, 2] * 6
    # HWC -> CHW: channel 0 of pixel (0, 0) holds the index, channel 1 the split
    assert train.images[:, 0, 0, 0].tolist() == list(range(18)) and train.images[:, 1, 0, 0].eq(0).all()
    test = load_data(str(archive), None, "test")
    assert len(test) == 6 and test.images[:, 1, 0, 0].eq(1).all() and test.classes == train.classes
    # the first K of each class in array order
    limited = load_array_archive(archive, "train", limit_per_class=2)
    assert limited.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert limited.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_stored_and_compressed_archives_read_the_same_and_fortran_order_is_kept(tmp_path: Path) -> None:
    stored = make_archive(tmp_path / "s.npz", compressed=False)
    packed = make_archive(tmp_path / "p.npz", compressed=True)
    for split in ("train", "test"):
        a, b = load_array_archive(stored, split, 4), load_array_archive(packed, split, 4)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    images = np.asfortranarray(np.random.default_rng(0).integers(0, 256, (18, 8, 8, 3), dtype=np.uint8))
    fortran = make_archive(tmp_path / "f.npz", x_train=images)
    for limit in (None, 2):
        data = load_array_archive(fortran, "train", limit)
        keep = list(range(18)) if limit is None else [0, 1, 2, 3, 4, 5]
        assert torch.equal(data.images, torch.from_numpy(images[keep]).permute(0, 3, 1, 2))


def test_a_limit_keeps_only_the_chosen_images_in_memory(tmp_path: Path) -> None:
    """A compressed x_train was decompressed whole before the first K of each class were picked: a
    632 KB archive cost 1.3 GB. Now the kept rows are copied while the member streams past."""
    count, size = 4000, 40  # 19.2 MB of pixels that compress to ~20 KB
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(count) % 256
    labels = np.arange(count) % 10
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, x_train=images, y_train=labels, x_test=images[:10], y_test=labels[:10])
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        data = load_array_archive(path, "train", limit_per_class=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.images[:, 0, 0, 0].tolist() == list(range(30)) and data.labels.tolist() == list(range(10)) * 3
    assert peak < 8_000_000, peak  # the whole member is 19.2 MB; chunks are 1 MB


def _npy_bytes(array: np.ndarray, declared_shape: tuple[int, ...] | None = None) -> bytes:
    """A .npy file of ``array``, its header declaring ``declared_shape`` when given."""
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": declared_shape or array.shape}
    np.lib.format.write_array_header_1_0(out, header)
    out.write(np.ascontiguousarray(array).tobytes())
    return out.getvalue()


def test_a_stored_member_whose_header_declares_more_images_than_it_holds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A memmap read the 12 missing images out of the zip bytes that follow x_train."""
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("x_train.npy", _npy_bytes(_images(18), declared_shape=(30, 8, 8, 3)))
        archive.writestr("y_train.npy", _npy_bytes(np.arange(30) % 3))
        archive.writestr("x_test.npy", _npy_bytes(_images(6)))
        archive.writestr("y_test.npy", _npy_bytes(np.arange(6) % 3))
    assert main(["eval", str(tmp_path / "run"), "--data", str(path), "--split", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("daqkd: error: ") and "cannot read x_train" in err[0], err
    assert "declares shape (30, 8, 8, 3)" in err[0] and "holds 3,584 bytes" in err[0], err  # 128 + 18 * 192


def test_a_stored_member_with_a_bad_crc_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_archive(tmp_path / "s.npz", compressed=False)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x_train.npy")
    raw = bytearray(path.read_bytes())
    name_length, extra_length = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    last_pixel = info.header_offset + 30 + name_length + extra_length + info.file_size - 1
    raw[last_pixel] ^= 0xFF  # one pixel of the last image: the header and the shape stay valid
    path.write_bytes(bytes(raw))
    assert main(["eval", str(tmp_path / "run"), "--data", str(path), "--split", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read x_train" in err[0] and "Bad CRC-32" in err[0], err


def _central_record(raw: bytes, name: str) -> int:
    """Offset of ``name``'s record in the zip's central directory (the one zipfile.getinfo reads)."""
    start = raw.index(b"PK\x01\x02")
    while raw[start + 46:start + 46 + int.from_bytes(raw[start + 28:start + 30], "little")] != name.encode():
        start = raw.index(b"PK\x01\x02", start + 4)
    return start


def _write_members(path: Path, members: dict[str, bytes], compression: int) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for key, data in members.items():
            archive.writestr(key + ".npy", data)
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "compressed"])
@pytest.mark.parametrize("key,declared", [("y_train", (10 ** 12,)), ("x_train", (10 ** 9, 8, 8, 3))])
def test_a_huge_declared_shape_is_refused_before_anything_is_allocated(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], compression: int, key: str,
        declared: tuple[int, ...]) -> None:
    """np.load trusts the header and asked for 7.3 TiB (y_train) or 179 GiB (x_train)."""
    members = {"x_train": _npy_bytes(_images(18)), "y_train": _npy_bytes(np.arange(18) % 3),
               "x_test": _npy_bytes(_images(6)), "y_test": _npy_bytes(np.arange(6) % 3)}
    members[key] = _npy_bytes(np.arange(18) % 3 if key == "y_train" else _images(18), declared_shape=declared)
    path = _write_members(tmp_path / "huge.npz", members, compression)
    assert main(["eval", str(tmp_path / "run"), "--data", str(path), "--split", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot read {key} (its header declares shape {declared}" in err[0], err


def test_a_compressed_size_beyond_what_deflate_can_expand_to_is_refused(tmp_path: Path) -> None:
    """The zip's own record of the uncompressed size can lie too: DEFLATE expands at most 1032:1."""
    labels = np.arange(18) % 3
    path = _write_members(tmp_path / "lie.npz", {"x_train": _npy_bytes(_images(18)), "y_train": _npy_bytes(labels),
                                                 "x_test": _npy_bytes(_images(6)),
                                                 "y_test": _npy_bytes(np.arange(6) % 3)}, zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    record = _central_record(raw, "y_train.npy")
    raw[record + 24:record + 28] = (2 ** 32 - 1).to_bytes(4, "little")  # its uncompressed size
    path.write_bytes(bytes(raw))
    with pytest.raises(DaqkdError, match="cannot read y_train .*more than DEFLATE can expand to"):
        load_array_archive(path, "train")


def test_a_compressed_member_with_a_bad_crc_is_refused(tmp_path: Path) -> None:
    images = _images(18)
    images[-1, -1, -1, -1] = 7
    members = {"x_train": _npy_bytes(images), "y_train": _npy_bytes(np.arange(18) % 3),
               "x_test": _npy_bytes(_images(6)), "y_test": _npy_bytes(np.arange(6) % 3)}
    path = _write_members(tmp_path / "crc.npz", members, zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x_train.npy")
    raw = bytearray(path.read_bytes())
    for record in (info.header_offset + 14, _central_record(raw, "x_train.npy") + 16):
        raw[record:record + 4] = (info.CRC ^ 1).to_bytes(4, "little")  # local and central CRC both wrong
    path.write_bytes(bytes(raw))
    for limit in (None, 1):  # streamed to the end either way, so the check is made
        with pytest.raises(DaqkdError, match="cannot read x_train .*Bad CRC-32"):
            load_array_archive(path, "train", limit)


def test_gray_images_keras_label_shape_and_default_class_names(tmp_path: Path) -> None:
    gray = np.arange(4 * 5 * 5, dtype=np.uint8).reshape(4, 5, 5)
    labels = np.array([[0], [1], [1], [0]], dtype=np.uint8)  # keras.datasets stores (N, 1)
    np.savez(tmp_path / "g.npz", x_train=gray, y_train=labels, x_test=gray[:2], y_test=labels[:2])
    data = load_array_archive(tmp_path / "g.npz", "train")
    assert data.classes == ["0", "1"] and data.labels.tolist() == [0, 1, 1, 0]
    assert data.images.shape == (4, 3, 5, 5)
    for channel in range(3):
        assert torch.equal(data.images[:, channel], torch.from_numpy(gray))


def _images(count: int, size: int = 8) -> np.ndarray:
    return np.zeros((count, size, size, 3), dtype=np.uint8)


BAD_ARCHIVES = [
    ({"x_test": None}, "has no key x_test"),
    ({"y_train": None}, "has no key y_train"),
    ({"x_train": np.zeros((18, 8, 8, 3), dtype=np.float32)}, "x_train has dtype float32"),
    ({"x_train": np.zeros((18, 3, 8, 8), dtype=np.uint8)}, "x_train has shape (18, 3, 8, 8), channels first"),
    ({"x_test": np.zeros((6, 8, 8, 4), dtype=np.uint8)}, "x_test has shape (6, 8, 8, 4)"),
    ({"x_test": _images(5)}, "x_test holds 5 images but y_test has 6 labels"),
    ({"x_train": np.zeros((18, 0, 0, 3), dtype=np.uint8)}, "x_train has shape (18, 0, 0, 3): images of zero height"),
    ({"x_test": np.zeros((6, 8, 0), dtype=np.uint8)}, "x_test has shape (6, 8, 0): images of zero height"),
    ({"y_train": np.arange(18) % 3 + 0.0}, "y_train has dtype float64"),
    ({"y_train": np.zeros((18, 2), dtype=np.int64)}, "y_train has shape (18, 2)"),
    ({"y_test": np.array([0, 1, 2, 3, 0, 1])}, "y_test has label 3 but there are 3 classes"),
    ({"y_test": np.array([0, 1, 2, -1, 0, 1])}, "y_test has label -1"),
    ({"y_train": np.arange(18) % 3 - 1}, "y_train has label -1"),
    ({"classes": np.array(["a", "b"])}, "y_train has label 2 but there are 2 classes"),
    ({"classes": np.array(["a", "b", "c", "d"])}, "y_train has no images of class 3 (d)"),
    ({"y_train": np.arange(18) % 3 * 2, "classes": None}, "y_train has no images of class 1 (1)"),
    ({"classes": np.array(["a", "a", "b"])}, "classes names 'a' twice"),
    ({"classes": np.array([1, 2, 3])}, "classes has shape (3,) and dtype int64"),
    ({"classes": np.array(["a", None, "c"], dtype=object)}, "classes is an array of Python objects"),
    ({"y_test": np.array([0, 1, 2, 0, 1, 2], dtype=object)}, "y_test is an array of Python objects"),
]


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("overrides,message", BAD_ARCHIVES, ids=[m for _, m in BAD_ARCHIVES])
def test_bad_archives_end_in_one_line_naming_the_key(overrides: dict, message: str, compressed: bool, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    archive = make_archive(tmp_path / "bad.npz", compressed=compressed, **overrides)
    split = "test" if any("test" in k for k in overrides) else "train"
    assert main(["eval", str(tmp_path / "no-such-run"), "--data", str(archive), "--split", split]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("daqkd: error: ") and message in err[0], err


def test_files_that_are_not_archives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 torn")
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, _images(2))
    cases = [(tmp_path / "junk.npz", "cannot read"), (tmp_path / "single.npz", "holds a single array"),
             (tmp_path / "missing.npz", "does not exist")]
    for path, message in cases:
        assert main(["eval", str(tmp_path / "run"), "--data", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_bytes_that_are_no_archive_are_named_so_without_unpickling_advice(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"garbage bytes here")
    assert main(["rank", "--data", str(garbage), "--weights", str(tmp_path / "w.th"), "--arch", "resnet20"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"daqkd: error: {garbage} is not a NumPy archive (neither a .npz zip file nor a .npy array): "
                   "write it with np.savez or np.savez_compressed")


def test_a_uint64_label_beyond_int64_is_reported_as_itself(tmp_path: Path) -> None:
    labels = np.array([0, 1, 2, 0, 1, 2 ** 63] * 3, dtype=np.uint64)
    archive = make_archive(tmp_path / "d.npz", y_train=labels)
    with pytest.raises(DaqkdError, match=f"y_train has label {2 ** 63}: labels are class indices 0..K-1"):
        load_array_archive(archive, "train")
