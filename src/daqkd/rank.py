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
from .checkpoint import write_json_atomic
from .data import ImageSet
from .metric import DAStatistics, score
from .runtime import mix_seed

Progress = Callable[[str, int, int], None]  # (candidate, images done, images total)

FIGURES = ("score", "centroid_ce", "cmi", "ce", "variance", "accuracy")


@dataclass
class RankConfig:
    """What `daqkd rank` computes; every field is recorded in the report."""

    augs: list[str]
    batch_size: int = 256
    seed: int = 0
    repeats: int = 1
    cmi_weight: float = 1.0
    score: str = "paper"  # "paper": centroid_ce - w * cmi; "sample": ce - w * cmi
    variance_group: int = 1000
    variance_paired: bool = False


# torch.compile costs ~30 s on CPU; it pays off above this many teacher forwards.
COMPILE_AUTO_MIN_IMAGES = 100_000


def compile_pays(forwards: int) -> bool:
    """Whether torch.compile of a teacher pays off over this many forwards."""
    return forwards >= COMPILE_AUTO_MIN_IMAGES


def rank_and_save(teacher: nn.Module, data: ImageSet, augs: list[str], seed: int, device: torch.device,
                  path: str | Path, save: bool = True) -> dict[str, Any]:
    """Rank ``augs`` on the training split with default settings (what `train --aug auto` and
    `sweep` run) and write the report to ``path`` (when ``save``: the main process)."""
    report = rank_candidates(teacher, data, RankConfig(augs=augs, seed=seed), device,
                             compile_pays(len(data) * len(augs)))
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
             repeat: int, group_size: int, progress: Progress | None = None) -> tuple[DAStatistics, float]:
    """One pass of the split under ``candidate``: (statistics summed over processes, seconds)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(mix_seed(config.seed, repeat)))
    stats = DAStatistics(data.num_classes, group_size, runner.device)
    batches = batch_ranges(len(data), config.batch_size, rank, world)

    def prepare(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        idx = order[b * config.batch_size:(b + 1) * config.batch_size]
        generator = torch.Generator().manual_seed(mix_seed(config.seed, repeat, b))
        images = data.take(idx)
        if isinstance(images, torch.Tensor):
            images = images.to(runner.device, non_blocking=True)
        base = candidate.base_view(images, generator)
        x, targets = candidate(images, data.labels[idx].to(runner.device), generator, base=base)
        return x, targets, base if config.variance_paired else None

    # Augmentation runs inline: on CUDA its kernels queue behind the model's asynchronously; on CPU
    # a prefetch thread measured slower (its OpenMP team fights the model's for the cores).
    start = time.perf_counter()
    done = 0
    for b in batches:
        x, targets, base = prepare(b)
        logits = runner(x)
        paired = runner(base) if base is not None else None
        stats.update(logits, targets, paired)
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


def rank_candidates(model: nn.Module, data: ImageSet, config: RankConfig, device: torch.device,
                    compiled: bool = False, progress: Progress | None = None,
                    crop_size: int = 224, runner: TeacherRunner | None = None) -> dict[str, Any]:
    """Rank ``config.augs`` for ``model`` on ``data``; the report `daqkd rank` writes as JSON.

    Pass ``runner`` to reuse an already compiled and warmed-up teacher.
    """
    runner = runner or TeacherRunner(model, device, config.batch_size, compiled)
    group_size = effective_group_size(config.variance_group, len(data))
    results = []
    for name in config.augs:
        candidate = Candidate(name, data.num_classes, crop_size)
        per_repeat: dict[str, list[float]] = {k: [] for k in FIGURES}
        seconds = 0.0
        for repeat in range(config.repeats):
            stats, elapsed = run_pass(runner, data, candidate, config, repeat, group_size, progress)
            figures = stats.compute()
            figures["score"] = score(figures, config.score, config.cmi_weight)
            for key in FIGURES:
                per_repeat[key].append(figures[key])
            seconds += elapsed
        row: dict[str, Any] = {"name": name}
        for key in FIGURES:
            mean, se = summarize(per_repeat[key])
            row[key] = None if math.isnan(mean) else mean
            if config.repeats > 1:
                row[key + "_se"] = se
        row["images_per_s"] = len(data) * config.repeats / seconds
        row["seconds"] = seconds
        results.append(row)
    assign_ranks(results)
    selected = min(results, key=lambda r: r["rank"])["name"]
    return {
        "selected": selected,
        "split": None,
        "images": len(data),
        "classes": data.num_classes,
        "variance_group": group_size,
        "config": asdict(config),
        "candidates": sorted(results, key=lambda r: r["rank"]),
    }


def assign_ranks(rows: list[dict[str, Any]]) -> None:
    """``rank`` by score and ``variance_rank`` by variance, 1 = best (lowest); ties keep list order,
    a missing variance ranks last."""
    for key, rank_key in (("score", "rank"), ("variance", "variance_rank")):
        order = sorted(range(len(rows)), key=lambda i: (rows[i][key] is None, rows[i][key] or 0.0))
        for position, i in enumerate(order, start=1):
            rows[i][rank_key] = position
