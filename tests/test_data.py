"""Loading ImageFolders and torchvision data sets, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from daqkd.data import limit_indices, load_data, load_image_folder
from daqkd.errors import DaqkdError

from .conftest import make_image_folder


def test_image_folder_layout_labels_and_limit(tiny_folder: Path) -> None:
    data = load_image_folder(tiny_folder, "train")
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert isinstance(data.images, torch.Tensor) and data.images.shape == (36, 3, 32, 32)
    assert data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    limited = load_image_folder(tiny_folder, "test", limit_per_class=5)
    assert limited.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # the first 5 files of each class in sorted order
    assert torch.equal(limited.images[5:10], load_image_folder(tiny_folder, "test").images[12:17])


def test_limit_indices_keeps_order() -> None:
    assert limit_indices([2, 0, 2, 1, 2, 0], 1) == [0, 1, 3]
    assert limit_indices([2, 0], None) == [0, 1]
    with pytest.raises(DaqkdError, match="at least 1"):
        limit_indices([0], 0)


def test_a_few_odd_sizes_are_resized_with_a_warning_and_mixed_sets_stay_lists(tmp_path: Path) -> None:
    """One stray image must not send a 32x32 set down the 224-pixel RandomResizedCrop path."""
    from daqkd.data import DataWarning

    root = make_image_folder(tmp_path / "a", classes=2, per_class=3, splits=("train",))
    stray = torch.arange(3 * 40 * 50).remainder(256).to(torch.uint8).view(3, 40, 50)
    write_png(stray, str(root / "train" / "class_1" / "zz_big.png"))
    with pytest.warns(DataWarning, match=r"1 of 7 images in .* are not 32x32 .*\(40, 50\).*resized to 32x32"):
        data = load_image_folder(root)
    assert isinstance(data.images, torch.Tensor) and data.images.shape == (7, 3, 32, 32)
    from torchvision.transforms.v2 import functional as TF

    assert torch.equal(data.images[-1], TF.resize(stray, [32, 32], antialias=True))
    mixed = tmp_path / "m" / "train" / "c"
    mixed.mkdir(parents=True)
    for i, size in enumerate(((100, 80), (90, 120), (100, 80), (70, 70))):  # no majority size: large-image path
        write_png(torch.zeros(3, *size, dtype=torch.uint8), str(mixed / f"{i}.png"))
    assert isinstance(load_image_folder(tmp_path / "m").images, list)


def test_missing_and_malformed_folders(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(DaqkdError, match="does not exist"):
        load_data(str(tmp_path / "nowhere"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DaqkdError, match="no train/ folder"):
        load_data(str(tmp_path / "empty"), None)
    (tiny_folder / "test" / "class_9").mkdir()
    with pytest.raises(DaqkdError, match="same class folders"):
        load_data(str(tiny_folder), None, "test")
    with pytest.raises(DaqkdError, match="exactly one of --data"):
        load_data(None, None)


def test_corrupt_image_names_the_file(tiny_folder: Path) -> None:
    bad = tiny_folder / "train" / "class_1" / "img_005.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DaqkdError, match=r"cannot decode image .*img_005\.png.*replace or delete"):
        load_data(str(tiny_folder), None)


def test_download_without_network_names_data_option(tmp_path: Path) -> None:
    with pytest.raises(DaqkdError, match="--data DIR"):
        load_data(None, "cifar10", download_root=tmp_path)


def test_a_file_as_data_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "images.txt").write_text("x")
    with pytest.raises(DaqkdError, match="is a file: pass an ImageFolder directory .* or a .npz archive"):
        load_data(str(tmp_path / "images.txt"), None)
