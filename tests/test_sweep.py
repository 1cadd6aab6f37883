"""daqkd sweep: the analysis on hand-made results, and the command end to end (resumable)."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from scipy import stats

from daqkd.cli import main
from daqkd.sweep import analyze, correlation, report_markdown
from daqkd.sweep_runner import device_slots, parse_devices

from .conftest import threads_of_two_workers


def fake_ranking(scores: dict[str, float], variances: dict[str, float]) -> dict:
    """Teacher accuracy 1 - score: the score orders the DAs exactly as the teacher's accuracy does."""
    names = sorted(scores, key=scores.get)
    by_var = sorted(variances, key=variances.get)
    return {"images": 5000, "variance_group": 1000, "config": {"cmi_weight": 1.0, "score": "paper"}, "candidates": [
        {"name": n, "rank": names.index(n) + 1, "variance_rank": by_var.index(n) + 1, "score": scores[n],
         "variance": variances[n], "cmi": 0.1, "centroid_ce": scores[n] + 0.1, "ce": scores[n] + 0.3,
         "accuracy": 1 - scores[n]} for n in names]}


SCORES = {"none+cutmix": 0.5, "augmix+cutmix": 0.3, "randaugment+cutmix": 0.1, "trivialaugment+cutmix": 0.2}
VARIANCES = {"none+cutmix": 0.01, "augmix+cutmix": 0.02, "randaugment+cutmix": 0.04, "trivialaugment+cutmix": 0.03}
TOP1 = {  # final top-1 per seed 0, 1, 2; "none" is the default, not a candidate
    "none+cutmix": [60.0, 60.5, 61.0], "augmix+cutmix": [62.0, 62.0, 62.5],
    "randaugment+cutmix": [65.0, 65.5, 66.0], "trivialaugment+cutmix": [64.0, 63.5, 64.0], "none": [63.0, 63.0, 63.0],
}


def fake_runs(seeds: int) -> list[dict]:
    return [{"aug": n, "seed": s, "top1": a[s], "best_top1": a[s] + 1} for n, a in TOP1.items() for s in range(seeds)]


def test_analysis_controls_gains_and_verdict() -> None:
    result = analyze(fake_ranking(SCORES, VARIANCES), fake_runs(3), list(SCORES), default="none")
    s = result["summary"]
    assert (s["metric_pick"], s["variance_pick"], s["teacher_accuracy_pick"]) == (
        "randaugment+cutmix", "none+cutmix", "randaugment+cutmix")
    assert s["metric_pick_top1"] == pytest.approx(65.5)  # mean of seeds 0, 1, 2
    assert (s["best"], s["worst"], s["default"], s["default_top1"]) == (
        "randaugment+cutmix",
        "none+cutmix",
        "none",
        63.0,
    )
    # pick - default per seed: 2.0, 2.5, 3.0 -> mean 2.5, sd 0.5, half-width t(0.975, 2) 0.5 / sqrt(3) = 1.242069
    g = result["gain"]["pick_vs_default"]
    assert g["mean"] == pytest.approx(2.5) and g["seeds"] == 3
    assert g["ci95"] == [pytest.approx(2.5 - 1.242069, abs=1e-6), pytest.approx(2.5 + 1.242069, abs=1e-6)]
    # per-seed medians of the 4 candidates: 63.0, 62.75, 63.25 -> differences 2.0, 2.75, 2.75
    m = result["gain"]["pick_vs_median"]
    assert m["differences"] == pytest.approx([2.0, 2.75, 2.75])
    assert m["ci95"][0] == pytest.approx(2.5 - 1.0756633, abs=1e-6)
    # the score's order is exactly the accuracy order reversed: rho -1, exact p 2/4! for n = 4
    c = result["controls"]
    assert set(c) == {"score", "teacher_accuracy", "centroid_ce", "cmi", "sample_score", "variance"}
    assert c["score"]["spearman"] == pytest.approx(-1.0) and c["score"]["spearman_p_exact"] == pytest.approx(2 / 24)
    assert (
        c["teacher_accuracy"]["spearman"] == pytest.approx(1.0) and c["teacher_accuracy"]["direction"] == "as predicted"
    )
    assert c["variance"]["spearman"] == pytest.approx(1.0) and c["variance"]["direction"] == "opposite"
    assert math.isnan(c["cmi"]["spearman"]) and c["cmi"]["spearman_p"] == 1.0  # constant CMI ranks nothing
    assert result["score_vs_teacher_accuracy_spearman"] == pytest.approx(-1.0)
    # every seed orders the 5 DAs alike, ranks (1, 2, 5, 4, 3): R = (3, 6, 15, 12, 9), chi2 = 12 / (3 * 5 * 6)
    # * 495 - 3 * 3 * 6 = 12; of the (5!)^2 arrangements of seeds 1, 2 only this one is as extreme
    differ = result["das_differ"]
    assert (differ["statistic"], differ["df"], differ["p"], differ["das"], differ["seeds"]) == (
        pytest.approx(12.0), 4, pytest.approx(1 / 14400), 5, 3)
    assert differ["mean_span"] == pytest.approx(65.5 - 60.5)  # randaugment+cutmix vs none+cutmix
    assert differ["median_seed_sd"] == pytest.approx(stats.tstd([62.0, 62.0, 62.5]))  # sds 0.5, 0.29, 0.5, 0.29, 0
    assert result["warnings"] == []
    verdict = " ".join(result["verdict"])
    assert ("Friedman over 5 DAs (the default included) x 3 seeds: chi2 12.00 (4 df), p 6.94e-05 (exact permutation;"
            in verdict)
    assert "vs the default none: +2.50 points (95% CI [+1.26, +3.74], 3 seeds)" in verdict
    assert "is the same as the pick of teacher accuracy" in verdict and "cannot credit the metric" in verdict
    rows = result["candidates"]
    assert [r["name"] for r in rows] == ["randaugment+cutmix", "trivialaugment+cutmix", "augmix+cutmix",
                                         "none+cutmix", "none"]
    assert rows[-1]["candidate"] is False and rows[-1]["score"] is None
    assert rows[0]["top1_std"] == pytest.approx(0.5)
    assert rows[0]["variance_groups"] == 5 and rows[0]["variance_se"] == pytest.approx(0.04 / math.sqrt(8))
    text = report_markdown(result, {"title": "t", "runs_finished": 15, "runs_total": 15, "train_seconds": 3600,
                                    "device": "cpu", "command": "daqkd sweep"})
    assert "| metric's pick | randaugment+cutmix | 65.50% |" in text
    assert "| default | none | 63.00% |" in text and "none (crop + flip)" not in text
    assert "| metric's pick vs default (none) | +2.50 | [+1.26, +3.74] | 3 | +2.00, +2.50, +3.00 |" in text
    assert "| none (default, not a candidate) |" in text


