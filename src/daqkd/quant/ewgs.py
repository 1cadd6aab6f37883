"""EWGS (Lee, Kim & Ham, "Network Quantization with Element-wise Gradient Scaling", CVPR 2021),
the quantizer of the paper's CIFAR runs.

Per layer, learnable intervals [l, u] for weights and for activations:
  x_n = clip((x - l) / (u - l), 0, 1),  x_q = round((2^b - 1) x_n) / (2^b - 1);
weights are then mapped to [-1, 1] (2 x_q - 1) and activations stay in [0, 1]; a learnable output
scale |alpha| multiplies the layer's output (folded into the weights here, which is the same for a
linear op). The paper only quantizes activations after a ReLU (l ~ 0, so x_q is x rescaled); inputs
that can be negative (signed) are mapped back to l + (u - l) x_q instead, because the affine offset
of an unsigned code would shift every output.
Backward of the discretizer (eq. 5), element-wise gradient scaling:
  g_n = g_q (1 + delta sign(g_q) (x_n - x_q)).
delta either from the Hessian (sec. 3.3; the default, as in the authors' code):
  delta = max(0, (Tr(H) / N) / (3 std(g_q))), Tr(H) by Hutchinson's estimator,
starting at 0 and updated with :func:`update_ewgs_delta` at the start of epochs delta_every,
2 delta_every, ... (their CIFAR train_quant.py: use_hessian True, update_every 10, first update at
epoch 10), or fixed (0 = straight-through with learnable intervals, their --baseline gradient).
Initialization from one batch as the authors' code: u_W = 3 std(w), l_W = -3 std(w);
u_A = 3 std(x) / sqrt(1 - 2/pi), l_A = min(x); alpha = mean|FP output| / mean|quantized output|.
``init="mse"`` instead sets u = c (l = -c for weights and signed inputs) with c the range of least
quantization error at the layer's bit width (see functional.mse_clip): the 3-sigma intervals are
tuned for 2-4 bits and clip a pretrained model's large weights at 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import replicated_batches
from . import kernels
from .base import FP_BITS, Grid, QuantConfig, Quantizer, register_quantizer
from .functional import mse_clip, pass_between


class EWGSQuantize(torch.autograd.Function):
    """x_n = clip((x - l) / (u - l), 0, 1), x_q = round((levels - 1) x_n) / (levels - 1); returns x_q.

    Backward (EWGS eq. 5 for the discretizer, exact derivatives for the normalization):
      g_n = g (1 + delta sign(g) (x_n - x_q)) where 0 <= (x - l) / (u - l) <= 1, else 0;
      dL/dx = g_n / (u - l);  dL/dl = sum(g_n (x_n - 1)) / (u - l);  dL/du = -sum(g_n x_n) / (u - l).
    l and u are 0-d or shaped to broadcast against x (per output channel); their gradients are
    summed to that shape. Fused by hand: the chain of autograd ops it replaces cost 1.6x the FP step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, levels: int,
                delta: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        width = upper - lower
        top = levels - 1
        fused = kernels.run_fused(kernels.ewgs_forward, x, lower, width, top) if (
            width.ndim == 0 and kernels.use_fused(x)) else None
        if fused is not None:
            q, scaled = fused
        else:
            scaled = (x - lower).div_(width / top)  # x_n (levels - 1): one pass less than x_n itself
            q = scaled.clamp(0, top).round_().div_(top)
        ctx.fused = fused is not None
        # q is kept anyway (the next op's input); scaled is the one extra tensor
        ctx.save_for_backward(scaled, width, q if delta is not None else None, delta)
        ctx.top, ctx.lower_shape, ctx.upper_shape = top, lower.shape, upper.shape
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        scaled, width, q, delta = ctx.saved_tensors
        top = ctx.top
        if ctx.fused and kernels.use_fused(scaled):
            fused = kernels.run_fused(kernels.ewgs_backward, grad, scaled, q, width, delta, top)
            if fused is not None:
                grad_x, weighted, total = fused
                return (grad_x, ((weighted - total) / width).reshape(ctx.lower_shape),
                        (-weighted / width).reshape(ctx.upper_shape), None, None)
        return EWGSQuantize._eager_backward(ctx, grad)

    @staticmethod
    def _eager_backward(ctx, grad: torch.Tensor):
        scaled, width, q, delta = ctx.saved_tensors
        top = ctx.top
        if delta is not None:  # element-wise gradient scaling; x_n - x_q wherever it counts
            grad = grad + (delta / top) * grad.abs() * (scaled - q * top)
        grad_n = pass_between(grad, scaled, 0.0, float(top))
        grad_lower = grad_upper = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # grad_n is 0 outside [0, 1], so x_n can stand for the clipped value in these sums
            if width.ndim == 0:
                weighted = torch.dot(grad_n.reshape(-1), scaled.reshape(-1)) / top
                total = grad_n.sum()
            else:
                dims = tuple(i for i, n in enumerate(width.shape) if n == 1)
                weighted = (grad_n * scaled).sum(dims, keepdim=True) / top
                total = grad_n.sum(dims, keepdim=True)
            grad_lower = ((weighted - total) / width).reshape(ctx.lower_shape)
            grad_upper = (-weighted / width).reshape(ctx.upper_shape)
        return grad_n.div_(width), grad_lower, grad_upper, None, None


