"""Knowledge-distillation losses by name.

Every loss takes the student's logits, the teacher's logits (or None), the targets ((B,) class
indices or (B, K) label distributions, as CutMix makes) and an optional dict of intermediate
features, and returns a dict of named terms whose ``"loss"`` entry is optimized; feature-based
methods (CRD, attention transfer) plug in as new registry entries without touching the loop.

- ``none``: gamma * CE(student, targets)
- ``kd``: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015):
  gamma * CE(student, targets) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
- ``sqakd``: Zhao & Zhao, "SQAKD: Self-supervised Quantization-Aware Knowledge Distillation"
  (AISTATS 2024): T^2 * KL(softmax(t / T) || softmax(s / T)), no labels.
Defaults follow the paper's CIFAR scripts: gamma = 1, alpha = 2, T = 4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DaqkdError


@dataclass
class DistillConfig:
    gamma: float = 1.0  # weight of the cross-entropy with the labels
    alpha: float = 2.0  # weight of the distillation term
    temperature: float = 4.0
    label_smoothing: float = 0.0  # on the CE term with hard labels (teacher training)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE with hard (B,) or soft (B, K) targets, mean over the batch; ``label_smoothing`` ε mixes
    either with the uniform distribution: (1 - ε) * targets + ε / K."""
    if targets.ndim == 2:
        targets = targets.float()
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over the batch of KL(softmax(teacher / T) || softmax(student / T))."""
    log_p_s = F.log_softmax(student.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class DistillLoss(nn.Module):
    """Base class: ``needs_teacher`` tells the loop whether to run the teacher."""

    needs_teacher = True

    def __init__(self, config: DistillConfig) -> None:
        super().__init__()
        self.config = config


class LabelsOnly(DistillLoss):
    needs_teacher = False

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        ce = cross_entropy(student, targets, self.config.label_smoothing)
        return {"loss": self.config.gamma * ce, "ce": ce}


class HintonKD(DistillLoss):
    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        assert teacher is not None
        ce = cross_entropy(student, targets, self.config.label_smoothing)
        kd = kl_divergence(student, teacher, self.config.temperature)
        return {"loss": self.config.gamma * ce + self.config.alpha * kd, "ce": ce, "kd": kd}


class SQAKD(DistillLoss):
    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        assert teacher is not None
        kd = kl_divergence(student, teacher, self.config.temperature)
        return {"loss": kd, "kd": kd}


LOSSES: dict[str, Callable[[DistillConfig], DistillLoss]] = {
    "none": LabelsOnly,
    "kd": HintonKD,
    "sqakd": SQAKD,
}


def create_loss(name: str, config: DistillConfig | None = None) -> DistillLoss:
    if name not in LOSSES:
        raise DaqkdError(f"unknown --kd {name!r}: use one of {', '.join(LOSSES)}")
    return LOSSES[name](config or DistillConfig())
