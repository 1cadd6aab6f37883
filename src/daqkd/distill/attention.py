"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017), ``--kd at``.

For a feature map F (B, C, H, W), the spatial attention map is Q = vec(mean_c F^2) (B, H*W),
normalized per image to unit L2 norm. The loss, summed over the chosen layers j (default: every
residual stage):
    gamma * CE(student, targets) + beta * sum_j mean_{b, i} (Q_s[b, i] - Q_t[b, i])^2
with beta = 1000 by default (the setting of RepDistiller, Tian et al. 2020, from which the
authors' KD experiments come). Student and teacher may differ in channels, not in H x W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import DistillLoss, cross_entropy, feature_pairs, register_loss, stage_outputs

DEFAULT_BETA = 1000.0


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): channel mean of the squared activations, unit L2 norm per image."""
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


@register_loss("at")
class AttentionTransfer(DistillLoss):
    uses_features = True

    def feature_layers(self, model: nn.Module) -> tuple[str, ...]:
        return self.config.layers or stage_outputs(model)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                features: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        assert features is not None
        ce = cross_entropy(student, targets, self.config.label_smoothing)
        at = torch.stack([((attention_map(s) - attention_map(t)) ** 2).mean()
                          for _, s, t in feature_pairs(features, "at", same_size=True)]).sum()
        beta = DEFAULT_BETA if self.config.beta is None else self.config.beta
        return {"loss": self.config.gamma * ce + beta * at, "ce": ce, "at": at}
