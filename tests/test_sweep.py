"""daqkd sweep: the analysis on hand-made results, and the command end to end (resumable)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from scipy import stats

from daqkd.cli import main
from daqkd.sweep import analyze, correlation, report_markdown


def fake_ranking(scores: dict[str, float], variances: dict[str, float]) -> dict:
    names = sorted(scores, key=scores.get)
    by_var = sorted(variances, key=variances.get)
    return {"candidates": [
        {"name": n, "rank": names.index(n) + 1, "variance_rank": by_var.index(n) + 1, "score": scores[n],
         "variance": variances[n], "cmi": 0.1, "centroid_ce": scores[n] + 0.1, "accuracy": 0.9} for n in names]}


def test_analysis_picks_and_correlations() -> None:
    scores = {"none+cutmix": 0.5, "augmix+cutmix": 0.3, "randaugment+cutmix": 0.1, "trivialaugment+cutmix": 0.2}
    variances = {"none+cutmix": 0.01, "augmix+cutmix": 0.02, "randaugment+cutmix": 0.04, "trivialaugment+cutmix": 0.03}
    top1 = {"none+cutmix": 60.0, "augmix+cutmix": 62.0, "randaugment+cutmix": 65.0, "trivialaugment+cutmix": 64.0}
    runs = [{"aug": n, "seed": s, "top1": a + s, "best_top1": a + s + 1} for n, a in top1.items() for s in (0, 1)]
    result = analyze(fake_ranking(scores, variances), runs, list(scores))
    s = result["summary"]
    assert (s["metric_pick"], s["variance_pick"]) == ("randaugment+cutmix", "none+cutmix")
    assert s["metric_pick_top1"] == pytest.approx(65.5)  # mean of seeds 0 and 1
    assert (s["best"], s["worst"], s["none"]) == ("randaugment+cutmix", "none+cutmix", "none+cutmix")
    # score ordering is exactly the accuracy ordering reversed; variance is exactly aligned with it
    assert s["metric_correlation"]["spearman"] == pytest.approx(-1.0)
    assert s["metric_correlation"]["kendall"] == pytest.approx(-1.0)
    assert s["variance_correlation"]["spearman"] == pytest.approx(1.0)
    rows = result["candidates"]
    assert [r["name"] for r in rows] == ["randaugment+cutmix", "trivialaugment+cutmix", "augmix+cutmix", "none+cutmix"]
    assert rows[0]["top1_std"] == pytest.approx(0.7071, abs=1e-4)
    text = report_markdown(result, {"title": "t", "runs_finished": 8, "runs_total": 8, "train_seconds": 3600,
                                    "device": "cpu", "command": "daqkd sweep"})
    assert "| metric's pick | randaugment+cutmix | 65.50% |" in text


def test_correlation_equals_scipy_and_needs_three_points() -> None:
    x, y = [0.3, 0.1, 0.4, 0.2, 0.5], [61.0, 64.0, 60.5, 62.0, 63.0]
    corr = correlation(x, y)
    assert corr.spearman == pytest.approx(stats.spearmanr(x, y).statistic)
    assert corr.kendall_p == pytest.approx(stats.kendalltau(x, y).pvalue)
    assert correlation([0.1, 0.2], [1.0, 2.0]) is None


def train_tiny_teacher(tmp_path: Path, folder: Path) -> tuple[list[str], Path]:
    """(the data options, the run directory) of a 1-epoch ResNet-20 teacher on ``folder``."""
    data = ["--data", str(folder), "--seed", "0"]
    teacher = tmp_path / "teacher"
    assert main(["teacher", *data, "--arch", "resnet20", "--epochs", "1", "--batch-size", "12",
                 "--out", str(teacher), "--no-progress"]) == 0
    return data, teacher


def test_sweep_end_to_end_and_resumes(tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, teacher = train_tiny_teacher(tmp_path, tiny_folder)
    sweep = tmp_path / "sweep"
    args = ["sweep", *data, "--teacher", str(teacher), "--method", "ewgs", "--w-bits", "3", "--a-bits", "3",
            "--kd", "kd", "--augs", "none+cutmix,randaugment+cutmix,augmix", "--epochs", "1",
            "--batch-size", "12", "--out", str(sweep), "--no-progress"]
    assert main(args) == 0
    results = json.loads((sweep / "results.json").read_text())
    assert len(results["runs"]) == 3 and {r["aug"] for r in results["runs"]} == {"none+cutmix", "randaugment+cutmix", "augmix"}
    s = results["summary"]
    assert s["metric_pick"] == next(c["name"] for c in results["ranking"]["candidates"] if c["rank"] == 1)
    assert s["metric_correlation"]["n"] == 3
    assert (sweep / "scatter.png").stat().st_size > 10_000
    assert "## Picks" in (sweep / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (sweep / "runs").glob("*/model.safetensors")}
    capsys.readouterr()

    # a second seed: the finished runs are not repeated
    assert main([*args, "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("-- ") == 3 and "seed1" in printed and "none+cutmix-seed0" not in printed
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    results = json.loads((sweep / "results.json").read_text())
    assert len(results["runs"]) == 6
    assert all(len(r["seeds"]) == 2 for r in results["candidates"])

    # a fresh checkout of a committed sweep: metrics only, one run cut off without its resume state
    for path in (sweep / "runs").glob("*/*"):
        if path.name not in ("metrics.jsonl", "config.json"):
            path.unlink() if path.is_file() else None
    cut = sweep / "runs" / "augmix-seed1" / "metrics.jsonl"
    cut.write_text("")
    assert main([*args, "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("-- ") == 1 and "augmix-seed1" in printed
    assert len(cut.read_text().splitlines()) == 1  # trained afresh, not appended to

    # another candidate list cannot reuse the stored ranking
    assert main([*args[:-7], "--augs", "none", "--epochs", "1", "--batch-size", "12", "--out", str(sweep),
                 "--no-progress"]) == 2
    assert "ranks other candidates" in capsys.readouterr().err


def test_sweep_jobs_trains_in_parallel_processes_with_the_same_results(tmp_path: Path, tiny_folder: Path) -> None:
    data, teacher = train_tiny_teacher(tmp_path, tiny_folder)
    common = ["sweep", *data, "--teacher", str(teacher), "--w-bits", "3", "--a-bits", "3", "--augs", "none,augmix",
              "--epochs", "2", "--batch-size", "12", "--no-progress"]
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // 2))  # what each of 2 workers gets: the same float sums
    try:
        assert main([*common, "--out", str(tmp_path / "serial")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*common, "--jobs", "2", "--out", str(tmp_path / "parallel")]) == 0
    serial, parallel = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("serial", "parallel"))
    by_aug = {r["aug"]: r for r in parallel["runs"]}
    for run in serial["runs"]:
        assert by_aug[run["aug"]]["top1"] == run["top1"]
        history = [json.loads(line) for line in (tmp_path / "parallel" / run["run"] / "metrics.jsonl").open()]
        reference = [json.loads(line) for line in (tmp_path / "serial" / run["run"] / "metrics.jsonl").open()]
        assert [h["train_loss"] for h in history] == [h["train_loss"] for h in reference]
        assert "epoch 2/2" in (tmp_path / "parallel" / run["run"] / "train.log").read_text()
    assert main([*common, "--jobs", "0", "--out", str(tmp_path / "zero")]) == 2


def test_sweep_jobs_names_the_failed_run(tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, teacher = train_tiny_teacher(tmp_path, tiny_folder)
    capsys.readouterr()
    assert main(["sweep", *data, "--teacher", str(teacher), "--augs", "none,augmix", "--epochs", "1",
                 "--batch-size", "12", "--lr", "1e30", "--jobs", "2", "--out", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "-seed0 failed (DaqkdError: the loss became" in err and "train.log" in err


def test_scatter_labels_do_not_overlap_and_stay_inside() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from daqkd.sweep import place_labels

    # two ties in accuracy close in score, and a point at the right edge (the H200 sweep's case)
    points = [("randomerasing+cutmix", 0.41, 85.34), ("randaugment+cutmix", 0.46, 85.34),
              ("autoaugment-cifar10+cutmix", 0.49, 85.24), ("autoaugment-svhn+cutmix", 0.66, 85.15),
              ("none+cutmix", 0.25, 85.55)]
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=130)
    ax.plot([p[1] for p in points], [p[2] for p in points], "o")
    fig.tight_layout()
    ax.autoscale_view()
    place_labels(fig, ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    frame = ax.get_window_extent(renderer)
    plt.close(fig)
    assert sorted(t.get_text() for t in ax.texts) == sorted(p[0] for p in points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)