class EWGSQuantizer(Quantizer):
    """Learnable interval [lower, upper]; weights also carry the layer's output scale."""

    def __init__(self, bits: int, is_weight: bool, channels: int | None = None, delta: float | None = 0.0,
                 init: str = "paper", delta_every: int = 10, values: bool = False,
                 hessian_batches: int = 3, hessian_probes: int = 4) -> None:
        super().__init__(bits, is_weight, channels)
        self.init = init
        # unsigned activations give q in [0, 1] and leave the scale (u - l) to the weight quantizer's
        # calibrated alpha; beside full-precision weights nothing would, so they give l + (u - l) q
        self.values = values and not is_weight
        self.calibrates_output = is_weight
        self.delta_every = max(1, delta_every)
        self.hessian_batches, self.hessian_probes = hessian_batches, hessian_probes
        shape = channels if channels else ()
        self.lower = nn.Parameter(torch.zeros(shape))
        self.upper = nn.Parameter(torch.ones(shape))
        if is_weight:
            self.output_scale = nn.Parameter(torch.tensor(1.0))
        # delta is state (updated from the Hessian), not a trained parameter
        self.register_buffer("delta", torch.tensor(float(delta or 0.0)))
        self.hessian_delta = delta is None
        self.fixed_delta = float(delta or 0.0)
        self.capture: list[torch.Tensor] | None = None  # set by update_ewgs_delta

    def initialize(self, x: torch.Tensor) -> None:
        dims = self.reduce_dims(x)
        std = x.std(dim=dims, keepdim=True) if self.channels else x.std()
        if self.init == "mse":
            signed = self.is_weight or self.is_signed
            upper = mse_clip(x, self.bits, signed, dims if self.channels else None)
            lower = -upper if signed else x.min()
        elif self.is_weight:
            upper, lower = 3 * std, -3 * std
        else:
            upper = 3 * x.std() / math.sqrt(1 - 2 / math.pi)
            lower = x.min()
        self.upper.data = upper.reshape(self.upper.shape).clone()
        self.lower.data = torch.minimum(lower.reshape(self.lower.shape), self.upper.data - 1e-6).clone()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.param_shape(x)
        lower = self.lower.view(shape) if self.channels else self.lower
        upper = self.upper.view(shape) if self.channels else self.upper
        # the residual x_n - x_q is only needed (and kept) when delta can be non-zero
        delta = self.delta if self.hessian_delta or self.fixed_delta != 0 else None
        q = EWGSQuantize.apply(x, lower, upper, 1 << self.bits, delta)
        if self.capture is not None:
            self.capture.append(q)
        if self.is_weight:
            return (2 * q - 1) * self.output_scale.abs()
        if self.is_signed or self.values:
            return lower + (upper - lower) * q
        return q

    def grid(self, weight: torch.Tensor | None = None) -> Grid:
        """Codes 0..2^b - 1: weights (2 q / top - 1) |alpha| (one alpha per layer even with per-channel
        intervals), signed inputs l + (u - l) q / top, others q / top after the shift by l."""
        top = (1 << self.bits) - 1
        if self.is_weight:
            alpha = self.output_scale.detach().abs()
            return Grid(0, top, out_scale=2 * alpha / top, out_shift=-alpha)
        lower = self.lower.detach()
        step = (self.upper.detach() - lower) / top
        if self.is_signed or self.values:
            return Grid(0, top, out_scale=step, out_shift=lower, scale=step, shift=lower)
        return Grid(0, top, out_scale=torch.tensor(1.0 / top), scale=step, shift=lower)

    def calibrate_output(self, fp_out: torch.Tensor, quant_out: torch.Tensor) -> None:
        """alpha = mean|FP output| / mean|quantized output| on the first batch."""
        ratio = fp_out.abs().mean() / quant_out.abs().mean().clamp_min(1e-12)
        self.output_scale.data = (self.output_scale.data.abs() * ratio).reshape(())


    @classmethod
    def on_epoch_start(cls, model: nn.Module, epoch: int,
                       sample_batches: Callable[[int, int], list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """The Hessian-based delta at the start of epochs ``delta_every``, 2 ``delta_every``, ... (0
        before, as the authors' schedule), from the epoch's first ``hessian_batches`` training batches
        (each cut to HESSIAN_MAX_IMAGES) and the label CE (the KD term would need the teacher per batch)."""
        hessian = [m for m in model.modules() if isinstance(m, cls) and m.hessian_delta]
        if hessian and epoch > 0 and epoch % hessian[0].delta_every == 0:
            update_ewgs_delta(model, _cross_entropy, sample_batches(hessian[0].hessian_batches, HESSIAN_MAX_IMAGES),
                              probes=hessian[0].hessian_probes)


# Images per Hessian batch, at most: the authors' CIFAR batch. The pass runs in float32 with a
# second-order graph on the whole global batch on every process, so a large --batch-size (or many
# processes) would cost several times a training step's memory.
HESSIAN_MAX_IMAGES = 256


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE with hard (B,) or soft (B, K) targets."""
    return F.cross_entropy(logits.float(), targets.float() if targets.ndim == 2 else targets)


@register_quantizer("ewgs")
def ewgs(bits: int, is_weight: bool, channels: int | None, config: QuantConfig) -> Quantizer:
    return EWGSQuantizer(bits, is_weight, channels, config.ewgs_delta, config.ewgs_init, config.ewgs_delta_every,
                         values=config.w_bits == FP_BITS, hessian_batches=config.ewgs_hessian_batches,
                         hessian_probes=config.ewgs_hessian_probes)


def hessian_delta_estimates(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            inputs: torch.Tensor, targets: torch.Tensor, probes: int = 1) -> dict[str, float]:
    """One batch's estimate (Tr(H) / N) / (3 std(g)) for every Hessian-driven EWGS quantizer, not
    clipped (EWGS sec. 3.3): Tr(H) of the loss with respect to the quantizer's discretized output
    x_q by Hutchinson's estimator (E[v^T H v], v Rademacher, ``probes`` draws from torch's global
    generator), N = numel(x_q), g = dL/dx_q. {module name: estimate}. BatchNorm takes the statistics
    of ``inputs`` alone, also under torch.distributed (runtime.replicated_batches: the synchronized
    BatchNorm cannot be differentiated twice); the trainer gives every process the same batches."""
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, EWGSQuantizer) and m.hessian_delta}
    for m in quantizers.values():
        m.capture = []
    try:
        # differentiated twice: compiled backwards refuse create_graph
        with kernels.eager_kernels(), replicated_batches():
            return _estimates(quantizers, loss_fn(model(inputs), targets), probes)
    finally:
        for m in quantizers.values():
            m.capture = None


def _estimates(quantizers: dict[str, EWGSQuantizer], loss: torch.Tensor, probes: int) -> dict[str, float]:
    outputs = [t for m in quantizers.values() for t in m.capture]  # type: ignore[union-attr]
    grads = torch.autograd.grad(loss, outputs, create_graph=True)
    traces = [0.0] * len(outputs)
    for _ in range(probes):
        vs = [torch.randint_like(t, 2) * 2 - 1 for t in outputs]
        hvs = torch.autograd.grad(grads, outputs, grad_outputs=vs, retain_graph=True)
        for i, (v, hv) in enumerate(zip(vs, hvs)):
            traces[i] += float((v * hv).sum()) / probes
    # one captured tensor per quantizer: each module is called once per forward
    return {name: (trace / t.numel()) / (3 * float(g.detach().std()) + 1e-12)
            for name, g, t, trace in zip(quantizers, grads, outputs, traces, strict=True)}


def update_ewgs_delta(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      batches: Iterable[tuple[torch.Tensor, torch.Tensor]], probes: int = 1) -> dict[str, float]:
    """Set delta of every Hessian-driven EWGS quantizer to max(0, the mean over ``batches`` of
    :func:`hessian_delta_estimates`): averaged, then clipped, as the EWGS authors' update_grad_scales
    does (clipping each batch first would bias delta upward). They take 3 training batches and, per
    layer, up to 50 probes (one Hessian-vector product per layer and probe: ~2.8 h per update for a
    ResNet-20 on one CPU core); the trainer passes 3 training batches (``hessian_batches``) and
    ``hessian_probes`` (4) probes shared by all layers, one product per probe, unbiased for the same
    figure. Measured (benchmarks/ewgs_hessian_noise.py, RESULTS.md): one estimate's error is 0.33 of
    delta (median over layers) in 43 s per update at batch 256, against 0.89 for the 2 x 64 images x
    1 probe used before 2026-12-06. Returns {module name: delta}."""
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, EWGSQuantizer) and m.hessian_delta}
    if not quantizers:
        return {}
    sums = {n: 0.0 for n in quantizers}
    count = 0
    for inputs, targets in batches:
        for name, estimate in hessian_delta_estimates(model, loss_fn, inputs, targets, probes).items():
            sums[name] += estimate
        count += 1
    deltas = {}
    for name, m in quantizers.items():
        m.delta.fill_(max(0.0, sums[name] / max(count, 1)))
        deltas[name] = float(m.delta)
    return deltas
