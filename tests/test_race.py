"""Validation split and racing selection (`--val-per-class`, `daqkd sweep --race`, `train --aug race`)."""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from daqkd.cli import main
from daqkd.data import ImageSet, split_validation
from daqkd.errors import DaqkdError
from daqkd.race import parse_keep, rung_epochs, survivors, tie_margin

from .conftest import threads_of_two_workers
from .test_sweep import train_tiny_teacher


def labelled_set(per_class: list[int]) -> ImageSet:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(per_class)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    return ImageSet(images, labels, [f"c{k}" for k in range(len(per_class))], "hand-made")


def test_validation_split_is_disjoint_per_class_and_fixed_by_its_seed() -> None:
    data = labelled_set([10, 7, 12])
    train, val = split_validation(data, 3, seed=0)
    ids_train, ids_val = train.images[:, 0, 0, 0].tolist(), val.images[:, 0, 0, 0].tolist()
    assert not set(ids_train) & set(ids_val) and sorted(ids_train + ids_val) == list(range(29))
    assert torch.bincount(val.labels).tolist() == [3, 3, 3] and torch.bincount(train.labels).tolist() == [7, 4, 9]
    assert ids_train == sorted(ids_train) and ids_val == sorted(ids_val)  # the original order
    assert all(data.labels[i] == y for i, y in zip(ids_val, val.labels.tolist()))
    again, other = split_validation(data, 3, seed=0)[1], split_validation(data, 3, seed=1)[1]
    assert again.images[:, 0, 0, 0].tolist() == ids_val
    assert other.images[:, 0, 0, 0].tolist() != ids_val  # another draw (C(10,3) C(7,3) C(12,3) of them)
    # a data-limited run trains on the first K per class of what the validation split left
    limited, held = split_validation(data, 3, seed=0, train_limit_per_class=2)
    assert held.images[:, 0, 0, 0].tolist() == ids_val
    firsts = [[i for i, y in zip(ids_train, train.labels.tolist()) if y == k][:2] for k in range(3)]
    assert limited.images[:, 0, 0, 0].tolist() == sorted(i for first in firsts for i in first)
    with pytest.raises(DaqkdError, match="leaves class 'c1' .7 training images. nothing to train on: use at most 6"):
        split_validation(data, 7, seed=0)


def test_rungs_and_keep_by_hand() -> None:
    assert rung_epochs("1/9,1/3,1", 30) == [3, 10, 30]  # 3.33 -> 3: the nearest epoch
    assert rung_epochs("1/9,1/3,1", 9) == [1, 3, 9]
    assert rung_epochs("0.5,1", 3) == [2, 3]  # 1.5 rounds up
    assert parse_keep("1/3") == Fraction(1, 3) and parse_keep("0.25") == Fraction(1, 4)


def test_survivors_by_hand() -> None:
    standings = {"a": [70.0, 72.0], "b": [71.0, 71.0], "c": [60.0, 61.0], "d": [69.0, 69.5]}
    # pooled seed variance: (2 + 0 + 0.5 + 0.125) / 4 degrees of freedom; SE of a difference of two
    # means of 2 seeds: sqrt(0.65625) * sqrt(2 / 2)
    assert tie_margin(standings) == pytest.approx(math.sqrt(2.625 / 4))
    decision = survivors(standings, Fraction(1, 3), epoch=3)
    assert decision.kept == ["a", "b"] and decision.cutoff == 71.0  # ceil(4/3) = 2; a before b by name
    standings["d"] = [70.5, 70.5]  # 0.5 below the cutoff, within 0.81: a tie that goes on
    assert survivors(standings, Fraction(1, 3), epoch=3).kept == ["a", "b", "d"]
    one_seed = survivors({"x": [50.0], "y": [50.0], "z": [49.9]}, Fraction(1, 3), epoch=1)
    assert one_seed.tie_margin == 0 and one_seed.kept == ["x", "y"]  # only exact ties with one seed


