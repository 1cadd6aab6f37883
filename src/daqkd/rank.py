"""Ranking candidate DAs by the teacher's predictions: one streaming pass per candidate.

For each candidate and repeat, the training split is shuffled (seeded), cut into batches, each
batch is augmented on the model's device (per-image random DAs, see :mod:`daqkd.augment`) and the
teacher's logits feed :class:`daqkd.metric.DAStatistics`. Random draws come from generators seeded
by (seed, repeat, batch index), so a seed gives the same numbers, and all candidates of a repeat see
the same shuffling and the same base crops (common random numbers make their differences less noisy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .augment import Candidate
from .data import ImageSet
from .metric import SCORES, DAStatistics, jackknife_se, score, variance_standard_error
from .rundir import write_json_atomic
from .runtime import mix_seed

Progress = Callable[[str, int, int], None]  # (candidate, images done, images total)

FIGURES = ("score", "centroid_ce", "cmi", "ce", "sample_score", "variance", "accuracy")
AUTHORS_FIGURES = ("authors_score", "authors_cmi")
VARIANCE_PROTOCOLS = ("single", "wang")
# Draw streams: the scored pass of repeat r draws from stream r; the authors' centroid pass and the
# extra variance passes from their own streams, so each gets fresh random draws.
CENTROID_STREAM = 1 << 20
VARIANCE_STREAM = 2 << 20


@dataclass
class RankConfig:
    """What `daqkd rank` computes; every field is recorded in the report.

    score: "paper" (centroid_ce - w * cmi), "sample" (ce - w * cmi) or "authors" (their code).
    authors: also compute the authors' variant (a second pass per candidate; implied by
    score="authors"). variance_protocol: "single" (groups of the scored pass, paired views when
    variance_paired) or "wang" (Wang et al.: paired views, extra passes with fresh draws until at
    least variance_min_groups groups).
    """

    augs: list[Any]  # candidate names, or PerImageDA objects (daqkd.augment.custom)
    batch_size: int = 256
    seed: int = 0
    repeats: int = 1
    cmi_weight: float = 1.0
    score: str = "paper"
    variance_group: int = 1000
    variance_paired: bool = False
    authors: bool = False
    variance_protocol: str = "single"
    variance_min_groups: int = 1000
    jackknife_blocks: int = 32
    mix_group: int = 8

    @property
    def computes_authors(self) -> bool:
        return self.authors or self.score == "authors"

    @property
    def paired(self) -> bool:
        return self.variance_paired or self.variance_protocol == "wang"


# torch.compile costs ~30 s on CPU; it pays off above this many teacher forwards.
COMPILE_AUTO_MIN_IMAGES = 100_000


def compile_pays(forwards: int) -> bool:
    """Whether torch.compile of a teacher pays off over this many forwards."""
    return forwards >= COMPILE_AUTO_MIN_IMAGES


def rank_and_save(teacher: nn.Module, data: ImageSet, augs: list[str], seed: int, device: torch.device,
                  path: str | Path, save: bool = True, authors: bool = False) -> dict[str, Any]:
    """Rank ``augs`` on the training split with default settings (what `train --aug auto` and
    `sweep` run; ``authors`` adds the authors' computation) and write the report to ``path`` (when
    ``save``: the main process)."""
    config = RankConfig(augs=augs, seed=seed, authors=authors)
    report = rank_candidates(teacher, data, config, device, compile_pays(len(data) * len(augs) * (1 + authors)))
    report["split"] = "train"
    if save:
        write_json_atomic(path, report)
    return report


def effective_group_size(requested: int, images: int) -> int:
    """The variance group size: as requested, shrunk to images // 10 if fewer than 2 groups fit."""
    if images >= 2 * requested:
        return requested
    return max(1, images // 10)


class TeacherRunner:
    """Runs the teacher in eval mode without grad, channels_last, padding ragged batches when the
    model is compiled (a fixed shape avoids recompilation)."""

    def __init__(self, model: nn.Module, device: torch.device, batch_size: int, compiled: bool) -> None:
        self.model = model.eval().to(device).to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.device, self.batch_size, self.compiled = device, batch_size, compiled

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if self.compiled and n < self.batch_size:
            pad = images.new_zeros((self.batch_size - n, *images.shape[1:]))
            images = torch.cat([images, pad])
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self.forward(x)[:n].float()


def batch_ranges(total: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """The batch indices this process handles: a contiguous block of the whole pass."""
    batches = math.ceil(total / batch_size)
    return range(batches * rank // world, batches * (rank + 1) // world)


def run_pass(runner: TeacherRunner, data: ImageSet, candidate: Candidate, config: RankConfig,
             stream: int, group_size: int, progress: Progress | None = None,
             reference_centroids: torch.Tensor | None = None) -> tuple[DAStatistics, float]:
    """One pass of the split under ``candidate`` with the shuffling and draws of ``stream``:
    (statistics summed over processes, seconds)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(mix_seed(config.seed, stream)))
    blocks = min(config.jackknife_blocks, len(data))
    stats = DAStatistics(data.num_classes, group_size, runner.device, reference_centroids=reference_centroids,
                         blocks=blocks)
    batches = batch_ranges(len(data), config.batch_size, rank, world)
    # jackknife block of each position in the pass: contiguous runs, the same images for every
    # candidate of a repeat (same shuffling), so differences between candidates pair block by block
    block_of = torch.arange(len(data)) * blocks // len(data)

    def prepare(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        idx = order[b * config.batch_size:(b + 1) * config.batch_size]
        generator = torch.Generator().manual_seed(mix_seed(config.seed, stream, b))
        images = data.take(idx)
        if isinstance(images, torch.Tensor):
            images = images.to(runner.device, non_blocking=True)
        base = candidate.base_view(images, generator)
        x, targets = candidate(images, data.labels[idx].to(runner.device), generator, base=base)
        # mixed sizes are cropped on the CPU: the statistics accumulate on the runner's device
        return x, targets.to(runner.device), base if config.paired else None

    # Augmentation runs inline: on CUDA its kernels queue behind the model's asynchronously; on CPU
    # a prefetch thread measured slower (its OpenMP team fights the model's for the cores).
    start = time.perf_counter()
    done = 0
    for b in batches:
        x, targets, base = prepare(b)
        logits = runner(x)
        paired = runner(base) if base is not None else None
        stats.update(logits, targets, paired, block_of[b * config.batch_size:b * config.batch_size + x.shape[0]])
        done += x.shape[0]
        if progress is not None:
            progress(candidate.name, done * world, len(data))
    stats.all_reduce()
    return stats, time.perf_counter() - start


def summarize(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2 or any(math.isnan(v) for v in values):
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def variance_passes(config: RankConfig, images: int, group_size: int) -> int:
    """Extra passes the variance needs under ``config.variance_protocol`` (0 for "single")."""
    if config.variance_protocol != "wang":
        return 0
    per_pass = max(1, images // group_size)
    return max(0, math.ceil(config.variance_min_groups / per_pass) - 1)


def rank_candidates(model: nn.Module, data: ImageSet, config: RankConfig, device: torch.device,
                    compiled: bool = False, progress: Progress | None = None,
                    crop_size: int = 224, runner: TeacherRunner | None = None) -> dict[str, Any]:
    """Rank ``config.augs`` for ``model`` on ``data``; the report `daqkd rank` writes as JSON.

    Per candidate and repeat: the scored pass; with ``config.computes_authors`` first a centroid
    pass (fresh draws) whose centroid matrix the scored pass measures its KL against; with the
    "wang" variance protocol, extra passes (fresh draws) that only add variance groups. Pass
    ``runner`` to reuse an already compiled and warmed-up teacher.
    """
    if config.score not in SCORES:
        raise ValueError(f"unknown score {config.score!r}")
    if config.variance_protocol not in VARIANCE_PROTOCOLS:
        raise ValueError(f"unknown variance protocol {config.variance_protocol!r}")
    runner = runner or TeacherRunner(model, device, config.batch_size, compiled)
    group_size = effective_group_size(config.variance_group, len(data))
    extra_variance = variance_passes(config, len(data), group_size)
    keys = FIGURES + (AUTHORS_FIGURES if config.computes_authors else ())
    jackknifed = [k for k in keys if k != "variance"]
    results, leave_one_out = [], {}
    for aug in config.augs:
        if isinstance(aug, str):
            candidate = Candidate(aug, data.num_classes, crop_size, mix_group=config.mix_group)
        else:
            candidate, candidate.crop_size = aug, crop_size
        name = candidate.name
        per_repeat: dict[str, list[float]] = {k: [] for k in keys}
        jack_var: dict[str, list[float]] = {k: [] for k in jackknifed}
        loo_scores: list[torch.Tensor] = []
        groups, seconds = [], 0.0
        for repeat in range(config.repeats):
            reference = None
            if config.computes_authors:
                centroid_stats, elapsed = run_pass(runner, data, candidate, config, CENTROID_STREAM + repeat,
                                                   group_size, progress)
                reference = centroid_stats.authors_centroids(soft_labels=candidate.mixes)
                seconds += elapsed
            stats, elapsed = run_pass(runner, data, candidate, config, repeat, group_size, progress, reference)
            seconds += elapsed
            figures = stats.compute()
            loo = stats.jackknife()
            for k in range(extra_variance):
                more, elapsed = run_pass(runner, data, candidate, config,
                                         VARIANCE_STREAM + repeat * extra_variance + k, group_size, progress)
                stats = stats.merge(more)
                seconds += elapsed
            if extra_variance:
                merged = stats.compute()
                figures["variance"], figures["variance_groups"] = merged["variance"], merged["variance_groups"]
            for table in (figures, loo) if loo is not None else (figures,):
                table["score"] = score(table, config.score, config.cmi_weight)
                table["sample_score"] = score(table, "sample", config.cmi_weight)
                if config.computes_authors:
                    table["authors_score"] = score(table, "authors", config.cmi_weight)
            for key in keys:
                per_repeat[key].append(figures[key])
            if loo is not None:
                for key in jackknifed:
                    jack_var[key].append(jackknife_se(loo[key]) ** 2)
                loo_scores.append(loo["score"])
            groups.append(int(figures["variance_groups"]))
        row: dict[str, Any] = {"name": name}
        for key in keys:
            mean, spread_se = summarize(per_repeat[key])
            row[key] = None if math.isnan(mean) else mean
            if key in jackknifed:
                row[key + "_se"] = combined_se(per_repeat[key], jack_var[key]) if jack_var[key] else None
            elif config.repeats > 1:
                row[key + "_se"] = spread_se
        row["variance_groups"] = min(groups)
        if config.repeats == 1:
            row["variance_se"] = variance_standard_error(row["variance"], row["variance_groups"])
        passes = config.repeats * (1 + int(config.computes_authors) + extra_variance)  # the extra passes too
        row["images_per_s"] = len(data) * passes / seconds
        row["seconds"] = seconds
        results.append(row)
        leave_one_out[name] = (per_repeat["score"], loo_scores)
    assign_ranks(results)
    selected = min(results, key=lambda r: r["rank"])["name"]
    ranked = sorted(results, key=lambda r: r["rank"])
    return {
        "selected": selected,
        "split": None,
        "images": len(data),
        "classes": data.num_classes,
        "variance_group": group_size,
        "config": {**asdict(config), "augs": [a if isinstance(a, str) else a.name for a in config.augs]},
        "candidates": ranked,
        "stability": stability_verdict(ranked, leave_one_out),
        "controls": control_picks(results, config),
    }


def combined_se(values: list[float], jackknife_variances: list[float]) -> float:
    """Standard error of the mean of R passes from their jackknife variances and their spread.

    One pass's jackknife variance v estimates the variance from both the images and the random
    draws; the spread s^2 of R passes over the same images estimates the draws' part alone. The
    mean of R passes keeps the images' part and divides the draws' part by R:
    v - s^2 (1 - 1/R), and never less than s^2 / R, the draws' part of the mean.
    """
    v = sum(jackknife_variances) / len(jackknife_variances)
    r = len(values)
    if r < 2:
        return math.sqrt(v)
    mean = sum(values) / r
    spread = sum((x - mean) ** 2 for x in values) / (r - 1)
    return math.sqrt(max(v - spread * (1 - 1 / r), spread / r))


Z_95 = 1.959964  # two-sided 95 %: a gap under 1.96 standard errors is a tie


def _z(gap: float, se: float) -> float:
    """gap / se; without spread (se 0) a positive gap is certain and a zero gap is a tie."""
    if se > 0:
        return gap / se
    return math.inf if gap > 0 else 0.0


def stability_verdict(ranked: list[dict[str, Any]],
                      leave_one_out: dict[str, tuple[list[float], list[torch.Tensor]]]) -> dict[str, Any] | None:
    """How sure the selection is: each candidate's gap in score to the selected one, the gap's
    standard error from the paired jackknife (the same blocks of images under every candidate of a
    repeat), the probability that the selected candidate truly scores lower than the runner-up
    (normal approximation, Phi(gap / se)), and the candidates tied with it (gap < 1.96 se).
    None when the passes were too small for a jackknife (fewer than 2 images)."""
    if len(ranked) < 2 or any(not loo for _, loo in leave_one_out.values()):
        return None
    top = ranked[0]["name"]
    top_values, top_loo = leave_one_out[top]
    tied = []
    for row in ranked[1:]:
        values, loo = leave_one_out[row["name"]]
        gaps = [v - t for v, t in zip(values, top_values)]
        gap_var = [jackknife_se(a - b) ** 2 for a, b in zip(loo, top_loo)]
        gap, gap_se = sum(gaps) / len(gaps), combined_se(gaps, gap_var)
        row.update(behind_selected=gap, behind_selected_se=gap_se)
        if _z(gap, gap_se) < Z_95:
            tied.append(row["name"])
    runner_up = ranked[1]
    z = _z(runner_up["behind_selected"], runner_up["behind_selected_se"])
    probability = 0.5 * math.erfc(-z / math.sqrt(2))  # Phi(z)
    separated = not tied
    gap_text = f"{runner_up['behind_selected']:.4f} ± {runner_up['behind_selected_se']:.4f}"
    if separated:
        text = (f"{top} is ahead of the runner-up {runner_up['name']} by {gap_text} in score "
                f"(P(ahead) = {probability:.3f}); no candidate is tied with it at 95 %")
    elif runner_up["name"] in tied:
        text = (f"tie: {top} is ahead of the runner-up {runner_up['name']} by only {gap_text} in score "
                f"(P(ahead) = {probability:.2f}); tied with it at 95 %: {', '.join(tied)}. More images "
                "(a larger --limit-per-class) or --repeats would separate them")
    else:
        # a candidate further down can be within 1.96 standard errors when its score varies more
        text = (f"tie: {top} is ahead of the runner-up {runner_up['name']} by {gap_text} in score "
                f"(P(ahead) = {probability:.3f}), but tied with it at 95 %: {', '.join(tied)}, whose scores "
                "vary more across images. More images (a larger --limit-per-class) or --repeats would separate "
                "them")
    return {"selected": top, "runner_up": runner_up["name"], "gap": runner_up["behind_selected"],
            "gap_se": runner_up["behind_selected_se"], "probability_selected_ahead": probability,
            "tied_with_selected": tied, "verdict": "separated" if separated else "tie", "text": text}


def control_picks(rows: list[dict[str, Any]], config: RankConfig) -> dict[str, Any]:
    """What simple controls would pick, beside the score: does the metric add anything to them?

    ``picks``: the candidate each figure prefers (teacher accuracy: highest; CMI alone: highest,
    as the score rewards it; the others lowest); ``score_vs_teacher_accuracy_spearman``: how
    closely the score's order follows the teacher's accuracy (-1: the same order)."""
    from scipy.stats import spearmanr

    preferences = {"teacher_accuracy": ("accuracy", max), "centroid_ce": ("centroid_ce", min),
                   "cmi": ("cmi", max), "sample_score": ("sample_score", min), "variance": ("variance", min)}
    if config.computes_authors:
        preferences["authors_score"] = ("authors_score", min)
    picks = {"score": min(rows, key=lambda r: r["score"])["name"]}
    for name, (key, choose) in preferences.items():
        usable = [r for r in rows if r.get(key) is not None]
        picks[name] = choose(usable, key=lambda r: r[key])["name"] if usable else None
    without_cmi = "centroid_ce" if config.score == "paper" else "ce"
    picks["score_without_cmi"] = min(rows, key=lambda r: r[without_cmi])["name"]
    rho = None
    scores, accuracies = [r["score"] for r in rows], [r["accuracy"] for r in rows]
    if len(rows) >= 3 and len(set(scores)) > 1 and len(set(accuracies)) > 1:  # else no rank correlation exists
        rho = float(spearmanr(scores, accuracies).statistic)
    return {"picks": picks, "score_vs_teacher_accuracy_spearman": rho}


def assign_ranks(rows: list[dict[str, Any]]) -> None:
    """``rank`` by score and ``variance_rank`` by variance, 1 = best (lowest); ties keep list order,
    a missing variance ranks last."""
    for key, rank_key in (("score", "rank"), ("variance", "variance_rank")):
        order = sorted(range(len(rows)), key=lambda i: (rows[i][key] is None, rows[i][key] or 0.0))
        for position, i in enumerate(order, start=1):
            rows[i][rank_key] = position
