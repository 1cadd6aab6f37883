"""The shared CIFAR-100 archive and its published option-B ResNet-56 (../shared).

The 167 MB archive is read once per test session (both splits, 300 images of each kept); the
command-line tests get those copies instead of reading it again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from daqkd.checkpoint import read_checkpoint
from daqkd.cli import main
from daqkd.data import ImageSet, load_array_archive
from daqkd.loading import load_model
from daqkd.models import create_model
from daqkd.train import evaluate

from .conftest import SHARED

ARCHIVE = SHARED / "data" / "cifar100" / "cifar100.npz"
RESNET56 = SHARED / "weights" / "cifar100" / "resnet56-f2eff4c8.pt"
PUBLISHED = ["--arch", "resnet56b", "--normalize", "cifar100-chenyaofo"]


LIMIT = 3


@pytest.fixture(scope="session")
def cifar100() -> dict[str, ImageSet]:
    assert ARCHIVE.is_file() and RESNET56.is_file(), f"tests need {ARCHIVE} and {RESNET56}"
    return {split: load_array_archive(ARCHIVE, split, limit_per_class=LIMIT) for split in ("train", "test")}


@pytest.fixture
def cifar100_test(cifar100: dict[str, ImageSet]) -> ImageSet:
    return cifar100["test"]


def test_archive_is_cifar100(cifar100_test: ImageSet) -> None:
    data = cifar100_test
    assert len(data) == 300 and data.images.shape == (300, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.num_classes == 100 and data.classes[:3] == ["apple", "aquarium_fish", "baby"]
    assert data.labels.tolist() == [k for k in range(100) for _ in range(3)]  # sorted by class


def test_published_resnet56_loads_strictly_and_matches_a_naive_forward(cifar100_test: ImageSet) -> None:
    state, meta = read_checkpoint(RESNET56)
    assert meta == {} and state["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    model, info = load_model(RESNET56, arch="resnet56b", normalize="cifar100-chenyaofo", num_classes=100)
    assert info["foreign"] and sum(p.numel() for p in model.parameters()) == 861_620  # 0.86 M, as published
    got = evaluate(model, cifar100_test, torch.device("cpu"))
    bare = create_model("resnet56b", 100).eval()
    bare.load_state_dict(state)  # strict
    mean = torch.tensor([0.5070, 0.4865, 0.4409]).view(1, 3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2761]).view(1, 3, 1, 1)
    with torch.no_grad():
        predicted = bare((cifar100_test.images.float() / 255 - mean) / std).argmax(1)
    correct = int((predicted == cifar100_test.labels).sum())
    assert got["top1"] == pytest.approx(100 * correct / 300)
    # 72.63 % on all 10,000 test images (README); 300 images leave a binomial SE of ~2.6 points
    assert 60 < got["top1"] < 85


def test_eval_and_rank_on_the_archive(tmp_path: Path, cifar100: dict[str, ImageSet], monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import daqkd.data

    def session_copy(path: str, split: str, limit_per_class: int | None) -> ImageSet:
        assert (Path(path), limit_per_class) == (ARCHIVE, LIMIT)
        return cifar100[split]

    monkeypatch.setattr(daqkd.data, "load_array_archive", session_copy)
    data = ["--data", str(ARCHIVE), "--limit-per-class", str(LIMIT)]
    assert main(["eval", str(RESNET56), *PUBLISHED, *data, "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["images"] == 300 and report["data"] == f"{ARCHIVE}:test" and len(report["per_class_top1"]) == 100
    assert main(["rank", "--weights", str(RESNET56), *PUBLISHED, *data, "--augs", "none,none+cutmix",
                 "--no-progress", "--out", str(tmp_path / "r.json")]) == 0
    ranking = json.loads((tmp_path / "r.json").read_text())
    assert ranking["images"] == 300 and ranking["data"] == f"{ARCHIVE}:train"
    accuracy = {c["name"]: c["accuracy"] for c in ranking["candidates"]}
    assert accuracy["none"] > 0.9 > accuracy["none+cutmix"]  # the teacher fits its own train split
    printed = capsys.readouterr().out
    assert "300 train images, 100 classes" in printed
