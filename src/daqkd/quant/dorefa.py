"""DoReFa-Net (Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with
Low Bitwidth Gradients", arXiv 1606.06160, 2016) and plain uniform quantization with STE.

quantize_k(r) = round((2^k - 1) r) / (2^k - 1) for r in [0, 1], straight-through gradient.

DoReFa weights (eq. 9): k > 1: w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1;
k = 1: w_q = sign(w) E|w| (eq. 7), gradient straight through sign.
Activations: quantize_k(clip(x, 0, 1)); signed inputs: 2 quantize_k(clip((x + 1) / 2, 0, 1)) - 1.

``ste``: plain uniform quantization with a straight-through gradient and no learned parameters:
w_q = max|w| (2 quantize_k(w / (2 max|w|) + 1/2) - 1) (k = 1 as above); activations on [0, r]
(or [-r, r] if signed) with r = max|x| of the first batch (calibration), r x_q where
x_q = quantize_k(clip(x / r, 0, 1)).
"""

from __future__ import annotations

import torch

from .base import Grid, QuantConfig, Quantizer, range_grid, register_quantizer
from .functional import clip_quantize, quantize_unit, sign_ste


def quantize_activation_range(
    x: torch.Tensor, bits: int, signed: bool, top: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Clip to [0, top] (or [-top, top] if signed) and quantize to 2^bits levels, straight-through."""
    high = torch.as_tensor(top, dtype=x.dtype, device=x.device)
    return clip_quantize(x, -high if signed else high.new_zeros(()), high, bits)


def binary_weight(w: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """sign(w) * mean|w| over ``dims`` (the scale carries no gradient, as in DoReFa)."""
    return sign_ste(w) * w.abs().mean(dim=dims, keepdim=True).detach()


def unit_weight_grid(bits: int, scale: torch.Tensor | float) -> Grid:
    """The grid of scale (2 quantize_k(.) - 1): codes 0..2^k - 1."""
    scale = torch.as_tensor(scale, dtype=torch.float32).detach()
    top = (1 << bits) - 1
    return Grid(0, top, out_scale=2 * scale / top, out_shift=-scale)


def binary_weight_grid(w: torch.Tensor, dims: tuple[int, ...]) -> Grid:
    """The grid of :func:`binary_weight`: codes 0, 1 for -mean|w|, +mean|w| (per channel if dims
    leave one)."""
    mean = w.detach().abs().mean(dim=dims)
    return Grid(0, 1, out_scale=2 * mean, out_shift=-mean)


class DoReFaQuantizer(Quantizer):
    """DoReFa weights (tanh-normalized) or activations (clipped to [0, 1])."""

    def grid(self, weight: torch.Tensor | None = None) -> Grid:
        if not self.is_weight:
            return range_grid(-1.0 if self.is_signed else 0.0, 1.0, self.bits)
        if self.bits == 1:
            assert weight is not None, "DoReFa's binary weight grid depends on the weight"
            return binary_weight_grid(weight, self.reduce_dims(weight))
        return unit_weight_grid(self.bits, 1.0)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_weight:
            return quantize_activation_range(x, self.bits, self.is_signed)
        dims = self.reduce_dims(x)
        if self.bits == 1:
            return binary_weight(x, dims)
        t = torch.tanh(x)
        t = t / (2 * t.abs().amax(dim=dims, keepdim=True)) + 0.5
        return 2 * quantize_unit(t, self.bits) - 1


class UniformSTEQuantizer(Quantizer):
    """Uniform quantization of max|w|-normalized weights and of activations on a range calibrated
    from the first batch, straight-through gradients."""

    def __init__(self, bits: int, is_weight: bool, channels: int | None = None) -> None:
        super().__init__(bits, is_weight, channels)
        self.register_buffer("act_range", torch.tensor(1.0))

    def initialize(self, x: torch.Tensor) -> None:
        if not self.is_weight:
            self.act_range.fill_(float(x.abs().max().clamp_min(1e-8)))

    def grid(self, weight: torch.Tensor | None = None) -> Grid:
        if not self.is_weight:
            top = self.act_range.detach()
            return range_grid(-top if self.is_signed else 0.0, top, self.bits)
        assert weight is not None, "the STE weight grid depends on the weight"
        dims = self.reduce_dims(weight)
        if self.bits == 1:
            return binary_weight_grid(weight, dims)
        return unit_weight_grid(self.bits, weight.detach().abs().amax(dim=dims).clamp_min(1e-12))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_weight:
            return quantize_activation_range(x, self.bits, self.is_signed, self.act_range)
        dims = self.reduce_dims(x)
        if self.bits == 1:
            return binary_weight(x, dims)
        scale = x.abs().amax(dim=dims, keepdim=True).detach().clamp_min(1e-12)
        return scale * (2 * quantize_unit((x / (2 * scale) + 0.5).clamp(0, 1), self.bits) - 1)


@register_quantizer("dorefa")
def dorefa(bits: int, is_weight: bool, channels: int | None, config: QuantConfig) -> Quantizer:
    return DoReFaQuantizer(bits, is_weight, channels)


@register_quantizer("ste")
def ste(bits: int, is_weight: bool, channels: int | None, config: QuantConfig) -> Quantizer:
    return UniformSTEQuantizer(bits, is_weight, channels)
