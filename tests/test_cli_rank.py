"""`daqkd rank` end to end: tiny synthetic data, real CIFAR-10 images, and every bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from daqkd.checkpoint import save_checkpoint
from daqkd.cli import main
from daqkd.data import load_image_folder
from daqkd.models import NormalizedModel, create_model, parse_normalization

CANDIDATE_KEYS = {"name", "rank", "score", "centroid_ce", "cmi", "ce", "sample_score", "variance", "variance_se",
                  "variance_groups", "variance_rank", "accuracy", "images_per_s"}


@pytest.fixture
def tiny_teacher(tmp_path: Path, tiny_folder: Path) -> Path:
    """A random ResNet-20 whose BatchNorm statistics come from the tiny data, so that its
    predictions are soft and differ between images (a fresh model's are near one-hot)."""
    torch.manual_seed(0)
    model = create_model("resnet20", 3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    wrapped = NormalizedModel(model, parse_normalization("cifar10")).train()
    with torch.no_grad():
        wrapped(load_image_folder(tiny_folder).images)
    path = tmp_path / "teacher.safetensors"
    save_checkpoint(path, model, {"arch": "resnet20", "normalize": "cifar10"})
    return path


def run_rank(args: list[str], out: Path) -> dict:
    assert main(["rank", *args, "--no-progress", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_rank_end_to_end_on_tiny_folder(tiny_folder: Path, tiny_teacher: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--data", str(tiny_folder), "--weights", str(tiny_teacher),
            "--augs", "identity,none,autoaugment-cifar10+cutmix,augmix", "--batch-size", "8", "--seed", "3"]
    report = run_rank(args, tmp_path / "a.json")
    printed = capsys.readouterr().out
    assert report["split"] == "train" and report["images"] == 36
    assert [c["rank"] for c in report["candidates"]] == [1, 2, 3, 4]
    assert report["selected"] == report["candidates"][0]["name"]
    scores = [c["score"] for c in report["candidates"]]
    assert scores == sorted(scores)
    for c in report["candidates"]:
        assert CANDIDATE_KEYS <= set(c)
        assert c["score"] == pytest.approx(c["centroid_ce"] - c["cmi"])
        assert c["sample_score"] == pytest.approx(c["ce"] - c["cmi"])
        assert c["cmi"] >= 0 and 0 <= c["accuracy"] <= 1
        assert c["variance_groups"] == 12  # 36 images: groups of 36 // 10 = 3 (2 groups of 1,000 do not fit)
        assert c["variance_se"] == pytest.approx(c["variance"] / math.sqrt(2 * 11))
        assert "authors_score" not in c  # a second pass only when asked
        assert c["name"] in printed
    assert sorted(c["variance_rank"] for c in report["candidates"]) == [1, 2, 3, 4]
    assert f"selected: {report['selected']}" in printed
    # the controls: what teacher accuracy, centroid CE, CMI, sample score and variance would pick
    picks = report["controls"]["picks"]
    by_name = {c["name"]: c for c in report["candidates"]}
    assert picks["score"] == report["selected"]
    assert picks["teacher_accuracy"] == max(report["candidates"], key=lambda c: c["accuracy"])["name"]
    assert picks["cmi"] == max(report["candidates"], key=lambda c: c["cmi"])["name"]
    assert by_name[picks["variance"]]["variance_rank"] == 1
    assert (
        f"controls pick: teacher accuracy {picks['teacher_accuracy']}, centroid CE alone {picks['centroid_ce']}"
        in printed
    )
    rho = report["controls"]["score_vs_teacher_accuracy_spearman"]
    assert -1 <= rho <= 1 and f"Spearman(score, teacher accuracy) {rho:+.2f}" in printed

    again = run_rank(args, tmp_path / "b.json")  # same seed, same numbers
    strip = lambda r: [{k: v for k, v in c.items() if k not in ("images_per_s", "seconds")} for c in r["candidates"]]
    assert strip(again) == strip(report)
    other = run_rank([*args[:-1], "4"], tmp_path / "c.json")
    by_name = {c["name"]: c for c in other["candidates"]}
    assert by_name["augmix"]["cmi"] != next(c for c in report["candidates"] if c["name"] == "augmix")["cmi"]


def test_rank_options_repeats_sample_score_paired(tiny_folder: Path, tiny_teacher: Path, tmp_path: Path) -> None:
    report = run_rank(["--data", str(tiny_folder), "--weights", str(tiny_teacher), "--augs", "none,randaugment",
                       "--repeats", "3", "--score", "sample", "--cmi-weight", "0.5", "--variance-paired",
                       "--variance-group", "6", "--split", "test", "--limit-per-class", "6"], tmp_path / "r.json")
    assert report["images"] == 18 and report["split"] == "test" and report["variance_group"] == 6
    for c in report["candidates"]:
        assert c["score"] == pytest.approx(c["ce"] - 0.5 * c["cmi"])
        assert c["score_se"] > 0 and c["cmi_se"] > 0  # three passes with fresh draws differ
        assert c["variance"] > 0 and c["variance_se"] >= 0  # 18 images: three paired groups of 6


def test_rank_authors_variant_and_wang_variance_protocol(tiny_folder: Path, tiny_teacher: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--data", str(tiny_folder), "--weights", str(tiny_teacher), "--augs", "none,augmix+cutmix", "--seed", "1"]
    plain = run_rank(base, tmp_path / "plain.json")
    capsys.readouterr()
    both = run_rank([*base, "--controls", "all"], tmp_path / "all.json")
    assert "2 pass(es)" in capsys.readouterr().out
    for c, p in zip(both["candidates"], plain["candidates"]):
        # the scored pass is the same draw; the authors' centroids come from a pass with fresh draws
        assert (c["name"], c["score"], c["cmi"], c["variance"]) == (p["name"], p["score"], p["cmi"], p["variance"])
        assert c["authors_score"] == pytest.approx(c["ce"] - c["authors_cmi"])
        assert c["authors_cmi"] != pytest.approx(c["cmi"])
    authors = run_rank([*base, "--score", "authors"], tmp_path / "authors.json")
    assert [c["score"] for c in authors["candidates"]] == sorted(c["authors_score"] for c in both["candidates"])
    wang = run_rank([*base, "--variance-protocol", "wang"], tmp_path / "wang.json")
    for c, p in zip(wang["candidates"], plain["candidates"]):
        assert c["variance_groups"] >= 1000  # 12 groups of 3 per pass: 84 passes with fresh draws
        assert c["score"] == p["score"] and c["variance"] != p["variance"]
        assert c["variance_se"] == pytest.approx(c["variance"] / math.sqrt(2 * (c["variance_groups"] - 1)))
    assert wang["config"]["variance_protocol"] == "wang"
    # images_per_s counts every pass: 1 plain, 2 with the authors' centroid pass, 84 under wang
    wang_passes = math.ceil(1000 / plain["candidates"][0]["variance_groups"])
    for report, passes in ((plain, 1), (both, 2), (wang, wang_passes)):
        for c in report["candidates"]:
            assert c["images_per_s"] * c["seconds"] == pytest.approx(report["images"] * passes)


def test_identity_accuracy_matches_plain_evaluation(shared_cifar10: Path, shared_resnet20: Path,
                                                   tmp_path: Path) -> None:
    report = run_rank(["--data", str(shared_cifar10), "--arch", "resnet20", "--weights", str(shared_resnet20),
                       "--normalize", "imagenet", "--augs", "identity,none", "--limit-per-class", "20"],
                      tmp_path / "cifar.json")
    identity = next(c for c in report["candidates"] if c["name"] == "identity")
    # plain evaluation: PIL decode, ToTensor, Normalize, model, argmax
    model = create_model("resnet20", 10)
    state = torch.load(shared_resnet20, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    to_input = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    classes = sorted(p.name for p in (shared_cifar10 / "train").iterdir())
    correct = 0
    for label, name in enumerate(classes):
        files = sorted((shared_cifar10 / "train" / name).iterdir())[:20]
        batch = torch.stack([to_input(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            correct += int((model(batch).argmax(1) == label).sum())
    assert report["images"] == 200
    assert identity["accuracy"] == pytest.approx(correct / 200, abs=1e-12)
    assert identity["accuracy"] > 0.7  # the published weights work on these images


@pytest.mark.parametrize("extra,message", [
    (["--augs", "none,autoaugment"], "unknown augmentation 'autoaugment'"),
    (["--arch", "resnet21"], "is a resnet20 checkpoint, not --arch resnet21"),
    (["--normalize", "imagenett"], "bad --normalize"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--mix-group", "-1"], "--mix-group must be at least 0"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_bad_inputs_give_one_clear_line(tiny_folder: Path, tiny_teacher: Path, extra: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    args = ["rank", "--data", str(tiny_folder), "--weights", str(tiny_teacher), "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("daqkd: error: ") and message in err[0]


def test_console_script_errors_without_traceback(tmp_path: Path, shared_resnet20: Path, tiny_folder: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cases = [
        (["--data", str(tmp_path / "missing"), "--arch", "resnet20", "--normalize", "imagenet"], "does not exist"),
        (["--data", str(tiny_folder), "--arch", "resnet20", "--normalize", "imagenet"],
         "has 10 classes but the data has 3"),
    ]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, "-m", "daqkd.cli", "rank", "--weights", str(shared_resnet20), *extra],
                              capture_output=True, text=True, env=env, timeout=120, check=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr
