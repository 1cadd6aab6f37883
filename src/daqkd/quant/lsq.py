"""LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020).

v_hat = round(clip(v / s, -Q_N, Q_P)) * s with a learnable step s per tensor (or per output channel
for weights). Unsigned activations: Q_N = 0, Q_P = 2^b - 1; signed: Q_N = 2^(b-1), Q_P = 2^(b-1) - 1.
Gradients (eq. 3, rounding straight-through):
  dv_hat/dv = 1 if -Q_N <= v/s <= Q_P else 0;
  dv_hat/ds = round(v/s) - v/s inside, -Q_N below, Q_P above; times the gradient scale
  g = 1 / sqrt(N Q_P) (N: weights per step size, or features per example for activations; sec. 2.2).
Initialization from the first tensor: s = 2 mean|v| / sqrt(Q_P).
1-bit signed tensors use the binary levels {-s, +s} (v_hat = s sign(v), same gradient pattern with
bounds -1, 1), since the integer grid {-1, 0} of the formula wastes a level.

The paper trains s with the weights' SGD, where g balances its updates against the weights'. The
trainer puts s in the quantizers' Adam at --quant-lr (the EWGS authors' setting for their
intervals), which divides out any constant gradient scale: g then changes nothing, and s moves by
about --quant-lr a step from its data-driven initialization.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Grid, QuantConfig, Quantizer, register_quantizer
from .functional import pass_between


class LSQFunction(torch.autograd.Function):
    """Fused LSQ forward and backward (one pass over the data each way)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, step: torch.Tensor, grad_scale: float, q_n: int, q_p: int,
                binary: bool) -> torch.Tensor:  # type: ignore[override]
        x = v / step
        if binary:
            q = torch.where(x >= 0, 1.0, -1.0).to(v.dtype)
            low, high = -1.0, 1.0
        else:
            q = x.clamp(-q_n, q_p).round_()
            low, high = float(-q_n), float(q_p)
        ctx.save_for_backward(x, q, step)
        ctx.grad_scale, ctx.bounds = grad_scale, (low, high)
        return q * step

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, q, step = ctx.saved_tensors
        low, high = ctx.bounds
        grad_v = pass_between(grad, x, low, high)
        # d/ds: q - x inside, q (the bound) outside; grad_v is grad masked to the inside
        if step.ndim:  # per channel: sum over everything but dim 0
            dims = tuple(range(1, grad.ndim))
            d_step = (grad * q).sum(dims, keepdim=True) - (grad_v * x).sum(dims, keepdim=True)
        else:
            d_step = torch.dot(grad.reshape(-1), q.reshape(-1)) - torch.dot(grad_v.reshape(-1), x.reshape(-1))
        return grad_v, d_step * ctx.grad_scale, None, None, None, None


class LSQQuantizer(Quantizer):
    """Learned step size for weights or activations."""

    def __init__(self, bits: int, is_weight: bool, channels: int | None = None) -> None:
        super().__init__(bits, is_weight, channels)
        self.step = nn.Parameter(torch.ones(channels if channels else ()))

    def bounds(self) -> tuple[int, int]:
        """(Q_N, Q_P) for the current signedness."""
        if self.is_signed:
            return 1 << (self.bits - 1), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def _binary(self) -> bool:
        return self.is_signed and self.bits == 1

    def initialize(self, x: torch.Tensor) -> None:
        q_p = 1 if self._binary() else self.bounds()[1]
        mean_abs = x.abs().mean(dim=self.reduce_dims(x), keepdim=True)
        self.step.data = (2 * mean_abs / math.sqrt(q_p)).reshape(self.step.shape).clamp_min(1e-8)

    def grid(self, weight: torch.Tensor | None = None) -> Grid:
        """Codes -Q_N..Q_P times the step; binary: codes 0, 1 for -s, +s."""
        step = self.step.detach()
        if self._binary():
            return Grid(0, 1, out_scale=2 * step, out_shift=-step, scale=step, binary=True)
        q_n, q_p = self.bounds()
        return Grid(-q_n, q_p, out_scale=step, scale=step)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        q_n, q_p = self.bounds()
        binary = self._binary()
        # N: weights per step (the layer, or one output channel), features per example for activations
        per_step = x.numel() // max(1, self.step.numel()) if self.is_weight else x[0].numel()
        grad_scale = 1.0 / math.sqrt(per_step * (1 if binary else q_p))
        step = self.step.view(self.param_shape(x)) if self.channels else self.step
        return LSQFunction.apply(x, step, grad_scale, q_n, q_p, binary)


@register_quantizer("lsq")
def lsq(bits: int, is_weight: bool, channels: int | None, config: QuantConfig) -> Quantizer:
    return LSQQuantizer(bits, is_weight, channels)
