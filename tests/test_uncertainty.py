"""How sure a ranking is: jackknife standard errors against the spread of independent passes, the
stability verdict, and CutMix's mixing groups."""

from __future__ import annotations

import statistics

import pytest
import torch

from daqkd.augment import Candidate
from daqkd.augment.registry import cutmix
from daqkd.data import ImageSet, load_image_folder
from daqkd.metric import DAStatistics, jackknife_se, score
from daqkd.models import NormalizedModel, create_model, parse_normalization
from daqkd.rank import RankConfig, TeacherRunner, combined_se, rank_candidates, stability_verdict

BLOCKS = 32


def synthetic_pass(generator: torch.Generator, n: int, k: int, margin: float, soft: bool,
                   images: tuple[torch.Tensor, torch.Tensor] | None = None) -> DAStatistics:
    """One pass of a synthetic teacher: logits = margin * one-hot(label) + N(0, 1); under ``soft``,
    CutMix-like labels mixing each sample's class with its neighbour's at lambda ~ U(0, 1).
    ``images`` = (labels, noise) shared with other passes: the same images seen by another teacher
    view, whose predictions then correlate as a real teacher's under two DAs do."""
    if images is None:
        labels = torch.randint(0, k, (n,), generator=generator)
        noise = torch.randn(n, k, generator=generator, dtype=torch.float64)
    else:
        labels, noise = images
    logits = margin * torch.nn.functional.one_hot(labels, k).double() + noise
    targets: torch.Tensor = labels
    if soft:
        lam = torch.rand(n, 1, generator=generator, dtype=torch.float64)
        eye = torch.eye(k, dtype=torch.float64)
        targets = lam * eye[labels] + (1 - lam) * eye[labels.roll(1)]
        logits = logits + (1 - lam) * margin * (eye[labels.roll(1)] - eye[labels])
    stats = DAStatistics(k, group_size=10, blocks=BLOCKS)
    block_of = torch.arange(n) * BLOCKS // n
    for start in range(0, n, 64):
        stats.update(logits[start:start + 64], targets[start:start + 64], block_ids=block_of[start:start + 64])
    return stats


@pytest.mark.parametrize("soft", [False, True], ids=["one-hot", "cutmix-like"])
def test_jackknife_se_matches_the_spread_of_independent_passes(soft: bool) -> None:
    # 200 independent passes of 400 samples each: the std of each figure across passes against the
    # mean jackknife SE of one pass. Stated factor: within 0.75-1.33 (the SE of a std from 200
    # draws is ~5 %; the jackknife of a nonlinear figure is slightly conservative).
    generator = torch.Generator().manual_seed(11)
    values: dict[str, list[float]] = {"score": [], "cmi": [], "centroid_ce": [], "ce": []}
    ses: dict[str, list[float]] = {key: [] for key in values}
    for _ in range(200):
        stats = synthetic_pass(generator, 400, 5, 2.0, soft)
        figures, loo = stats.compute(), stats.jackknife()
        figures["score"], loo["score"] = score(figures), score(loo)
        for key, seen in values.items():
            seen.append(figures[key])
            ses[key].append(jackknife_se(loo[key]))
    for key, seen in values.items():
        ratio = statistics.fmean(ses[key]) / statistics.stdev(seen)
        assert 0.75 < ratio < 1.33, (key, ratio)


