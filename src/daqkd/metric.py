"""The DA-ranking metric of Kur & Zhao (arXiv 2509.03850) and the variance baseline, streamed.

For teacher predictions P_x (softmax) and label distributions t_x (one-hot, or CutMix's soft
labels) over the N samples of one pass:

- class centroid  Q_y = sum_x t_x[y] P_x / m_y,  label mass  m_y = sum_x t_x[y],  w_y = m_y / N;
- ``cmi`` = I(X; Y_hat | Y) = sum_y w_y H(Q_y) - mean_x H(P_x)  (the contextual mutual information;
  with one-hot labels it equals mean_x KL(P_x || Q_{y_x}); it is >= 0 by concavity of H);
- ``centroid_ce`` = mean over classes present of -log Q_y[y];
- ``score`` = centroid_ce - lambda * cmi (the paper's metric; lower is better);
- ``ce`` = mean_x of -sum_y t_x[y] log P_x[y]; ``sample`` score = ce - lambda * cmi (the variant the
  authors' CIFAR script ranks by);
- ``authors_cmi`` (only with ``reference_centroids``): mean_x KL(P_x || sum_y t_x[y] C_y) against a
  centroid matrix C from a *separate* pass, as the authors' code computes it (see
  :meth:`DAStatistics.authors_centroids`); ``authors`` score = ce - lambda * authors_cmi;
- ``variance``: the baseline of Wang et al., "What Makes a 'Good' Data Augmentation in Knowledge
  Distillation - A Statistical Perspective", NeurIPS 2022: the mean over classes of the standard
  deviation (unbiased) across consecutive groups of ``group_size`` samples of the group's mean
  teacher probability vector.

All of it comes from sufficient statistics updated batch by batch (no predictions are stored, one
pass is enough, and the centroids belong to the very draw that is scored); the statistics of
disjoint shards add up (:meth:`DAStatistics.merge`, :meth:`DAStatistics.all_reduce`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_TINY = 1e-300  # keeps log() finite where a probability underflowed to 0 in float64


@dataclass
class DAStatistics:
    """Sufficient statistics of the teacher's predictions under one DA (float64 on ``device``).

    Variance groups are consecutive runs of ``group_size`` samples in update order; a trailing
    incomplete group is not counted. Merged shards keep their own groups (their trailing
    incomplete groups are dropped), so shards cut at multiples of ``group_size`` merge exactly.
    """

    num_classes: int
    group_size: int = 1000
    device: torch.device | str = "cpu"
    count: int = 0
    correct: float = 0.0
    entropy_sum: float = 0.0
    ce_sum: float = 0.0
    label_mass: torch.Tensor = field(init=False)
    weighted_probs: torch.Tensor = field(init=False)
    group_partial: torch.Tensor = field(init=False)
    group_fill: int = 0
    groups: int = 0
    group_mean_sum: torch.Tensor = field(init=False)
    group_mean_sq_sum: torch.Tensor = field(init=False)
    reference_centroids: torch.Tensor | None = None  # (K, K) row y: centroid mixed by t_x[y] (authors' variant)
    blocks: int = 0  # jackknife blocks: per-block copies of the sums (0: none)

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError("group_size must be >= 1")
        k, opts = self.num_classes, {"dtype": torch.float64, "device": self.device}
        self.label_mass = torch.zeros(k, **opts)
        self.weighted_probs = torch.zeros(k, k, **opts)  # row y: sum_x t_x[y] P_x
        self.group_partial = torch.zeros(k, **opts)
        self.group_mean_sum = torch.zeros(k, **opts)
        self.group_mean_sq_sum = torch.zeros(k, **opts)
        self._sums = torch.zeros(4, **opts)  # correct, entropy, ce, KL to reference: on device, no syncs
        if self.reference_centroids is not None:
            self.reference_centroids = self.reference_centroids.to(**opts)
        j = self.blocks
        self.block_count = torch.zeros(j, **opts)
        self.block_sums = torch.zeros(j, 4, **opts)
        self.block_mass = torch.zeros(j, k, **opts)
        self.block_weighted = torch.zeros(j, k, k, **opts)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor,
               paired_logits: torch.Tensor | None = None, block_ids: torch.Tensor | None = None) -> None:
        """Add a batch.

        logits (B, K) teacher outputs; targets (B,) int64 class indices or (B, K) label
        distributions (rows sum to 1). paired_logits (B, K): outputs on a second view of the same
        images, which then shares each variance group (Wang et al.'s paired protocol).
        block_ids (B,) int64 in [0, blocks): each sample's jackknife block (needed when blocks > 0).
        """
        log_p = torch.log_softmax(logits.double(), dim=1)
        probs = log_p.exp()
        if targets.ndim == 1:
            target_idx = targets.long()
            soft = torch.nn.functional.one_hot(target_idx, self.num_classes).double()
            self.weighted_probs.index_add_(0, target_idx, probs)
        else:
            soft = targets.double()
            target_idx = soft.argmax(dim=1)
            self.weighted_probs += soft.T @ probs
        self.label_mass += soft.sum(dim=0)
        per_sample = torch.stack([
            (probs.argmax(dim=1) == target_idx).double(),  # correct
            -(probs * log_p).sum(dim=1),  # entropy
            -(soft * log_p).sum(dim=1),  # cross-entropy
            torch.zeros_like(log_p[:, 0]),  # KL to the label-mixed reference centroid
        ], dim=1)
        if self.reference_centroids is not None:
            mixed = soft @ self.reference_centroids  # (B, K): each sample's label-mixed centroid
            per_sample[:, 3] = (probs * (log_p - mixed.clamp_min(_TINY).log())).sum(dim=1)
        self._sums += per_sample.sum(dim=0)
        if self.blocks:
            if block_ids is None:
                raise ValueError("block_ids are needed when blocks > 0")
            # the block list is read from the ids where they were made (the host, in rank), so a
            # CUDA pass does not wait for the device once per batch
            present_blocks = block_ids.unique().tolist()
            block_ids = block_ids.to(probs.device)
            self.block_count.index_add_(0, block_ids, torch.ones_like(per_sample[:, 0]))
            self.block_sums.index_add_(0, block_ids, per_sample)
            self.block_mass.index_add_(0, block_ids, soft)
            # blocks are contiguous runs of the pass, so a batch touches one or two of them
            for block in present_blocks:
                rows = block_ids == block
                self.block_weighted[block] += soft[rows].T @ probs[rows]
        self.count += logits.shape[0]
        group_values = probs
        if paired_logits is not None:
            group_values = 0.5 * (probs + torch.softmax(paired_logits.double(), dim=1))
        self._add_to_groups(group_values)

    def _add_to_groups(self, values: torch.Tensor) -> None:
        """Feed (B, K) per-sample vectors into consecutive groups of ``group_size``."""
        start = 0
        n = values.shape[0]
        if self.group_fill:
            take = min(self.group_size - self.group_fill, n)
            self.group_partial += values[:take].sum(dim=0)
            self.group_fill += take
            start = take
            if self.group_fill == self.group_size:
                self._close_group(self.group_partial / self.group_size)
                self.group_partial.zero_()
                self.group_fill = 0
        full = (n - start) // self.group_size
        if full:
            block = values[start:start + full * self.group_size]
            means = block.view(full, self.group_size, -1).mean(dim=1)
            self.group_mean_sum += means.sum(dim=0)
            self.group_mean_sq_sum += (means * means).sum(dim=0)
            self.groups += full
            start += full * self.group_size
        if start < n:
            self.group_partial += values[start:].sum(dim=0)
            self.group_fill += n - start

    def _close_group(self, mean: torch.Tensor) -> None:
        self.group_mean_sum += mean
        self.group_mean_sq_sum += mean * mean
        self.groups += 1

    def merge(self, other: DAStatistics) -> DAStatistics:
        """Statistics of the union of two disjoint shards (a new object)."""
        if (other.num_classes, other.group_size) != (self.num_classes, self.group_size):
            raise ValueError("can only merge statistics with the same classes and group size")
        if other.blocks != self.blocks:
            raise ValueError("can only merge statistics with the same number of jackknife blocks")
        out = DAStatistics(self.num_classes, self.group_size, self.device, reference_centroids=self.reference_centroids,
                           blocks=self.blocks)
        out.count = self.count + other.count
        out._sums = self._sums + other._sums.to(self.device)
        for name in ("label_mass", "weighted_probs", "group_mean_sum", "group_mean_sq_sum", *_BLOCK_FIELDS):
            setattr(out, name, getattr(self, name) + getattr(other, name).to(self.device))
        out.groups = self.groups + other.groups
        return out

    def all_reduce(self) -> None:
        """Sum the statistics of all processes in place (torch.distributed, if initialized)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        counts = torch.tensor([self.count, self.groups], dtype=torch.float64, device=self.device)
        for tensor in (counts, self._sums, self.label_mass, self.weighted_probs,
                       self.group_mean_sum, self.group_mean_sq_sum, *(getattr(self, f) for f in _BLOCK_FIELDS)):
            dist.all_reduce(tensor)
        self.count, self.groups = int(counts[0]), int(counts[1])
        self.group_partial.zero_()
        self.group_fill = 0

    def compute(self) -> dict[str, float]:
        """cmi, centroid_ce, ce, variance (NaN with fewer than 2 groups), accuracy, images."""
        if self.count == 0:
            raise ValueError("no samples were added")
        base = {k: float(v) for k, v in _figures(torch.tensor(float(self.count), dtype=torch.float64),
                                                 self._sums.cpu(), self.label_mass.cpu(),
                                                 self.weighted_probs.cpu()).items()}
        variance = math.nan
        if self.groups >= 2:
            g = self.groups
            mean = self.group_mean_sum / g
            var = (self.group_mean_sq_sum - g * mean * mean).clamp_min(0) / (g - 1)
            variance = float(var.sqrt().mean())
        figures = {
            "cmi": base["cmi"],
            "centroid_ce": base["centroid_ce"],
            "ce": base["ce"],
            "variance": variance,
            "variance_groups": float(self.groups),
            "accuracy": base["accuracy"],
            "images": float(self.count),
        }
        if self.reference_centroids is not None:
            figures["authors_cmi"] = base["authors_cmi"]
        return figures

    def jackknife(self) -> dict[str, torch.Tensor] | None:
        """Leave-one-block-out values of cmi, centroid_ce, ce, accuracy (and authors_cmi): each a
        (J,) float64 tensor over the J non-empty blocks; None with fewer than 2 of them.

        The delete-a-group jackknife (Quenouille; Efron & Stein 1981): the figures are smooth
        functions of sums over samples, so the figure recomputed without block j, for every j,
        gives the standard error sqrt((J - 1) / J * sum_j (theta_j - mean theta)^2) (see
        :func:`jackknife_se`) with no extra teacher pass.
        """
        used = self.block_count > 0
        if int(used.sum()) < 2:
            return None
        loo = _figures(self.block_count[used].sum() - self.block_count[used],
                       self.block_sums[used].sum(0) - self.block_sums[used],
                       self.block_mass[used].sum(0) - self.block_mass[used],
                       self.block_weighted[used].sum(0) - self.block_weighted[used])
        if self.reference_centroids is None:
            del loo["authors_cmi"]
        return {k: v.cpu() for k, v in loo.items()}

    def authors_centroids(self, soft_labels: bool) -> torch.Tensor:
        """The centroid matrix as the authors' code builds it from this pass, (K, K) float64.

        One-hot labels: row y is the centroid Q_y = sum_x t_x[y] P_x / m_y. Soft labels (CutMix):
        their ``einsum("bi,bj->ij", p, y)`` puts predictions in rows and labels in columns and
        divides by the label mass of the *row* index, i.e. ``weighted_probs.T / m[:, None]``, the
        transpose of the centroids with the wrong normalization. Reproduced as published, for
        :func:`score` ``"authors"``; not a recommendation.
        """
        mass = self.label_mass.clamp_min(_TINY)[:, None]
        return (self.weighted_probs.T if soft_labels else self.weighted_probs) / mass


_BLOCK_FIELDS = ("block_count", "block_sums", "block_mass", "block_weighted")


def _figures(
    count: torch.Tensor, sums: torch.Tensor, mass: torch.Tensor, weighted: torch.Tensor
) -> dict[str, torch.Tensor]:
    """cmi, centroid_ce, ce, accuracy, authors_cmi from sums, batched over leading dimensions.

    count (...,); sums (..., 4): correct, entropy, ce, KL to reference; mass (..., K) label mass;
    weighted (..., K, K): row y = sum_x t_x[y] P_x. Classes without label mass are left out of
    the centroid CE's mean and weigh 0 in the CMI.
    """
    present = mass > 0
    centroids = weighted / mass.clamp_min(_TINY)[..., None]
    centroid_entropy = -(centroids * centroids.clamp_min(_TINY).log()).sum(dim=-1)
    weights = mass / mass.sum(dim=-1, keepdim=True)
    own = torch.diagonal(centroids, dim1=-2, dim2=-1)  # Q_y[y]
    own_ce = torch.where(present, -own.clamp_min(_TINY).log(), torch.zeros_like(own))
    return {
        "cmi": (weights * centroid_entropy).sum(dim=-1) - sums[..., 1] / count,
        "centroid_ce": own_ce.sum(dim=-1) / present.sum(dim=-1),
        "ce": sums[..., 2] / count,
        "accuracy": sums[..., 0] / count,
        "authors_cmi": sums[..., 3] / count,
    }


def jackknife_se(leave_one_out: torch.Tensor) -> float:
    """Jackknife standard error from J leave-one-block-out values: sqrt((J-1)/J sum (t_j - mean)^2)."""
    j = leave_one_out.numel()
    centred = leave_one_out - leave_one_out.mean()
    return math.sqrt((j - 1) / j * float((centred * centred).sum()))


def variance_standard_error(variance: float, groups: int) -> float | None:
    """Standard error of the variance baseline from ``groups`` group means.

    Per class, the sample standard deviation s of g normal values has SE ~ s / sqrt(2 (g - 1))
    (the group means average ``group_size`` predictions, so they are close to normal); the
    baseline averages s over classes, and the SE of an average is at most the average of the SEs
    whatever the classes' correlation, so variance / sqrt(2 (g - 1)) bounds it. None below 2 groups.
    """
    if groups < 2 or variance is None or math.isnan(variance):
        return None
    return variance / math.sqrt(2 * (groups - 1))


SCORES = ("paper", "sample", "authors")


def score_formula(kind: str = "paper", cmi_weight: float = 1.0) -> str:
    """:func:`score` in words, for labels: ``"centroid CE - CMI"``, ``"CE - 0.5 x CMI"``, ..."""
    first, cmi = {"paper": ("centroid CE", "CMI"), "sample": ("CE", "CMI"), "authors": ("CE", "authors' CMI")}[kind]
    return f"{first} - {cmi}" if cmi_weight == 1 else f"{first} - {cmi_weight:g} x {cmi}"


def score(figures: dict[str, float], kind: str = "paper", cmi_weight: float = 1.0) -> float:
    """The ranking score, lower is better: ``paper`` = centroid_ce - w * cmi, ``sample`` = ce - w * cmi,
    ``authors`` = ce - w * authors_cmi (their code: per-sample KL to centroids of a separate pass)."""
    if kind == "paper":
        return figures["centroid_ce"] - cmi_weight * figures["cmi"]
    if kind == "sample":
        return figures["ce"] - cmi_weight * figures["cmi"]
    if kind == "authors":
        return figures["ce"] - cmi_weight * figures["authors_cmi"]
    raise ValueError(f"unknown score {kind!r}: use one of {', '.join(SCORES)}")