def permuted_test_labels(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose test images sit in the wrong class folders (class k's under k+1)."""
    shutil.copytree(source / "train", target / "train")
    classes = sorted(p.name for p in (source / "test").iterdir())
    for k, name in enumerate(classes):
        shutil.copytree(source / "test" / name, target / "test" / classes[(k + 1) % len(classes)])
    return target


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_race_decides_on_validation_alone_and_its_winner_equals_a_straight_run(
        tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, teacher = train_tiny_teacher(tmp_path, tiny_folder)
    common = ["--teacher", str(teacher), "--w-bits", "3", "--a-bits", "3", "--epochs", "3", "--batch-size", "12",
              "--val-per-class", "3", "--no-progress"]
    race_args = ["sweep", *common, "--augs", "none+cutmix,augmix", "--race", "--rungs", "1/3,2/3,1", "--keep", "1/3",
                 "--seed", "0"]
    out = tmp_path / "race"
    assert main([*race_args, "--data", str(tiny_folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "race.json").read_text())
    assert [r["epoch"] for r in report["rungs"]] == [1, 2, 3] and report["finished"]
    assert sorted(r["aug"] for r in report["rungs"][0]["standings"]) == ["augmix", "none", "none+cutmix"]
    # each rung's decision is survivors() of the validation figures the runs logged at that epoch
    alive = ["augmix", "none", "none+cutmix"]
    for rung, share in zip(report["rungs"], (Fraction(1, 3), Fraction(1, 3), None)):
        standings = {aug: [next(h["val_top1"] for h in read_jsonl(out / "runs" / f"{aug}-seed0" / "metrics.jsonl")
                                if h["epoch"] == rung["epoch"])] for aug in alive}
        expected = survivors(standings, share or Fraction(1, len(alive)), rung["epoch"]).kept
        assert rung["kept"] == expected and {r["aug"] for r in rung["standings"]} == set(alive)
        alive = expected
    winner = report["winner"]["aug"]
    assert winner == report["rungs"][-1]["kept"][0] and f"race winner {winner}" in printed
    # a run stops at the rung it lost: its log ends there, and the cost counts exactly those epochs
    reached = {run.name: read_jsonl(run / "metrics.jsonl")[-1]["epoch"] for run in (out / "runs").iterdir()}
    cost = report["cost"]
    assert cost["student_epochs"] == sum(reached.values()) and cost["full_sweep_student_epochs"] == 9
    assert reached[f"{winner}-seed0"] == 3 and max(reached.values()) == 3
    # every student held out the same images: the sweep's seed drew them
    for run in (out / "runs").iterdir():
        stored = json.loads((run / "config.json").read_text())["args"]
        assert (stored["val_per_class"], stored["val_seed"]) == (3, 0)

    # the winner resumed at every rung ends bit-identical to the same student trained straight through
    # (tested only at its end, where the race's extra evaluations at the rungs cannot have touched it)
    straight = tmp_path / "straight"
    assert main(["train", *common, "--data", str(tiny_folder), "--aug", winner, "--eval-every", "3", "--val-seed", "0",
                 "--out", str(straight)]) == 0
    raced = load_file(out / "runs" / f"{winner}-seed0" / "last.safetensors")
    alone = load_file(straight / "last.safetensors")
    assert raced.keys() == alone.keys() and all(torch.equal(raced[k], alone[k]) for k in raced)
    last = read_jsonl(straight / "metrics.jsonl")[-1]
    raced_last = read_jsonl(out / "runs" / f"{winner}-seed0" / "metrics.jsonl")[-1]
    assert {k: v for k, v in last.items() if k not in ("seconds", "images_per_s")} == {
        k: v for k, v in raced_last.items() if k not in ("seconds", "images_per_s")}
    capsys.readouterr()

    # rerun: nothing is trained again, the same report
    assert main([*race_args, "--data", str(tiny_folder), "--out", str(out)]) == 0
    assert "-- " not in capsys.readouterr().out
    again = json.loads((out / "race.json").read_text())
    assert again["rungs"] == report["rungs"] and again["winner"] == report["winner"]
    # other race settings in the same --out: one line naming them
    assert main([*race_args[:-4], "--keep", "1/2", "--seed", "0", "--data", str(tiny_folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "keep '1/3' (now '1/2')" in err, err

    # wrong test labels change every test figure and no decision
    wrong = permuted_test_labels(tiny_folder, tmp_path / "wrong-test")
    assert main([*race_args, "--data", str(wrong), "--out", str(tmp_path / "race-wrong")]) == 0
    other = json.loads((tmp_path / "race-wrong" / "race.json").read_text())
    assert [r["kept"] for r in other["rungs"]] == [r["kept"] for r in report["rungs"]]
    assert [[s["val_top1"] for s in r["standings"]] for r in other["rungs"]] == [
        [s["val_top1"] for s in r["standings"]] for r in report["rungs"]]
    assert [[s["test_top1"] for s in r["standings"]] for r in other["rungs"]] != [
        [s["test_top1"] for s in r["standings"]] for r in report["rungs"]]


@pytest.mark.parametrize(("extra", "message"), [
    (["--race"], "--race decides on a validation split, never the test split: pass --val-per-class K"),
    (["--race", "--val-per-class", "2", "--shard", "0/2"], "--race compares every student at each rung"),
    (["--race", "--val-per-class", "2", "--report-only"], "--report-only rebuilds a full sweep's report"),
    (["--race", "--val-per-class", "2", "--rungs", "1/3,1/9,1"], "--rungs 1/3,1/9,1: the shares must increase"),
    (["--race", "--val-per-class", "2", "--rungs", "1/3,1/2"], "the last rung must be 1"),
    (["--race", "--val-per-class", "2", "--rungs", "1/3,x,1"], "--rungs: 'x' is not a fraction"),
    (["--race", "--val-per-class", "2", "--rungs", "0,1"], "--rungs: 0 is not in (0, 1]"),
    (["--race", "--val-per-class", "2", "--epochs", "3"], "1/9 and 1/3 of 3 epochs both fall on epoch 1"),
    (["--race", "--val-per-class", "2", "--keep", "1"], "--keep 1 keeps every DA at every rung"),
    (["--race", "--val-per-class", "2", "--keep", "3/2"], "--keep: 3/2 is not in (0, 1]"),
    (["--val-per-class", "0"], "--val-per-class must be at least 1, got 0"),
])
def test_bad_race_options_give_one_line_and_leave_nothing(tmp_path: Path, tiny_folder: Path,
                                                          capsys: pytest.CaptureFixture[str], extra: list[str],
                                                          message: str) -> None:
    out = tmp_path / "race"
    args = ["sweep", "--data", str(tiny_folder), "--teacher", str(tmp_path / "missing-teacher"), "--epochs", "9",
            "--augs", "none", "--out", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("daqkd: error:") and message in err, err
    assert not out.exists()


def test_train_aug_race_keeps_the_winners_run(tmp_path: Path, tiny_folder: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data, teacher = train_tiny_teacher(tmp_path, tiny_folder)
    out = tmp_path / "student"
    assert main(["train", *data, "--teacher", str(teacher), "--w-bits", "3", "--a-bits", "3", "--aug", "race",
                 "--augs", "augmix", "--rungs", "1/2,1", "--keep", "1/2", "--epochs", "2", "--batch-size", "12",
                 "--val-per-class", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "race" / "race.json").read_text())
    winner = report["winner"]["aug"]
    assert f"daqkd train --aug race: {winner} won" in printed and "best val top-1" in printed
    stored = json.loads((out / "config.json").read_text())["args"]
    assert stored["aug"] == winner and read_jsonl(out / "metrics.jsonl")[-1]["epoch"] == 2
    source = out / "race" / "runs" / f"{winner}-seed0"
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    # the kept run is an ordinary finished run: its options come back on --resume
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0


def test_train_aug_race_refuses_in_memory_data_instead_of_ignoring_it(tmp_path: Path, tiny_folder: Path) -> None:
    from daqkd.api import StudentOptions, train_student
    from daqkd.data import load_image_folder

    images = load_image_folder(tiny_folder, "train")
    options = StudentOptions(data=str(tiny_folder), teacher=str(tmp_path / "teacher"), aug="race",
                             out=str(tmp_path / "student"))
    with pytest.raises(DaqkdError, match=r"aug='race' reads its images from options.data .*pass data=None"):
        train_student(options, data=(images, images))
    assert not (tmp_path / "student").exists()


def test_a_race_with_jobs_decides_as_a_serial_one_and_resumes_a_cut_rung(tmp_path: Path, tiny_folder: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _, teacher = train_tiny_teacher(tmp_path, tiny_folder)
    common = ["sweep", "--data", str(tiny_folder), "--teacher", str(teacher), "--w-bits", "3", "--a-bits", "3",
              "--epochs", "2", "--batch-size", "12", "--val-per-class", "3", "--augs", "augmix,randaugment", "--race",
              "--rungs", "1/2,1", "--keep", "1/2", "--no-progress"]
    with threads_of_two_workers():
        assert main([*common, "--out", str(tmp_path / "serial")]) == 0
    assert main([*common, "--devices", "cpu,cpu:0", "--out", str(tmp_path / "parallel")]) == 0
    assert "2 at a time" in capsys.readouterr().out
    serial, parallel = (json.loads((tmp_path / d / "race.json").read_text()) for d in ("serial", "parallel"))
    assert parallel["rungs"] == serial["rungs"] and parallel["winner"] == serial["winner"]

    # a race cut off after its first rung (the winner's last epoch and the report lost) goes on from there
    winner = serial["winner"]["aug"]
    run = tmp_path / "parallel" / "runs" / f"{winner}-seed0"
    history = read_jsonl(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text(json.dumps(history[0]) + "\n")
    (run / "state.pt").unlink()  # and its resume state: it starts afresh, to the same figures
    (tmp_path / "parallel" / "race.json").unlink()
    with threads_of_two_workers():
        assert main([*common, "--out", str(tmp_path / "parallel")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("-- ") == 1 and f"-- {winner}-seed0 to epoch 2" in printed
    assert json.loads((tmp_path / "parallel" / "race.json").read_text())["rungs"] == serial["rungs"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--stop-at-epoch", "0"], "--stop-at-epoch must be an epoch of the schedule, 1 to --epochs 3, got 0"),
    (["--stop-at-epoch", "4"], "--stop-at-epoch must be an epoch of the schedule, 1 to --epochs 3, got 4"),
])
def test_a_stop_outside_the_schedule_is_one_line(tmp_path: Path, tiny_folder: Path,
                                                 capsys: pytest.CaptureFixture[str], extra: list[str],
                                                 message: str) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_folder), "--teacher", str(tmp_path / "t"), "--aug", "none",
                 "--epochs", "3", "--out", str(out), *extra]) == 2
    assert capsys.readouterr().err.strip() == f"daqkd: error: {message}" and not out.exists()