def test_jackknife_of_a_mean_is_its_textbook_standard_error() -> None:
    # ce is a plain mean over samples; with one sample per block the jackknife SE equals
    # sd / sqrt(n) exactly (Efron & Stein)
    generator = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(32, 3, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    stats = DAStatistics(3, group_size=4, blocks=32)
    stats.update(logits, labels, block_ids=torch.arange(32))
    per_sample = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
    assert jackknife_se(stats.jackknife()["ce"]) == pytest.approx(float(per_sample.std() / 32 ** 0.5), rel=1e-9)


def test_combined_se_of_repeats() -> None:
    # one pass: its jackknife SE; R passes over the same images keep the images' part
    assert combined_se([1.0], [0.04]) == pytest.approx(0.2)
    # spread of 3 passes s^2 = 0.01: 0.04 - 0.01 * (2/3) = 0.03333
    assert combined_se([0.9, 1.0, 1.1], [0.04, 0.04, 0.04]) == pytest.approx((0.04 - 0.01 * 2 / 3) ** 0.5)
    # a jackknife smaller than the spread: never below the draws' part s^2 / R
    assert combined_se([0.9, 1.0, 1.1], [0.001] * 3) == pytest.approx((0.01 / 3) ** 0.5)


def verdict_for(margins: dict[str, float], seed: int = 0, same_images: bool = False) -> dict:
    """stability_verdict over synthetic candidates, built as rank_candidates builds its inputs (a
    jackknife over the same blocks for every candidate). ``same_images``: one set of labels and
    noise under every candidate (paired, as real passes over one split are); else each candidate
    draws its own (independent candidates)."""
    shared = torch.Generator().manual_seed(seed * 100 + 99)
    images = (torch.randint(0, 10, (2000,), generator=shared), torch.randn(2000, 10, generator=shared,
                                                                           dtype=torch.float64))
    rows, loo_by_name = [], {}
    for i, (name, margin) in enumerate(margins.items()):
        stats = synthetic_pass(torch.Generator().manual_seed(seed * 100 + i), 2000, 10, margin, soft=False,
                               images=images if same_images else None)
        figures, loo = stats.compute(), stats.jackknife()
        rows.append({"name": name, "score": score(figures)})
        loo_by_name[name] = ([score(figures)], [score(loo)])
    ranked = sorted(rows, key=lambda r: r["score"])
    return stability_verdict(ranked, loo_by_name)


def test_verdict_says_tie_for_candidates_from_one_distribution() -> None:
    ties = [verdict_for({"a": 2.0, "b": 2.0}, seed)["verdict"] for seed in range(10)]
    assert ties.count("tie") >= 8  # 95 % intervals: about 1 in 20 separates by chance


def test_verdict_names_the_winner_of_clearly_different_candidates() -> None:
    # a wider logit margin gives a lower centroid CE and a lower score here
    verdict = verdict_for({"weak": 1.0, "strong": 3.0, "same-as-strong": 3.0})
    assert verdict["selected"] in ("strong", "same-as-strong") and verdict["verdict"] == "tie"
    clear = verdict_for({"weak": 1.0, "strong": 3.0})
    assert clear["selected"] == "strong" and clear["verdict"] == "separated"
    assert clear["probability_selected_ahead"] > 0.999 and clear["tied_with_selected"] == []
    assert "is ahead of the runner-up weak" in clear["text"]


def test_a_noisier_candidate_behind_the_runner_up_can_still_be_tied() -> None:
    """The runner-up is 0.1 +- 0.006 behind, separated; the third is 0.2 behind but its score varies
    far more across the image blocks (gap 0.2 +- ~2.4): it is tied, and the text says so."""
    generator = torch.Generator().manual_seed(0)
    blocks = 32
    ranked = [{"name": "a", "score": 1.0}, {"name": "b", "score": 1.1}, {"name": "c", "score": 1.2}]
    loo = {"a": ([1.0], [torch.full((blocks,), 1.0, dtype=torch.float64)]),
           "b": ([1.1], [1.1 + 0.001 * torch.randn(blocks, generator=generator, dtype=torch.float64)]),
           "c": ([1.2], [1.2 + 0.5 * torch.randn(blocks, generator=generator, dtype=torch.float64)])}
    verdict = stability_verdict(ranked, loo)
    assert ranked[1]["behind_selected"] / ranked[1]["behind_selected_se"] > 10
    assert ranked[2]["behind_selected"] / ranked[2]["behind_selected_se"] < 1
    assert verdict["tied_with_selected"] == ["c"] and verdict["verdict"] == "tie"
    assert "no candidate is tied" not in verdict["text"] and "tied with it at 95 %: c" in verdict["text"]


def test_the_paired_jackknife_separates_close_candidates_seen_on_the_same_images() -> None:
    # a margin 2.02 against 2.0: on the same images (labels and noise shared, as a real split's
    # passes are) the gap's paired SE is ~1e-4 and every seed separates them; drawn independently
    # the same gap is within noise (SE ~0.016) at most seeds
    paired = [verdict_for({"a": 2.0, "b": 2.02}, seed, same_images=True) for seed in range(10)]
    assert all(v["verdict"] == "separated" and v["selected"] == "b" for v in paired)
    assert all(v["gap_se"] < 0.01 * verdict_for({"a": 2.0, "b": 2.02}, seed)["gap_se"] for seed, v in enumerate(paired))
    unpaired = [verdict_for({"a": 2.0, "b": 2.02}, seed)["verdict"] for seed in range(10)]
    assert unpaired.count("tie") >= 6


def test_identical_candidates_are_a_tie() -> None:
    # the same images and predictions under two names: gap 0 with standard error 0
    verdict = verdict_for({"a": 2.0, "b": 2.0}, same_images=True)
    assert (verdict["gap"], verdict["gap_se"]) == (0.0, 0.0)
    assert verdict["verdict"] == "tie" and verdict["probability_selected_ahead"] == 0.5


def test_cutmix_groups_draw_independently_and_keep_each_sample_a_cutmix_sample() -> None:
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 4
    _, soft = cutmix(images, labels, 4, torch.Generator().manual_seed(0), group=16)
    lambdas = soft.max(dim=1).values
    assert soft.sum(1).allclose(torch.ones(64))
    # each group of 16 has its own lambda: 4 distinct values, constant inside a group
    per_group = [set(lambdas[i:i + 16].tolist()) for i in range(0, 64, 16)]
    assert all(len(g) <= 2 for g in per_group)  # lambda and, where labels tie, 1
    assert len({min(g) for g in per_group}) == 4
    whole, _ = cutmix(images, labels, 4, torch.Generator().manual_seed(0))
    assert torch.equal(cutmix(images, labels, 4, torch.Generator().manual_seed(0), group=0)[0], whole)
    # 9 images in groups of 8: the ninth would be paired with itself, unmixed; it joins the first group
    mixed, soft = cutmix(images[:9], labels[:9], 4, torch.Generator().manual_seed(0), group=8)
    assert not torch.equal(mixed[8], images[8]) and float(soft[8].max()) < 1.0


def test_mixing_groups_keep_the_expected_score(tiny_folder) -> None:
    # mixing groups of 6 inside batches of 36 against the single-draw path with batches of 6 (one
    # CutMix draw per batch, as in training): the same number of draws, so the same expected
    # score, over 30 seeds each, within 4 standard errors of the difference of the means. (Against
    # one draw for the whole pass the expectation moves: the score is not linear in the draws.)
    torch.manual_seed(0)
    data = load_image_folder(tiny_folder)
    model = create_model("resnet20", 3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    teacher = NormalizedModel(model, parse_normalization("cifar10")).train()
    with torch.no_grad():
        teacher(data.images)
    teacher.eval()
    figures: dict[tuple[int, int], dict[str, list[float]]] = {}
    for batch, group in ((6, 0), (36, 6)):
        runner = TeacherRunner(teacher, torch.device("cpu"), batch, compiled=False)
        out = figures[(batch, group)] = {"score": [], "ce": []}
        for seed in range(30):
            config = RankConfig(augs=["none+cutmix"], seed=seed, batch_size=batch, mix_group=group)
            row = rank_candidates(teacher, data, config, torch.device("cpu"), runner=runner)["candidates"][0]
            out["score"].append(row["score"])
            out["ce"].append(row["ce"])
    single, grouped = figures[(6, 0)], figures[(36, 6)]
    for key in ("score", "ce"):
        diff_se = (statistics.variance(single[key]) / 30 + statistics.variance(grouped[key]) / 30) ** 0.5
        assert abs(statistics.fmean(single[key]) - statistics.fmean(grouped[key])) < 4 * diff_se, key


def test_rank_report_carries_standard_errors_and_a_verdict(tiny_folder) -> None:
    data = ImageSet(*_tiny(tiny_folder))
    torch.manual_seed(0)
    model = NormalizedModel(create_model("resnet20", 3), parse_normalization("cifar10")).eval()
    config = RankConfig(augs=["none", "autoaugment-cifar10", "none+cutmix"], batch_size=16, seed=1)
    report = rank_candidates(model, data, config, torch.device("cpu"))
    for row in report["candidates"]:
        for key in ("score", "centroid_ce", "cmi", "ce", "sample_score", "accuracy"):
            assert row[key + "_se"] > 0, key
    stability = report["stability"]
    assert stability["selected"] == report["selected"] and stability["verdict"] in ("tie", "separated")
    runner_up = report["candidates"][1]
    assert stability["gap"] == pytest.approx(runner_up["score"] - report["candidates"][0]["score"])
    assert stability["gap_se"] == runner_up["behind_selected_se"] > 0


def _tiny(folder):
    loaded = load_image_folder(folder)
    return loaded.images, loaded.labels, loaded.classes, loaded.source


def test_candidate_mix_group_reaches_cutmix() -> None:
    candidate = Candidate("none+cutmix", 4, mix_group=8)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    _, soft = candidate(images, torch.arange(32) % 4, torch.Generator().manual_seed(1))
    assert len({float(soft[i:i + 8].max()) for i in range(0, 32, 8)}) > 1
