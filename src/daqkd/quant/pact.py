"""PACT (Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural Networks",
arXiv 1805.06085, 2018).

Activations: y = clip(x, 0, alpha), y_q = round(y (2^k - 1) / alpha) alpha / (2^k - 1) (eq. 1-2),
with alpha learnable: dy_q/dalpha = 1 where x >= alpha, else 0 (eq. 3, rounding straight-through);
dy_q/dx = 1 on [0, alpha). Signed inputs clip to [-alpha, alpha] (dy_q/dalpha = -1 where x <= -alpha).
alpha starts at 10 (the paper's initialization) and is meant for L2 regularization: it is put in the
``quantizer_decay`` parameter group (see daqkd.quant.split_parameters).
Weights: DoReFa's, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Grid, QuantConfig, Quantizer, range_grid, register_quantizer
from .dorefa import DoReFaQuantizer
from .functional import clip_quantize


class PACTActivationQuantizer(Quantizer):
    """Learnable clipping level ``alpha`` (a scalar), uniform levels below it."""

    l2_parameters = ("alpha",)

    def __init__(self, bits: int, alpha: float = 10.0) -> None:
        super().__init__(bits, is_weight=False)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def grid(self, weight: torch.Tensor | None = None) -> Grid:
        alpha = self.alpha.detach()
        return range_grid(-alpha if self.is_signed else 0.0, alpha, self.bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        low = -self.alpha if self.is_signed else self.alpha.new_zeros(())
        return clip_quantize(x, low, self.alpha, self.bits)


@register_quantizer("pact")
def pact(bits: int, is_weight: bool, channels: int | None, config: QuantConfig) -> Quantizer:
    if is_weight:
        return DoReFaQuantizer(bits, True, channels)
    return PACTActivationQuantizer(bits, config.pact_alpha)
