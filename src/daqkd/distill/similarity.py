"""Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV
2019), ``--kd sp``.

For a feature map F (B, C, H, W) flattened to A (B, C*H*W), the batch similarity G = A A^T
(B, B) with each row L2-normalized. The loss, over the chosen layers j (default: the last residual
stage, as in the paper's CIFAR experiments):
    gamma * CE(student, targets) + beta * sum_j ||G_s - G_t||_F^2 / B^2
with beta = 3000 by default (RepDistiller's setting). Student and teacher may differ in shape:
only the B x B similarities are compared. Under torch.distributed B is the global batch: each
process gathers every process's features (differentiably), so the loss and its gradient do not
depend on the number of processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import world_size
from . import DistillLoss, cross_entropy, feature_pairs, register_loss, stage_outputs

DEFAULT_BETA = 3000.0


def batch_similarity(features: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B): the Gram matrix of the flattened features, rows at unit L2 norm."""
    flat = features.float().flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def global_batch(features: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...): every process's features, in rank order, with gradients flowing
    back to each process's own part (torch.distributed.nn's all_gather); itself in one process.
    The order does not matter to the loss: ||G_s - G_t|| is invariant to permuting the batch."""
    if world_size() == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features.contiguous()))


@register_loss("sp")
class SimilarityPreserving(DistillLoss):
    uses_features = True

    def feature_layers(self, model: nn.Module) -> tuple[str, ...]:
        return self.config.layers or stage_outputs(model)[-1:]

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                features: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        assert features is not None
        ce = cross_entropy(student, targets, self.config.label_smoothing)
        terms = []
        for _, s, t in feature_pairs(features, "sp", same_size=False):
            s, t = global_batch(s), global_batch(t)
            terms.append(((batch_similarity(s) - batch_similarity(t)) ** 2).sum() / s.shape[0] ** 2)
        sp = torch.stack(terms).sum()
        beta = DEFAULT_BETA if self.config.beta is None else self.config.beta
        return {"loss": self.config.gamma * ce + beta * sp, "ce": ce, "sp": sp}
