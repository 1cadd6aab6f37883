"""Autograd functions shared by the quantizers: rounding with a straight-through gradient.

Written as custom autograd functions (not ``x + (round(x) - x).detach()``) so that backward keeps no
extra temporaries: fake quantization is elementwise and its cost is memory traffic.
"""

from __future__ import annotations

import math

import torch

from . import kernels


class RoundSTE(torch.autograd.Function):
    """round(x) forward; identity backward (Bengio et al. 2013, the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class SignSTE(torch.autograd.Function):
    """sign(x) with sign(0) = +1 forward; identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return RoundSTE.apply(x)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    return SignSTE.apply(x)


def quantize_unit(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's quantize_k on [0, 1]: round((2^k - 1) x) / (2^k - 1), straight-through."""
    levels = (1 << bits) - 1
    return round_ste(x * levels) / levels


def mse_clip(x: torch.Tensor, bits: int, signed: bool, dims: tuple[int, ...] | None = None,
             candidates: int = 100, max_elements: int = 1 << 16) -> torch.Tensor:
    """The clipping range c that minimizes ||Q_c(x) - x||^2 for a uniform 2^bits-level quantizer on
    [-c, c] (signed) or [0, c] (unsigned), searched over c = max|x| k / candidates, k = 1..candidates
    (the MSE range search of Banner et al., "Post training 4-bit quantization of convolutional
    networks for rapid-deployment", NeurIPS 2019; Brevitas' "mse" statistics).

    x: any shape; dims: dimensions reduced to one range each (None: all, returns a 0-d tensor; else
    the kept dimensions stay, with size 1 on ``dims``). Tensors reduced as a whole are subsampled to
    about ``max_elements`` with a fixed stride coprime with the last dimension (every image column
    gets sampled), so calibrating a large activation stays cheap.
    """
    x = x.detach().float()
    if dims is None:
        width = x.shape[-1] if x.ndim else 1
        x = x.flatten()
        if x.numel() > max_elements:
            stride = x.numel() // max_elements
            # a stride sharing a factor with the width (a power of two over 32 columns, a multiple of
            # 7 over 56) samples only some image columns; for power-of-two widths this is the next odd
            while math.gcd(stride, width) != 1:
                stride += 1
            x = x[::stride]
        dims = (0,)
        keep = False
    else:
        keep = True
    top = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12)
    levels = (1 << bits) - 1
    xs = x.unsqueeze(0)
    best = best_err = None
    # candidates in chunks of (chunk, *x.shape) elements: vectorized, with bounded memory
    for fractions in torch.arange(1, candidates + 1, dtype=x.dtype, device=x.device).div_(candidates).split(
            max(1, (1 << 24) // x.numel())):
        c = fractions.view(-1, *([1] * x.ndim)) * top
        if signed:
            step = 2 * c / levels
            q = torch.round((torch.minimum(torch.maximum(xs, -c), c) + c) / step) * step - c
        else:
            step = c / levels
            q = torch.round(torch.minimum(xs.clamp_min(0), c) / step) * step
        err = (q - xs).square().sum(dim=tuple(d + 1 for d in dims), keepdim=True)
        chunk_err, index = err.min(dim=0)
        chunk_best = c.gather(0, index.unsqueeze(0)).squeeze(0)
        if best is None:
            best, best_err = chunk_best, chunk_err
        else:  # strictly better only: ties keep the smaller range
            better = chunk_err < best_err
            best, best_err = torch.where(better, chunk_best, best), torch.where(better, chunk_err, best_err)
    return best if keep else best.reshape(())


def _cpu_bound(value: torch.Tensor | float, dtype: torch.dtype, toward: float) -> float:
    """The float next to ``value`` in ``dtype``, toward ``toward``: turns the exclusive bounds of
    hardtanh_backward into inclusive ones.

    Next to 0 lies a subnormal (-1.4e-45 in float32), which a CPU flushing denormals
    (``torch.set_flush_denormal(True)``) computes as 0 and compares as 0, so the bound 0 would turn
    exclusive again. A result between the smallest normal floats becomes the normal one beyond 0 when
    the bound is 0 or on that side (0 stays inside), else 0 (0 stays outside): only subnormal x pass
    or stop where the exact rule would not.
    """
    value = torch.as_tensor(value, dtype=dtype)
    bound = float(torch.nextafter(value, torch.tensor(toward, dtype=dtype)))
    tiny = torch.finfo(dtype).tiny
    if abs(bound) < tiny:
        exact = float(value)
        return math.copysign(tiny, toward) if exact == 0 or (exact > 0) == (toward > 0) else 0.0
    return bound


def pass_between(
    grad: torch.Tensor, x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float
) -> torch.Tensor:
    """grad where low <= x <= high, else 0 (the gradient of clamp; low and high are scalars).

    On CPU via hardtanh_backward, a float kernel: boolean masks and ``where`` run ~7x slower there
    (5.6 vs 0.75 ms for 2M elements on 2 cores), and this mask is most of a quantizer's backward.
    A compiled step takes the mask, which it fuses (the bounds' float() would break its graph).
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        inf = float("inf")
        return torch.ops.aten.hardtanh_backward(
            grad, x, _cpu_bound(low, x.dtype, -inf), _cpu_bound(high, x.dtype, inf))
    return grad.where((x >= low) & (x <= high), 0)


def sum_beyond(grad: torch.Tensor, x: torch.Tensor, bound: torch.Tensor, above: bool) -> torch.Tensor:
    """sum(grad where x > bound) (above) or sum(grad where x < bound), as a 0-d tensor."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        inf, b = float("inf"), float(bound)
        kept = (b, inf) if above else (-inf, b)
        return torch.ops.aten.hardtanh_backward(grad, x, *kept).sum()
    return grad.where(x > bound if above else x < bound, 0).sum()


class ClipQuantize(torch.autograd.Function):
    """Clip x to [low, high] and round to ``levels`` uniform levels on it, in x's units:
    y = low + round((clip(x, low, high) - low) / s) s, s = (high - low) / (levels - 1).

    Backward, straight through the rounding: dy/dx = 1 on [low, high], else 0; dy/dhigh = 1 above
    high and dy/dlow = 1 below low (the clip's gradient, PACT eq. 3), so a learnable clip level gets
    sum(g where x > high). low and high are 0-d tensors. One fused function instead of a chain of
    autograd ops: fake quantization is memory-bound, and the chain cost ~2x the passes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, levels: int) -> torch.Tensor:  # type: ignore[override]
        fused = kernels.run_fused(kernels.clip_forward, x, low, high, levels) if kernels.use_fused(x) else None
        if fused is None:
            step = (high - low) / (levels - 1)
            fused = x.clamp(low, high).sub_(low).div_(step).round_().mul_(step).add_(low)
        ctx.save_for_backward(x, low, high)
        return fused

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, low, high = ctx.saved_tensors
        fused = kernels.run_fused(kernels.clip_backward, grad, x, low, high) if kernels.use_fused(x) else None
        if fused is not None:
            grad_x, below, above = fused
            return (grad_x, below.reshape(low.shape) if ctx.needs_input_grad[1] else None,
                    above.reshape(high.shape) if ctx.needs_input_grad[2] else None, None)
        grad_low = grad_high = None
        if ctx.needs_input_grad[2]:
            grad_high = sum_beyond(grad, x, high, above=True).reshape(high.shape)
        if ctx.needs_input_grad[1]:
            grad_low = sum_beyond(grad, x, low, above=False).reshape(low.shape)
        return pass_between(grad, x, low, high), grad_low, grad_high, None


def clip_quantize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """:class:`ClipQuantize` with 2^bits levels."""
    return ClipQuantize.apply(x, low, high, 1 << bits)