def test_disagreement_test_by_hand() -> None:
    """The score orders the 4 candidates R > T > A > N, the variance the exact reverse, so all 6 pairs
    disagree; the students (means R 65.5, T 63.83, A 62.17, N 60.5) side with the score in all 6, and of
    the 4! shuffles of their means only the two perfect orders are as far from 3 of 6: p = 2/24. Teacher
    accuracy is 1 - score here, so it never disagrees with the score."""
    result = analyze(fake_ranking(SCORES, VARIANCES), fake_runs(3), list(SCORES), default="none")
    test = result["disagreement"]["variance"]
    assert (test["pairs"], test["students_side_with_score"], test["share"]) == (6, 6.0, 1.0)
    assert test["p"] == pytest.approx(2 / 24) and test["p_method"] == "exact permutation"
    assert test["candidates"] == 4  # the default is not a candidate: it has no figures to disagree on
    assert {"score_prefers": "randaugment+cutmix", "control_prefers": "none+cutmix",
            "students_side_with": "score"} in test["pair_list"]
    assert result["disagreement"]["teacher_accuracy"]["pairs"] == 0
    verdict = " ".join(result["verdict"])
    assert ("Where the score and variance (Wang et al. 2022) disagree (6 pairs of candidates), the students side "
            "with the score in 6 (100 %): p 0.0833 (exact permutation); they lean to the score, within noise."
            in verdict)
    assert "order every pair of trained candidates alike" in verdict
    text = report_markdown(result, {"title": "t", "runs_finished": 15, "runs_total": 15, "train_seconds": 3600,
                                    "device": "cpu", "command": "daqkd sweep"})
    assert "| variance (Wang et al. 2022) | 4 | 6 | 6 | 100 % | 0.0833 | exact permutation |" in text
    assert "| randaugment+cutmix | none+cutmix | score |" in text
    # students that follow the variance instead: all 6 pairs side with it, share 0
    flipped = [{**r, "top1": -r["top1"]} for r in fake_runs(3)]
    test = analyze(fake_ranking(SCORES, VARIANCES), flipped, list(SCORES), default="none")["disagreement"]["variance"]
    assert (test["share"], test["p"]) == (0.0, pytest.approx(2 / 24))
    assert {q["students_side_with"] for q in test["pair_list"]} == {"variance"}


def test_an_equal_order_is_said_as_such_and_no_correlation_has_no_direction() -> None:
    """scipy gives -0.9999999999999999 for two equal orders of 5: the sentence that the sweep cannot
    credit the metric beyond teacher accuracy still appears. A rho of exactly 0 (student top-1
    71, 74, 72, 70, 73 in score order) has no direction, whichever way the figure prefers."""
    scores = {f"da{i}": 0.1 * i for i in range(1, 6)}
    ranking = fake_ranking(scores, {n: 0.1 - v / 10 for n, v in scores.items()})
    top1 = dict(zip(sorted(scores, key=scores.get), [71.0, 74.0, 72.0, 70.0, 73.0]))
    runs = [{"aug": n, "seed": s, "top1": top1[n] + s, "best_top1": top1[n] + s} for n in scores for s in range(2)]
    result = analyze(ranking, runs, list(scores))
    assert result["score_vs_teacher_accuracy_spearman"] == pytest.approx(-1.0)
    assert "cannot credit the metric" in " ".join(result["verdict"])
    for figure in ("score", "teacher_accuracy", "variance"):
        assert result["controls"][figure]["spearman"] == 0.0 and result["controls"][figure]["direction"] == "none"


def test_report_and_plot_name_the_score_the_ranking_used(tmp_path: Path) -> None:
    """A rank.json made with another --cmi-weight (a sweep reuses one copied in) is labelled as such;
    the plot is written atomically (a failed save leaves neither the file nor a temporary)."""
    from daqkd.sweep import scatter_plot

    meta = {"title": "t", "runs_finished": 15, "runs_total": 15, "train_seconds": 3600, "device": "cpu",
            "command": "daqkd sweep"}
    ranking = fake_ranking(SCORES, VARIANCES)
    assert "| metric score (centroid CE - CMI) |" in report_markdown(
        analyze(ranking, fake_runs(3), list(SCORES), default="none"), meta)
    ranking["config"]["cmi_weight"] = 0.5
    result = analyze(ranking, fake_runs(3), list(SCORES), default="none")
    text = report_markdown(result, meta)
    assert "| metric score (centroid CE - 0.5 x CMI) |" in text and "| per-sample score (CE - 0.5 x CMI) |" in text
    scatter_plot(result, tmp_path / "scatter.png", "t")
    assert (tmp_path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scatter.png"]
    import matplotlib.figure

    def disk_full(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
        with pytest.raises(OSError):
            scatter_plot(result, tmp_path / "broken.png", "t")
    assert [p.name for p in tmp_path.iterdir()] == ["scatter.png"]


def test_analysis_says_when_the_das_do_not_differ_beyond_seed_noise() -> None:
    # seed 1 orders the 4 candidates the other way round: every rank sum is 5, chi2 0, p 1
    order = sorted(SCORES, key=SCORES.get)
    runs = [{"aug": n, "seed": s, "top1": 60.0 + (i if s == 0 else 3 - i), "best_top1": 70.0}
            for i, n in enumerate(order) for s in (0, 1)]
    result = analyze(fake_ranking(SCORES, VARIANCES), runs, list(SCORES))
    assert (result["das_differ"]["statistic"], result["das_differ"]["p"]) == (pytest.approx(0.0), 1.0)
    assert any(w.startswith("the DAs do not differ beyond seed noise (Friedman p 1 >= 0.05)")
               for w in result["warnings"])
    one_seed = analyze(fake_ranking(SCORES, VARIANCES), [r for r in runs if r["seed"] == 0], list(SCORES))
    assert one_seed["das_differ"] is None and not any("Friedman" in line for line in one_seed["verdict"])


def test_analysis_warns_on_few_seeds_and_a_pick_equal_to_the_default() -> None:
    result = analyze(fake_ranking(SCORES, VARIANCES), fake_runs(2), list(SCORES), default="none")
    warnings = result["warnings"]
    assert any(w.startswith("pick vs default rests on 2 seed(s)") for w in warnings)
    # differences 2.0, 2.5: half-width t(0.975, 1) 0.354 / sqrt(2) = 3.18 > 2.25
    assert "pick vs default: the interval contains 0, the difference is within noise" in warnings
    assert any(w.startswith("5 of 5 DAs have fewer than 3 seeds") for w in warnings)
    same = analyze(fake_ranking(SCORES, VARIANCES), fake_runs(3), list(SCORES), default="randaugment+cutmix")
    assert same["gain"]["pick_vs_default"]["mean"] == 0.0
    assert any("is the default" in line for line in same["verdict"])
    missing = analyze(fake_ranking(SCORES, VARIANCES), fake_runs(3)[:-3], list(SCORES), default="none")
    assert missing["gain"]["pick_vs_default"] is None
    assert any("not measured" in line for line in missing["verdict"])
    assert any("pick vs default not measured" in w for w in missing["warnings"])


def test_correlation_is_scipys_with_exact_p_and_needs_three_points() -> None:
    x, y = [0.3, 0.1, 0.4, 0.2, 0.5], [61.0, 64.0, 60.5, 62.0, 63.0]
    corr = correlation(x, y)
    assert corr.spearman == pytest.approx(stats.spearmanr(x, y).statistic)
    assert corr.kendall == pytest.approx(stats.kendalltau(x, y).statistic)
    assert corr.p_method == "exact permutation"
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
    assert main([*args, "--controls", "all"]) == 0
    results = json.loads((sweep / "results.json").read_text())
    assert set(results["controls"]) == {"score", "teacher_accuracy", "centroid_ce", "cmi", "sample_score", "variance",
                                        "authors_score"}
    # the default (plain crop + flip) is trained beside the candidates although it is not one
    assert results["default"] == "none"
    assert len(results["runs"]) == 4 and {r["aug"] for r in results["runs"]} == {
        "none+cutmix", "randaugment+cutmix", "augmix", "none"}
    s = results["summary"]
    assert s["metric_pick"] == next(c["name"] for c in results["ranking"]["candidates"] if c["rank"] == 1)
    assert s["metric_correlation"]["n"] == 3 and results["controls"]["teacher_accuracy"]["n"] == 3
    assert results["gain"]["pick_vs_default"]["seeds"] == 1
    assert all(r["score_se"] > 0 for r in results["candidates"] if r["candidate"])  # the ranking's jackknife
    assert any(line.startswith("The ranking itself: ") for line in results["verdict"])
    assert (sweep / "scatter.png").stat().st_size > 10_000
    report = (sweep / "report.md").read_text()
    assert "## Picks" in report and "**Warning:** pick vs default rests on 1 seed(s)" in report
    stamps = {p: p.stat().st_mtime_ns for p in (sweep / "runs").glob("*/model.safetensors")}
    capsys.readouterr()

    # a second seed: the finished runs are not repeated
    assert main([*args, "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("-- ") == 4 and "seed1" in printed and "none+cutmix-seed0" not in printed
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    results = json.loads((sweep / "results.json").read_text())
    assert len(results["runs"]) == 8
    assert all(len(r["seeds"]) == 2 for r in results["candidates"])

    # other options in the same --out: one error line naming each difference, nothing trained
    for extra, named in ((["--w-bits", "2"], "--w-bits 3 (now 2)"), (["--epochs", "2"], "--epochs 1 (now 2)"),
                         (["--kd", "none", "--lr", "0.01"], "--kd 'kd' (now 'none'), --lr 0.001 (now 0.01)"),
                         (["--seed", "5"], "--seed 0 (now 5)"), (["--default", "augmix"], "--default 'none'")):
        assert main([*args, "--seeds", "2", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("daqkd: error:") and named in err, err
    assert main(args) == 2  # fewer seeds than the sweep holds
    assert "--seeds 2 (now 1)" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # the outputs rebuilt from disk alone: the same analysis, nothing trained
    before = json.loads((sweep / "results.json").read_text())
    (sweep / "report.md").unlink()
    (sweep / "scatter.png").unlink()
    assert main(["sweep", "--report-only", "--out", str(sweep)]) == 0
    after = json.loads((sweep / "results.json").read_text())
    for key in ("summary", "controls", "gain", "verdict", "warnings", "candidates", "default"):
        assert after[key] == before[key], key
    # the runs in the sweep's order, with the wall-clock seconds each sweep process recorded (the first
    # process's too: a run's own files hold only its training seconds)
    assert after["runs"] == before["runs"] and all(r["wall_seconds"] > 0 for r in after["runs"])
    assert (sweep / "report.md").read_text().startswith("# daqkd sweep") and (sweep / "scatter.png").is_file()
    assert "8 finished runs" in capsys.readouterr().out
    assert main(["sweep", "--report-only", "--out", str(tmp_path / "nothing")]) == 2
    assert "results.json is missing" in capsys.readouterr().err
    ranking_text = (sweep / "rank.json").read_text()
    (sweep / "rank.json").write_text(ranking_text.replace('"score"', '"scor"'))  # hand-edited, say
    assert main(["sweep", "--report-only", "--out", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is not a daqkd ranking (KeyError: 'score')" in err, err
    (sweep / "rank.json").write_text(ranking_text)

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
    assert main([*args, "--seeds", "2", "--augs", "none"]) == 2
    assert "--augs 'none+cutmix,randaugment+cutmix,augmix' (now 'none')" in capsys.readouterr().err
    (sweep / "results.json").unlink()  # without the sweep's own record, rank.json still guards the list
    assert main([*args, "--seeds", "2", "--augs", "none"]) == 2
    assert "ranks other candidates" in capsys.readouterr().err


def test_a_sweep_compares_paths_as_the_folders_they_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep continued from another directory: --data ../d names the folder its runs stored as d
    (relative to where they started); the same string d from there names another folder, refused."""
    from daqkd.api import SweepOptions
    from daqkd.errors import DaqkdError
    from daqkd.sweep_runner import check_same_configuration

    start, elsewhere = tmp_path / "start", tmp_path / "start" / "elsewhere"
    elsewhere.mkdir(parents=True)
    out = tmp_path / "sweep"
    (out / "runs" / "none-seed0").mkdir(parents=True)
    (out / "runs" / "none-seed0" / "config.json").write_text(json.dumps(
        {"command": "train", "args": {"data": "d", "teacher": "t"}, "cwd": str(start)}))
    monkeypatch.chdir(elsewhere)
    check_same_configuration(out, SweepOptions(data="../d", teacher="../t", out=str(out)), None)
    with pytest.raises(DaqkdError, match=r"--data 'd' \(now 'd'\)"):
        check_same_configuration(out, SweepOptions(data="d", teacher="../t", out=str(out)), None)
    monkeypatch.chdir(start)  # where the runs started: the stored spelling itself
    check_same_configuration(out, SweepOptions(data="d", teacher="t", out=str(out)), None)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"candidates": [{"name": "none"}]}',
                                  '{"candidates": [{"rank": 1}], "selected": "none"}',
                                  '{"candidates": [{"name": "none"}], "selected": "randaugment"}'])
def test_a_damaged_stored_ranking_is_an_error_that_names_the_fix(tmp_path: Path, text: str) -> None:
    from daqkd.errors import DaqkdError
    from daqkd.rundir import stored_ranking

    (tmp_path / "rank.json").write_text(text)
    with pytest.raises(DaqkdError, match="delete it"):
        stored_ranking(tmp_path / "rank.json", ["none"])
    (tmp_path / "rank.json").write_text('{"candidates": [{"name": "none"}], "selected": "none"}')
    assert stored_ranking(tmp_path / "rank.json", ["none"])["selected"] == "none"
    assert stored_ranking(tmp_path / "absent.json", ["none"]) is None
    # a sweep reads the rank and the figures of every candidate: a file without them is refused up front
    from daqkd.sweep import RANKING_FIELDS

    with pytest.raises(DaqkdError, match="KeyError: 'rank'.*delete it"):
        stored_ranking(tmp_path / "rank.json", ["none"], fields=RANKING_FIELDS)
    figures = {"rank": 1, "score": 0.1, "accuracy": 90.0, "centroid_ce": 0.5, "cmi": 0.4}
    (tmp_path / "rank.json").write_text(json.dumps({"candidates": [{"name": "none", **figures, "score": "0.1"}],
                                                    "selected": "none"}))
    with pytest.raises(DaqkdError, match="none's score is '0.1', not a number"):
        stored_ranking(tmp_path / "rank.json", ["none"], fields=RANKING_FIELDS)
    (tmp_path / "rank.json").write_text(json.dumps({"candidates": [{"name": "none", **figures}], "selected": "none"}))
    assert stored_ranking(tmp_path / "rank.json", ["none"], fields=RANKING_FIELDS)["candidates"][0]["rank"] == 1


def test_sweep_jobs_and_shards_train_the_same_students(tmp_path: Path, tiny_folder: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Side by side in worker processes on --devices (augmenting in processes of their own), or
    split over two --shard sweeps sharing --out: the same students, to the last bit, as one serial
    sweep at the same thread count."""
    data, teacher = train_tiny_teacher(tmp_path, tiny_folder)
    common = ["sweep", *data, "--teacher", str(teacher), "--w-bits", "3", "--a-bits", "3", "--augs", "none,augmix",
              "--epochs", "2", "--batch-size", "12", "--no-progress"]
    with threads_of_two_workers():
        assert main([*common, "--out", str(tmp_path / "serial")]) == 0
        capsys.readouterr()
        shared = str(tmp_path / "shards")
        assert main([*common, "--shard", "0/2", "--out", shared]) == 0
        printed = capsys.readouterr().out
        assert "shard 0/2: 1 of its 1 students to train" in printed and "1 of 2 runs are not finished" in printed
        assert main([*common, "--shard", "1/2", "--out", shared]) == 0
        printed = capsys.readouterr().out
        assert "shard 1/2: 1 of its 1 students" in printed and "not finished" not in printed
    # --jobs defaults to one per device; pool workers may start augmentation workers of their own
    assert main([*common, "--devices", "cpu,cpu:0", "--augment-workers", "1", "--out", str(tmp_path / "parallel")]) == 0
    assert "2 at a time (1 on cpu, 1 on cpu:0)" in capsys.readouterr().out
    serial = json.loads((tmp_path / "serial" / "results.json").read_text())
    for other in ("parallel", "shards"):
        runs = {r["aug"]: r for r in json.loads((tmp_path / other / "results.json").read_text())["runs"]}
        assert set(runs) == {"none", "augmix"}, other
        for run in serial["runs"]:
            assert runs[run["aug"]]["top1"] == run["top1"], other
            history = [json.loads(line) for line in (tmp_path / other / run["run"] / "metrics.jsonl").open()]
            reference = [json.loads(line) for line in (tmp_path / "serial" / run["run"] / "metrics.jsonl").open()]
            assert [h["train_loss"] for h in history] == [h["train_loss"] for h in reference], other
    for run in serial["runs"]:
        assert "epoch 2/2" in (tmp_path / "parallel" / run["run"] / "train.log").read_text()
        # a device slot the worker took (which one depends on which worker started first)
        config = json.loads((tmp_path / "parallel" / run["run"] / "config.json").read_text())
        assert config["args"]["device"] in ("cpu", "cpu:0")


def test_a_worker_trains_on_a_free_slot_and_gives_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import queue

    from daqkd import sweep_runner
    from daqkd.api import StudentOptions

    slots: queue.Queue[str] = queue.Queue()
    slots.put("cpu:0")
    monkeypatch.setattr(sweep_runner, "_device_slots", slots)
    placed: list[str] = []
    monkeypatch.setattr(sweep_runner, "train_student", lambda options, data: placed.append(options.device))
    threads = torch.get_num_threads()
    try:
        index, _, error = sweep_runner.train_in_process((3, StudentOptions(out=str(tmp_path / "a")), None, 1))
        assert (index, error, placed) == (3, "", ["cpu:0"]) and slots.get_nowait() == "cpu:0"
        slots.put("cpu:0")

        def fail(options: StudentOptions, data: object) -> None:
            raise ValueError("boom")

        monkeypatch.setattr(sweep_runner, "train_student", fail)
        _, _, error = sweep_runner.train_in_process((4, StudentOptions(out=str(tmp_path / "b")), None, 1))
        assert error == "ValueError: boom" and slots.get_nowait() == "cpu:0"  # given back after a failure too
    finally:
        torch.set_num_threads(threads)


def test_device_slots_are_round_robin() -> None:
    assert device_slots(["cuda:0", "cuda:1"], 4) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert device_slots(["cuda:0", "cuda:1", "cuda:2"], 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert parse_devices("cpu, cpu", "auto") == ["cpu", "cpu"] and parse_devices(None, "cuda:1") == ["cuda:1"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--devices", "cpu,cpu", "--jobs", "1"], "--jobs 1 would leave devices of --devices cpu,cpu idle"),
    (["--devices", "cpu", "--device", "cpu"], "pass either --device (one device) or --devices"),
    (["--devices", "cpu,,cpu"], "list devices or CUDA indices separated by commas"),
    (["--devices", "gpu0"], "--devices gpu0: 'gpu0' is not a device: use CUDA indices (0,1), cuda:N or cpu"),
    (["--devices", "cuda:99"], "--devices cuda:99: cuda:99: "),  # no CUDA here, or fewer than 100 devices
    (["--shard", "2/2"], "--shard '2/2': give K/N with 0 <= K < N"),
    (["--shard", "1"], "--shard '1': give K/N"),
])
def test_sweep_placement_options_are_checked(tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str],
                                             extra: list[str], message: str) -> None:
    assert main(["sweep", "--data", str(tiny_folder), "--teacher", str(tmp_path), "--augs", "none",
                 "--out", str(tmp_path / "s"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("daqkd: error:") and message in err, err
    assert not (tmp_path / "s").exists()


def test_sweep_bad_default_and_missing_teacher_give_one_line(tmp_path: Path, tiny_folder: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sweep", "--data", str(tiny_folder), "--augs", "none+cutmix", "--out", str(tmp_path / "s")]
    assert main([*base, "--teacher", str(tmp_path), "--default", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown augmentation 'bogus'" in err[0]
    assert main([*base, "--teacher", str(tmp_path), "--default", "none,augmix"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--default takes one augmentation" in err[0]
    assert main(base) == 2
    assert "pass --teacher RUN" in capsys.readouterr().err


def test_sweep_jobs_names_the_failed_run(tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, teacher = train_tiny_teacher(tmp_path, tiny_folder)
    capsys.readouterr()
    assert main(["sweep", *data, "--teacher", str(teacher), "--augs", "none,augmix", "--epochs", "1",
                 "--batch-size", "12", "--lr", "1e30", "--jobs", "2", "--out", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "-seed0 failed (DaqkdError: the loss became" in err and "train.log" in err


def test_ctrl_c_in_a_sweep_with_jobs_stops_the_workers_and_prints_one_line(
        tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while students train in the pool: the pool is terminated and joined, and the sweep ends
    like any command interrupted (exit 130, one `daqkd: interrupted:` line saying how to continue)."""
    from daqkd import sweep_runner

    data, teacher = train_tiny_teacher(tmp_path, tiny_folder)
    calls = []

    class InterruptedPool:
        def imap_unordered(self, fn, tasks):
            raise KeyboardInterrupt

        def terminate(self):
            calls.append("terminate")

        def join(self):
            calls.append("join")

    monkeypatch.setattr(sweep_runner._StudentContext, "Pool", lambda self, *args, **kwargs: InterruptedPool())
    capsys.readouterr()
    assert main(["sweep", *data, "--teacher", str(teacher), "--augs", "none,augmix", "--epochs", "1",
                 "--batch-size", "12", "--jobs", "2", "--no-progress", "--out", str(tmp_path / "sweep")]) == 130
    assert calls == ["terminate", "join"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"daqkd: interrupted: {tmp_path / 'sweep'} keeps every finished student and the others' last "
                    "checkpoints; run the same command again to continue")]


def _report_blocked_sigint(queue) -> None:
    queue.put(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_student_workers_start_with_ctrl_c_blocked() -> None:
    """A Ctrl-C while a student process starts (importing torch) must not print a traceback from it:
    the spawned interpreter starts with SIGINT blocked, and the parent's own mask is unchanged."""
    from daqkd import sweep_runner

    context = sweep_runner._StudentContext()
    queue = context.Queue()
    worker = context.Process(target=_report_blocked_sigint, args=(queue,))
    worker.start()
    try:
        assert queue.get(timeout=120) is True
    finally:
        worker.join(timeout=60)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def _hold_a_semaphore(ready: str) -> None:
    """A pool task that, like a student whose quantizer kernels inductor compiled (tqdm's lock),
    creates a named semaphore and keeps running."""
    import multiprocessing
    import time

    global _held_lock
    _held_lock = multiprocessing.get_context("spawn").RLock()
    Path(ready + ".tmp").write_text(_held_lock._semlock.name)
    Path(ready + ".tmp").rename(ready)
    time.sleep(300)


def test_terminated_student_workers_exit_through_their_finalizers(tmp_path: Path) -> None:
    """Ctrl-C during a sweep terminates the pool (SIGTERM to each student): a student killed outright
    left its semaphores to the resource tracker, which printed "There appear to be N leaked semaphore
    objects" after the one `interrupted` line. Now the worker unwinds: exit status 128 + SIGTERM, and
    its semaphore is unlinked (gone from /dev/shm) before the pool's join returns."""
    import time

    from daqkd import sweep_runner

    shm = Path("/dev/shm")
    assert shm.is_dir(), "this test looks for POSIX named semaphores in /dev/shm (Linux)"
    context = sweep_runner._StudentContext()
    pool = context.Pool(1, initializer=sweep_runner._start_worker, initargs=(context.Queue(),))
    workers = list(pool._pool)
    ready = tmp_path / "ready"
    pool.apply_async(_hold_a_semaphore, (str(ready),))
    deadline = time.monotonic() + 180
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    semaphore = shm / f"sem.{ready.read_text().lstrip('/')}"
    assert semaphore.exists()
    pool.terminate()
    pool.join()
    assert [worker.exitcode for worker in workers] == [128 + signal.SIGTERM]
    assert not semaphore.exists()


H200_POINTS = [("randomerasing+cutmix", 0.41, 85.34), ("randaugment+cutmix", 0.46, 85.34),
               ("autoaugment-cifar10+cutmix", 0.49, 85.24), ("autoaugment-svhn+cutmix", 0.66, 85.15),
               ("none+cutmix", 0.25, 85.55)]
CPU_POINTS = [("none+cutmix", 0.2510, 84.49), ("augmix+cutmix", 0.2940, 84.35), ("randomerasing+cutmix", 0.4067, 83.98),
              ("randaugment+cutmix", 0.4614, 84.09), ("autoaugment-cifar10+cutmix", 0.4874, 84.04),
              ("trivialaugment+cutmix", 0.5340, 83.69), ("autoaugment-imagenet+cutmix", 0.6243, 83.90),
              ("autoaugment-svhn+cutmix", 0.6638, 83.80)]


@pytest.mark.parametrize("points", [H200_POINTS, CPU_POINTS], ids=["h200", "cpu"])
def test_scatter_labels_do_not_overlap_and_stay_inside(points: list[tuple[str, float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from daqkd.sweep import place_labels

    # the committed sweeps' points: ties in accuracy close in score, points at the right edge, labels
    # long enough to reach the next point
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=130)
    ax.plot([p[1] for p in points], [p[2] for p in points], "o")
    ax.axhline(85.63)  # the CPU sweep's default line squeezes its points into the lower half
    fig.tight_layout()
    ax.autoscale_view()
    place_labels(fig, ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    frame = ax.get_window_extent(renderer)
    plt.close(fig)
    assert sorted(t.get_text() for t in ax.texts) == sorted(p[0] for p in points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    markers = [ax.transData.transform((p[1], p[2])) for p in points]
    assert not any(b.contains(mx, my) for b in boxes for mx, my in markers)  # no label covers a point
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)


def test_ewgs_hessian_sample_counts_only_for_hessian_runs_and_old_runs_are_refused(tmp_path: Path) -> None:
    """The Hessian sample options matter only to Hessian EWGS students; a Hessian student stored
    before they existed took another sample (2 x 64 images x 1 probe), which no option reproduces."""
    from daqkd.api import SweepOptions
    from daqkd.errors import DaqkdError
    from daqkd.sweep_runner import check_same_configuration

    def store(name: str, **args) -> None:
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"command": "train", "args": args}))

    store("none-seed0", method="ewgs", ewgs_delta="0", ewgs_hessian_probes=4)
    check_same_configuration(tmp_path, SweepOptions(ewgs_delta="0", ewgs_hessian_probes=8), None)  # no effect
    store("a-seed0", method="ewgs", ewgs_delta="hessian", ewgs_hessian_probes=4)
    with pytest.raises(DaqkdError, match=r"--ewgs-hessian-probes 4 \(now 8\)"):
        check_same_configuration(tmp_path, SweepOptions(ewgs_delta="hessian", ewgs_hessian_probes=8), None)
    store("b-seed0", method="ewgs", ewgs_delta="hessian")  # config.json from before the sample options
    with pytest.raises(DaqkdError, match=r"--ewgs-hessian-probes '2 batches of <= 64 images x 1 probe"):
        check_same_configuration(tmp_path, SweepOptions(ewgs_delta="hessian"), None)


GOOD_CONFIG = {"augs": "none+cutmix,augmix", "seed": 0, "seeds": 2, "epochs": 3, "method": "ewgs", "w_bits": 2,
               "a_bits": 2, "kd": "kd", "default": "none"}


@pytest.mark.parametrize("stored,message", [
    ([1, 2, 3], "is not a daqkd sweep's results.json (an object with config and meta)"),
    ({"config": [1], "meta": {}}, "is not a daqkd sweep's results.json"),
    ({"config": {**GOOD_CONFIG, "epochs": "3"}, "meta": {}},
     "has a damaged config (epochs must be a whole number, got '3' (str)): rerun the sweep into a new --out"),
    ({"config": {**GOOD_CONFIG, "seeds": 0}, "meta": {}}, "has a damaged config (seeds is 0, not at least 1)"),
    ({"config": {k: v for k, v in GOOD_CONFIG.items() if k != "epochs"}, "meta": {}},
     "has a damaged config (no epochs)"),
    ({"config": {**GOOD_CONFIG, "augs": ["none"]}, "meta": {}}, "has a damaged config (augs must be a string"),
], ids=["list", "config-list", "string-epochs", "zero-seeds", "no-epochs", "augs-list"])
def test_report_only_on_a_foreign_results_file_is_one_line(stored: object, message: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rank.json").write_text("{}")
    (tmp_path / "results.json").write_text(json.dumps(stored))
    assert main(["sweep", "--report-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daqkd: error: --report-only: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("extra,flag", [(["--epochs", "5"], "--epochs"), (["--w-bits", "3"], "--w-bits"),
                                        (["--data", "somewhere"], "--data"), (["--seeds", "3"], "--seeds")])
def test_report_only_refuses_options_it_would_ignore(extra: list[str], flag: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"config": GOOD_CONFIG, "meta": {}}))
    assert main(["sweep", "--report-only", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err == (f"daqkd: error: --report-only rebuilds the report with the sweep's own settings from results.json: "
                   f"drop {flag} (only --out and --default apply)\n"), err
