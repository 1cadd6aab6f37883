"""Integer ONNX export of the CIFAR ResNets: onnxruntime runs every quantized convolution as
``QLinearConv`` and, with integer residuals (``--residual-bits``), every residual addition as
``QLinearAdd``, computing what the trained model computes.

Why a graph of its own: :mod:`daqkd.export` mirrors the fake-quantized model op by op (QDQ), which
onnxruntime's CPU provider runs in float, slower than the FP file. Its QDQ fusion turns
``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv`` only under conditions
(onnxruntime ``qdq_selectors.cc``, ``qlinearconv.cc``) that the fake-quantized arithmetic does not
meet as written, so this module rewrites it exactly before writing the graph:

* **weights**: int8 codes with zero point 0. The odd-level grids of EWGS, DoReFa and STE
  (``w = a (2q - (2^k - 1)) / (2^k - 1)``, a half-integer zero point) become the odd codes
  ``2q - (2^k - 1)``; LSQ's codes are already symmetric. Each output channel's codes are then
  multiplied by the largest integer m_c that keeps them within int8 and keeps
  ``2 x max input code x max |weight code| <= 32767`` (so AVX2's ``vpmaddubsw``, which adds two u8 x s8
  products in int16, cannot saturate), and the channel's scale divided by m_c: the bias is stored
  in units of the scale, so m_c shrinks its rounding m_c times (see ``IntegerLayer.bias_error``).
* **BatchNorm** folds into the weight scale (gamma / sigma per channel, the codes' signs flipped
  where gamma < 0) and into an int32 bias at scale s_x s_w, as the kernel adds it.
* **the next quantizer's interval lower bound** (EWGS's l) folds into that bias, and the ReLU
  before it into the lower bound of the ``Clip`` that follows the ``QuantizeLinear``: for
  y' = y - l, clamp(round((relu(y) - l) / s), 0, top) = clamp(round(y' / s), c0, top) with
  c0 = clamp(round(-l / s), 0, top), since rounding is monotone.
* the k-bit range is a uint8 ``Clip`` after the ``QuantizeLinear`` (a float clamp before it would
  block the fusion); signed grids (the residual branches) are uint8 with zero point -qmin, so that
  both inputs of an addition have one type, as ``QLinearAdd`` requires.
* a block's 8-bit input reaches its first convolution's k-bit grid through ``QLinearAdd`` of a
  one-element constant, the lower bound (half the time of the depthwise 1x1 convolution it
  replaces, ~10 % of a batch-1 run over ResNet-20's 9 blocks), where every arithmetic of
  onnxruntime's kernels gives the quantizer's codes on all 256 input codes; else through that
  convolution (weight m, the lower bound in its bias), checked the same way; else the
  DequantizeLinear -> Sub -> QuantizeLinear chain. Its codes carry the zero point 255 - qmax, so
  that the kernel's saturation at 255 is the grid's top and no ``Clip`` follows (9 of ResNet-20's
  18, ~3 % of a batch-1 run); the bottom needs no clamp where the input is non-negative, which the
  check confirms;
* option-A shortcuts are 0/1 stride-2 convolutions of the codes, requantized at their own scale
  (exact), so the addition's inputs come straight from ``DequantizeLinear``.

What stays float: the input normalization, a full-precision stem and classifier (the paper's
``--first-last fp``), the pooling, and, without ``--residual-bits``, the residual stream (each block's
second convolution then runs in float on dequantized codes). :class:`IntegerReport` says per layer
which kernel it gets. Quantizers whose grid has no integer zero point (EWGS's signed inputs,
1-bit sign quantizers) and weights whose codes need more than 8 bits (8-bit EWGS/DoReFa/STE
weights: odd codes up to +-255) are refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import DaqkdError
from .export import INPUT_NAME, OPSET, OUTPUT_NAME, require, weight_codes

INT16_MAX = 32767  # the int16 sum of two u8 x s8 products in AVX2's vpmaddubsw
INT8_MAX = 127


@dataclass
class Codes:
    """A uint8 tensor of the graph holding integer codes: value = scale (code - zero_point).
    ``grid`` is the quantizer module whose grid the codes are on; ``top`` the largest code."""

    name: str
    scale: float
    zero_point: int
    top: int
    grid: nn.Module | None = None
    channels: int = 0  # known where a convolution made them
    from_float: bool = False  # made by a QuantizeLinear of a float tensor (not by an integer kernel)


@dataclass
class InputGrid:
    """An activation quantizer as integer arithmetic: code = clamp(round((x - shift) / scale), qmin,
    qmax) + zero_point in uint8; the next layer sees out_scale (code - zero_point)."""

    scale: float
    shift: float
    qmin: int
    qmax: int
    zero_point: int
    out_scale: float

    @property
    def top(self) -> int:
        return self.qmax + self.zero_point


def input_grid(quantizer: nn.Module, where: str) -> InputGrid:
    """The integer form of an activation quantizer's grid, or one error line for a grid without an
    integer zero point."""
    grid = quantizer.grid()
    if grid.binary:
        raise DaqkdError(f"{where}: 1-bit sign inputs cannot run in integer kernels (their codes are -1/+1): "
                         "export without --integer")
    if grid.out_shift is not None and float(grid.out_shift) != 0.0:
        raise DaqkdError(f"{where}: its quantized inputs have an offset ({float(grid.out_shift):.4g}) that is not a "
                         "whole number of levels (EWGS's signed inputs), which integer kernels cannot represent: "
                         "export without --integer")
    scale = grid.scale if grid.scale is not None else grid.out_scale
    zero_point = -grid.qmin if grid.qmin < 0 else 0
    if grid.qmax + zero_point > 255:
        raise DaqkdError(f"{where}: codes {grid.qmin}..{grid.qmax} do not fit 8 bits: export without --integer")
    return InputGrid(float(scale), float(grid.shift) if grid.shift is not None else 0.0, grid.qmin, grid.qmax,
                     zero_point, float(grid.out_scale))


def symmetric_weight_codes(layer: nn.Module, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes int64 (C, ...), scale float64 (C,)) with zero point 0 and the fake-quantized weight =
    scale_c codes (per output channel c)."""
    quantizer = layer.weight_quantizer
    weight = layer.weight.detach().float().cpu()
    grid = quantizer.grid(weight)
    if grid.binary:
        raise DaqkdError(f"{where}: 1-bit weights cannot run in integer kernels: export without --integer")
    with torch.no_grad():
        q = weight_codes(quantizer(weight), grid).to(torch.int64).numpy()
    channels = weight.shape[0]
    scale = np.broadcast_to(grid.out_scale.double().numpy(), (channels,)).copy()
    shift = np.zeros(channels) if grid.out_shift is None else np.broadcast_to(grid.out_shift.double().numpy(),
                                                                               (channels,))
    zero = -shift / scale  # w = scale (q - zero)
    view = (-1,) + (1,) * (q.ndim - 1)
    if np.allclose(zero, np.round(zero), atol=1e-4):
        codes = q - np.round(zero).astype(np.int64).reshape(view)
    elif np.allclose(2 * zero, np.round(2 * zero), atol=1e-4):  # odd-level grids: half-integer zero point
        codes, scale = 2 * q - np.round(2 * zero).astype(np.int64).reshape(view), scale / 2
    else:
        raise DaqkdError(f"{where}: its weight grid has a zero point of {zero.flat[0]:.4g} levels, neither whole nor "
                         "half: export without --integer")
    if np.abs(codes).max(initial=0) > INT8_MAX:
        raise DaqkdError(f"{where}: its {quantizer.bits}-bit weight codes reach +-{np.abs(codes).max()}, beyond int8 "
                         "(the odd codes of 8-bit EWGS/DoReFa/STE weights need 9 bits): export without --integer, "
                         "or quantize weights to 7 bits or fewer")
    return codes, scale


def fold_batchnorm(bn: nn.Module | None, channels: int,
                   conv_bias: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """(factor, offset) float64 (C,) with BN(conv + conv_bias) = factor conv + offset, BN in eval mode."""
    bias = np.zeros(channels) if conv_bias is None else conv_bias.detach().double().cpu().numpy()
    if bn is None or isinstance(bn, nn.Identity):
        return np.ones(channels), bias
    if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats or bn.running_mean is None:
        raise DaqkdError(f"{type(bn).__name__} after a convolution cannot be folded: export without --integer")
    gamma = bn.weight.detach().double().cpu().numpy() if bn.weight is not None else np.ones(channels)
    beta = bn.bias.detach().double().cpu().numpy() if bn.bias is not None else np.zeros(channels)
    factor = gamma / np.sqrt(bn.running_var.detach().double().cpu().numpy() + bn.eps)
    return factor, beta + factor * (bias - bn.running_mean.detach().double().cpu().numpy())


@dataclass
class FoldedConv:
    """A quantized convolution with its BatchNorm folded, as ``QLinearConv`` computes it: output
    channel c before requantization is x_scale weight_scale_c (sum(codes_c * x codes) + bias_codes_c).

    codes: int8 (C_out, C_in / groups, kH, kW), the symmetric weight codes times multiplier m_c with
    the signs of gamma < 0 flipped; weight_scale: float32 (C_out,); multiplier: min m_c; bias: float64
    (C_out,), the exact folded bias (BN offset minus the next grid's lower bound) that the model's
    float arithmetic adds; bias_codes (int32) and bias_scale (float32 x_scale weight_scale), or None
    when the output stays float."""

    codes: np.ndarray
    weight_scale: np.ndarray
    multiplier: int
    bias: np.ndarray
    bias_codes: np.ndarray | None = None
    bias_scale: np.ndarray | None = None

    def kernel_bias(self) -> np.ndarray:
        """float64 (C_out,): the bias the kernel adds, bias_codes x bias_scale."""
        assert self.bias_codes is not None and self.bias_scale is not None
        return self.bias_codes * self.bias_scale.astype(np.float64)


def fold_quantized_conv(conv: nn.Module, bn: nn.Module | None, name: str, input_scale: float, input_top: int,
                        out_grid: InputGrid | None) -> FoldedConv:
    """``conv`` (quantized weights, inputs on a grid of step ``input_scale`` with codes 0..``input_top``)
    and ``bn`` folded for ``QLinearConv``, its output requantized onto ``out_grid`` (None: float output).
    One error line where the codes cannot be int8 or the int16 pair sums could overflow."""
    channels = conv.out_channels
    factor, offset = fold_batchnorm(bn, channels, conv.bias)
    codes, scale = symmetric_weight_codes(conv, name)
    flat = np.abs(codes.reshape(channels, -1)).max(axis=1)
    widest = np.maximum(flat, 1)
    multiplier = np.minimum(INT8_MAX // widest, INT16_MAX // (2 * input_top * widest))
    if multiplier.min() < 1:
        raise DaqkdError(f"{name}: {conv.act_quantizer.bits}-bit inputs times {conv.weight_quantizer.bits}-bit "
                         f"weights can overflow the int16 pair sums of AVX2 int8 kernels (weight codes up to "
                         f"+-{int(flat.max())}; at most {INT16_MAX // (2 * input_top)} fit beside input "
                         f"codes up to {input_top}): export without --integer, or train with fewer bits")
    view = (-1,) + (1,) * (codes.ndim - 1)
    signs = np.where(factor < 0, -1, 1)
    int_codes = (codes * (signs * multiplier).reshape(view)).astype(np.int8)
    w_scale = (scale * np.where(factor == 0, 1.0, np.abs(factor)) / multiplier).astype(np.float32)
    if (factor == 0).any():
        int_codes[factor == 0] = 0
    bias = offset - (out_grid.shift if out_grid is not None else 0.0)
    folded = FoldedConv(int_codes, w_scale, int(multiplier.min()), bias)
    if out_grid is not None:
        folded.bias_scale = (np.float32(input_scale) * w_scale).astype(np.float32)
        folded.bias_codes = np.rint(bias / folded.bias_scale.astype(np.float64))
        if np.abs(folded.bias_codes).max(initial=0) >= 2 ** 31:
            raise DaqkdError(f"{name}: its bias does not fit int32 at the kernel's scale: export without --integer")
    return folded


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _fma32(a: Any, b: Any, c: Any) -> np.ndarray:
    """float32 fused multiply-add, correctly rounded: a x b is exact in float64 for the operands here
    (a float32 times an integer under 2^9), and where the float64 sum is inexact and lands on a
    float32 midpoint, the sign of its error decides the side."""
    product = _f32(a).astype(np.float64) * _f32(b).astype(np.float64)
    addend = _f32(c).astype(np.float64)
    total = product + addend
    virtual = total - product
    error = (product - (total - virtual)) + (addend - virtual)  # Knuth's two-sum: total + error is exact
    rounded = total.astype(np.float32)
    below = np.where(rounded.astype(np.float64) > total, np.nextafter(rounded, np.float32(-np.inf)), rounded)
    above = np.nextafter(below, np.float32(np.inf))
    midpoint = (total - below.astype(np.float64)) == (above.astype(np.float64) - total)
    return np.where(midpoint & (error > 0), above, np.where(midpoint & (error < 0), below, rounded))


def qlinear_add_with_constant(codes: np.ndarray, scale_a: float, zero_a: int, constant: int, scale_b: float,
                              zero_b: int, scale_c: float, zero_c: int) -> list[tuple[str, np.ndarray]]:
    """The uint8 outputs of onnxruntime's ``QLinearAdd`` of uint8 ``codes`` and a one-element constant,
    once per arithmetic its CPU kernels use (MLAS ``qladd.cpp``, ``qladd_avx2.cpp``): SSE2 (float
    multiply, then add), AVX2 and AVX-512 machines (fused multiply-add), NEON (22-bit fixed-point
    multipliers, a rounding shift; the float path where the scale ratios do not allow them) and the
    portable loop. Where a compiler may contract a scalar ``a*b + c`` into one FMA, both forms are
    given. Returns (kernel, outputs) pairs: "sse2", "avx2", "portable", "neon" (each kernel possibly
    more than once). Exact only if all of them agree."""
    a = np.asarray(codes, dtype=np.int64)
    ratio_a = _f32(scale_a) / _f32(scale_c)
    ratio_b = _f32(scale_b) / _f32(scale_c)
    product_a, product_b = _f32(ratio_a * np.float32(zero_a)), _f32(ratio_b * np.float32(zero_b))
    fixed = {np.float32(zero_c) - _f32(product_a + product_b), np.float32(zero_c) - _fma32(ratio_a, zero_a, product_b),
             np.float32(zero_c) - _fma32(ratio_b, zero_b, product_a)}
    with_constant = {_f32(f + _f32(np.float32(constant) * ratio_b)).item() for f in fixed}
    with_constant |= {_fma32(constant, ratio_b, f).item() for f in fixed}
    a_float = a.astype(np.float32)
    outputs = []
    for part in sorted(with_constant):
        outputs.append(("sse2", np.rint(_f32(_f32(a_float * ratio_a) + np.float32(part)))))
        outputs.append(("avx2", np.rint(_fma32(a_float, ratio_a, part))))
    value_b = _f32(_f32(scale_b) * np.float32(constant - zero_b))
    low, high = np.float32(-zero_c), np.float32(255 - zero_c)
    for value_a_plus_b in (_f32(_f32(_f32(scale_a) * (a - zero_a).astype(np.float32)) + value_b),
                           _fma32(scale_a, (a - zero_a).astype(np.float32), value_b)):  # the portable loop
        quotient = _f32(value_a_plus_b / _f32(scale_c))
        outputs.append(("portable", np.rint(_f32(np.clip(quotient, low, high) + np.float32(zero_c)))))
        outputs.append(("portable", np.rint(quotient) + zero_c))  # an older release's rounding
    # NEON: MlasCalcQLinearAddParameters, then acc + (acc < 0), then a rounding right shift
    greater = max(float(ratio_a), float(ratio_b))
    if 2.0 ** -14 <= min(float(ratio_a), float(ratio_b)) and greater < 256.0:
        shift = 21 - (int(np.float32(greater).view(np.uint32)) >> 23) + 127
        multiplier_a = int(np.rint(np.float32(ratio_a) * np.float32(2.0 ** shift)))
        multiplier_b = int(np.rint(np.float32(ratio_b) * np.float32(2.0 ** shift)))
        if 13 <= shift <= 31 and 2 ** 21 <= max(multiplier_a, multiplier_b) < 2 ** 22:
            acc = (a - zero_a) * multiplier_a + (constant - zero_b) * multiplier_b
            acc = acc - (acc < 0)
            outputs.append(("neon", ((acc + (1 << (shift - 1))) >> shift) + zero_c))
    return [(kernel, np.clip(out, 0, 255).astype(np.int64)) for kernel, out in outputs]


REQUANTIZED_TOP = 255  # the largest uint8 input code of an integer-residual block's conv1 and projection


def integer_convolutions(net: nn.Module) -> list[tuple[str, nn.Module, nn.Module, nn.Module, int]]:
    """(name, conv, bn, output quantizer, input top) of each convolution of a CifarResNet that the
    integer export requantizes in the kernel (QLinearConv with an int32 bias): the blocks' first
    convolutions, and with integer residuals their second ones and projection shortcuts. ``input
    top`` is the largest uint8 input code the kernel multiplies (it bounds the weight multipliers,
    :func:`fold_quantized_conv`): the input grid's top, or ``REQUANTIZED_TOP`` for the first
    convolution and the projection of an integer-residual block, whose requantized codes may carry
    a zero point that shifts them up to 255 (:meth:`IntegerResNet.requantize`)."""
    found = []
    names = {module: name for name, module in net.named_modules()}
    for block in net.blocks():
        integer = active(block.output_quantizer) is not None
        triples = [(block.conv1, block.bn1, input_quantizer(block.conv2), integer)]
        if integer:
            triples.append((block.conv2, block.bn2, active(block.residual_quantizer), False))
            if block.projects:
                triples.append((block.downsample[0], block.downsample[1], active(block.shortcut_quantizer), True))
        for conv, bn, out, requantized in triples:
            if out is None or input_quantizer(conv) is None or active(getattr(conv, "weight_quantizer", None)) is None:
                continue
            try:
                top = REQUANTIZED_TOP if requantized else input_grid(conv.act_quantizer, names[conv]).top
            except DaqkdError:
                continue  # not exportable: the export says why
            found.append((names[conv], conv, bn, out, top))
    return found


def kernel_bias_corrections(net: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """BatchNorm -> float32 (C,) tensor to add to its eval output so that the model's folded bias is
    the int32 bias ``QLinearConv`` adds (:func:`fold_quantized_conv`), for every convolution that the
    integer export requantizes in the kernel. The rounding is at most half a step of x_scale x
    weight_scale (after the code multipliers, a few thousandths of an output level), yet it moved
    74 of 1,000 test predictions of a trained W2A2 ResNet-20: the trained model evaluates what the file
    computes only if its eval path adds it too. Layers that cannot be exported are left out."""
    corrections: dict[nn.Module, torch.Tensor] = {}
    for name, conv, bn, out, input_top in integer_convolutions(net):
        try:
            in_grid = input_grid(conv.act_quantizer, name)
            out_grid = input_grid(out, name)
            folded = fold_quantized_conv(conv, bn, name, in_grid.out_scale, input_top, out_grid)
        except DaqkdError:
            continue
        device = bn.weight.device if getattr(bn, "weight", None) is not None else torch.device("cpu")
        corrections[bn] = torch.from_numpy(folded.kernel_bias() - folded.bias).float().to(device)
    return corrections


KERNELS = {"integer": "integer in and out (QLinearConv)",
           "float-out": "integer inputs and weights, float output into the float residual stream",
           "float": "full precision (float Conv, BatchNorm folded)"}


@dataclass
class IntegerLayer:
    """What :func:`export_integer_onnx` made of one convolution: ``kernel`` "integer" (QLinearConv:
    integer input and weights, int32 bias, requantized output), "float-out" (integer input and
    weights, float output: the residual stream is float) or "float" (a full-precision layer);
    ``multiplier``: the smallest m_c; ``bias_error``: the largest |stored bias - the bias PyTorch's eval
    adds| in units of the output grid's step (0 for float outputs)."""

    kernel: str
    weight_bits: int
    input_bits: int
    multiplier: int = 1
    bias_error: float = 0.0
    bias_in_eval: bool = False  # PyTorch's eval adds the kernel's bias rounding (bias_error is float noise)


@dataclass
class IntegerReport:
    path: str
    file_bytes: int
    image_size: int
    layers: dict[str, IntegerLayer] = field(default_factory=dict)
    additions: dict[str, str] = field(default_factory=dict)  # block -> "integer" | "float"
    metadata: dict[str, str] = field(default_factory=dict)


class GraphBuilder:
    """Nodes and initializers of one ONNX graph, with fresh value names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.outputs: list[str] = []  # extra graph outputs (codes, for the equivalence tests)
        self._names: set[str] = set()

    def fresh(self, hint: str) -> str:
        name, i = hint, 1
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def constant(self, hint: str, value: Any, dtype: Any) -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attributes: Any) -> str:
        from onnx import helper

        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attributes))
        return out


def active(quantizer: nn.Module | None) -> nn.Module | None:
    """``quantizer`` if it quantizes, None for a full-precision one or an identity placeholder."""
    from .quant import Quantizer
    from .quant.base import Identity

    return quantizer if isinstance(quantizer, Quantizer) and not isinstance(quantizer, Identity) else None


def input_quantizer(layer: nn.Module) -> nn.Module | None:
    """A quantized layer's input quantizer, None for float inputs."""
    return active(getattr(layer, "act_quantizer", None))


class IntegerResNet:
    """Builds the integer graph of a quantized CifarResNet (see the module docstring)."""

    def __init__(self, model: nn.Module, expose_codes: bool = False) -> None:
        from .models.resnet_cifar import CifarResNet

        net = model.model if hasattr(model, "model") else model
        if not isinstance(net, CifarResNet):
            raise DaqkdError(f"--integer supports the CIFAR ResNets (resnet20 ... resnet110, option A or B), not "
                             f"{type(net).__name__}: export without --integer")
        self.model, self.net = model, net
        self.graph = GraphBuilder()
        self.layers: dict[str, IntegerLayer] = {}
        self.additions: dict[str, str] = {}
        self.expose_codes = expose_codes
        self.names = {module: name for name, module in net.named_modules()}
        # the input top each kernel's weight multipliers are bounded for: the model's eval folds the
        # same (kernel_bias_corrections), so both read it from one place
        self.input_tops = {conv: top for _, conv, _, _, top in integer_convolutions(net)}

    # --- values ---

    def dequantize(self, codes: Codes) -> str:
        g = self.graph
        return g.node("DequantizeLinear", [codes.name, g.constant(f"{codes.name}_scale", codes.scale, np.float32),
                                           g.constant(f"{codes.name}_zero", codes.zero_point, np.uint8)],
                      f"{codes.name}_dq")

    def as_float(self, value: Codes | str) -> str:
        return self.dequantize(value) if isinstance(value, Codes) else value

    def quantize(self, x: str, grid: InputGrid, quantizer: nn.Module, low: int | None = None,
                 channels: int = 0) -> Codes:
        """x float -> QuantizeLinear (uint8, grid.zero_point) -> Clip to the grid's codes (from ``low``
        when a folded ReLU raises the lowest one)."""
        g = self.graph
        hint = self.names[quantizer].replace(".", "_")
        q = g.node("QuantizeLinear", [x, g.constant(f"{hint}_scale", grid.scale, np.float32),
                                      g.constant(f"{hint}_zero", grid.zero_point, np.uint8)], f"{hint}_q")
        lowest = (grid.qmin if low is None else low) + grid.zero_point
        if lowest > 0 or grid.top < 255:
            q = g.node("Clip", [q, g.constant(f"{hint}_low", lowest, np.uint8),
                                g.constant(f"{hint}_high", grid.top, np.uint8)], f"{hint}_codes")
        if self.expose_codes:  # on the quantizer's own zero point, whatever offset the graph's codes carry
            canonical = input_grid(quantizer, self.names[quantizer]).zero_point
            g.outputs.append(q if grid.zero_point == canonical else g.node(
                "Sub", [q, g.constant(f"{hint}_offset", grid.zero_point - canonical, np.uint8)], f"{hint}_exposed"))
        return Codes(q, grid.out_scale, grid.zero_point, grid.top, quantizer, channels)

    def quantize_input(self, x: Codes | str, quantizer: nn.Module) -> Codes:
        """The codes ``quantizer`` (a layer's input quantizer) makes of ``x``: as they are when ``x``
        is on its grid already, by :meth:`requantize` from other codes where its check passes, else
        through float (dequantize, subtract the lower bound, quantize)."""
        if isinstance(x, Codes) and x.grid is quantizer:
            return x
        grid = input_grid(quantizer, self.names[quantizer])
        if isinstance(x, Codes) and x.channels:
            codes = self.requantize(x, grid, quantizer)
            if codes is not None:
                return codes
        value = self.as_float(x)
        if grid.shift != 0.0:
            value = self.graph.node("Sub", [value, self.graph.constant("shift", grid.shift, np.float32)], "shifted")
        return self.quantize(value, grid, quantizer)

    def requantize(self, x: Codes, grid: InputGrid, quantizer: nn.Module) -> Codes | None:
        """Codes on one grid -> ``quantizer``'s codes in one integer kernel, checked against the
        quantizer on all 256 input codes (the input is uint8), in the kernel's own arithmetic:

        * preferably ``QLinearAdd`` of the codes and a one-element constant, the grid's lower bound
          (~4 us a block at batch 1 in a profile, half a depthwise convolution), where
          every arithmetic of onnxruntime's kernels gives the quantizer's codes
          (:func:`qlinear_add_with_constant`);
        * else a depthwise 1x1 convolution with weight m (the largest within the AVX2 pair-sum
          bound) and the lower bound in its bias, as onnxruntime's requantization computes it.

        Where the grid is unsigned and its codes never fall below 0, the output zero point is
        255 - qmax, so that the kernel's saturation at 255 is the grid's top and no Clip follows;
        otherwise zero point 0 and a Clip. None (the float path) if no form agrees."""
        codes = np.arange(256)
        values = (torch.arange(256, dtype=torch.float32) - x.zero_point) * torch.tensor(x.scale, dtype=torch.float32)
        with torch.no_grad():
            reference = torch.round(quantizer(values.view(1, 1, 16, 16)).reshape(-1) / grid.out_scale).numpy()
        valid = slice(0, x.top + 1)
        # the same grid with its codes shifted up to end at 255: the bottom clamp moves to -offset,
        # where the check shows that no input reaches it
        offset = 255 - grid.top
        forms = [InputGrid(grid.scale, grid.shift, -offset, grid.qmax, offset, grid.out_scale)] \
            if grid.qmin == 0 and grid.zero_point == 0 and offset > 0 else []
        forms.append(grid)

        def lands(kernel_codes: np.ndarray, form: InputGrid) -> bool:
            """uint8 outputs on ``form`` (then its Clip, where :meth:`quantize` adds one) are the quantizer's."""
            clipped = np.clip(kernel_codes, max(form.qmin + form.zero_point, 0), form.top)
            return bool(np.array_equal(clipped[valid] - form.zero_point, reference[valid]))

        # QLinearAdd: the constant's value is -l, as code 0 at zero point 1 (l > 0) or code 1 at zero point 0
        constant, zero_b = (0, 1) if grid.shift > 0 else (1, 0) if grid.shift < 0 else (0, 0)
        scale_b = abs(grid.shift) if grid.shift != 0 else grid.scale
        for form in forms:
            outputs = qlinear_add_with_constant(codes, x.scale, x.zero_point, constant, scale_b, zero_b, form.scale,
                                                form.zero_point)
            if all(lands(out, form) for _, out in outputs):
                return self.add_constant(x, form, quantizer, constant, scale_b, zero_b)

        m = max(1, min(INT8_MAX, INT16_MAX // (2 * max(x.top, 1))))
        bias_code = int(np.rint(-grid.shift * m / x.scale))
        multiplier = np.float32(np.float32(x.scale) * np.float32(1.0 / m)) / np.float32(grid.scale)
        acc = (m * (codes - x.zero_point) + bias_code).astype(np.float32)
        for form in forms:
            kernel = np.clip(np.rint(acc * multiplier) + form.zero_point, 0, 255)
            if lands(kernel, form):
                return self.depthwise_requantization(x, form, quantizer, m, bias_code)
        return None

    def add_constant(self, x: Codes, grid: InputGrid, quantizer: nn.Module, constant: int, scale: float,
                     zero_point: int) -> Codes:
        g = self.graph
        hint = self.names[quantizer].replace(".", "_")
        lower = g.node("DequantizeLinear", [g.constant(f"{hint}_lower_code", np.full((1, 1, 1, 1), constant), np.uint8),
                                            g.constant(f"{hint}_lower_scale", scale, np.float32),
                                            g.constant(f"{hint}_lower_zero", zero_point, np.uint8)], f"{hint}_lower")
        y = g.node("Add", [self.dequantize(x), lower], f"{hint}_requant")
        return self.quantize(y, grid, quantizer, channels=x.channels)

    def depthwise_requantization(self, x: Codes, grid: InputGrid, quantizer: nn.Module, m: int,
                                 bias_code: int) -> Codes:
        g = self.graph
        hint = self.names[quantizer].replace(".", "_")
        c = x.channels
        weight = g.node("DequantizeLinear", [g.constant(f"{hint}_requant_codes", np.full((c, 1, 1, 1), m), np.int8),
                                             g.constant(f"{hint}_requant_scale", np.full(c, 1.0 / m), np.float32)],
                        f"{hint}_requant_weight", axis=0)
        bias_scale = (np.float32(x.scale) * np.full(c, 1.0 / m, dtype=np.float32)).astype(np.float32)
        bias = g.node("DequantizeLinear", [g.constant(f"{hint}_requant_bias", np.full(c, bias_code), np.int32),
                                           g.constant(f"{hint}_requant_bias_scale", bias_scale, np.float32)],
                      f"{hint}_requant_bias", axis=0)
        y = g.node("Conv", [self.dequantize(x), weight, bias], f"{hint}_requant", group=c)
        return self.quantize(y, grid, quantizer, channels=c)

    # --- layers ---

    def conv(self, x: Codes | str, conv: nn.Module, bn: nn.Module | None, relu: bool,
             output: nn.Module | None) -> Codes | str:
        """conv -> bn [-> relu] [-> ``output`` quantizer]: codes when ``output`` is given, else float."""
        from .quant import QuantConv2d

        g, name = self.graph, self.names[conv]
        hint = name.replace(".", "_")
        out_grid = input_grid(output, self.names[output]) if output is not None else None
        quantized = isinstance(conv, QuantConv2d) and active(conv.weight_quantizer) is not None
        attrs = {"strides": list(conv.stride), "pads": [*conv.padding, *conv.padding],
                 "dilations": list(conv.dilation), "group": conv.groups}
        if quantized and input_quantizer(conv) is not None:
            codes_in = self.quantize_input(x, conv.act_quantizer)
            top = max(self.input_tops.get(conv, 0), codes_in.top)
            folded = fold_quantized_conv(conv, bn, name, codes_in.scale, top, out_grid)
            weight = g.node("DequantizeLinear", [g.constant(f"{hint}_weight_codes", folded.codes, np.int8),
                                                 g.constant(f"{hint}_weight_scale", folded.weight_scale, np.float32)],
                            f"{hint}_weight", axis=0)
            inputs = [self.dequantize(codes_in), weight]
            layer = IntegerLayer("integer" if out_grid is not None else "float-out", conv.weight_quantizer.bits,
                                 conv.act_quantizer.bits, folded.multiplier)
            if folded.bias_codes is not None:
                # what PyTorch's eval adds to the folded bias (CifarResNet.refresh_kernel_biases), if anything
                applied = getattr(bn, "kernel_bias", None)
                model_bias = folded.bias + (0.0 if applied is None else applied.double().cpu().numpy())
                layer.bias_error = float(np.abs(folded.kernel_bias() - model_bias).max() / out_grid.scale)
                layer.bias_in_eval = applied is not None
                inputs.append(g.node("DequantizeLinear", [
                    g.constant(f"{hint}_bias_codes", folded.bias_codes, np.int32),
                    g.constant(f"{hint}_bias_scale", folded.bias_scale, np.float32)], f"{hint}_bias", axis=0))
            else:
                inputs.append(g.constant(f"{hint}_bias", folded.bias, np.float32))
        else:  # full precision (or a layer whose inputs stay float): BN folded into float weights
            if quantized:
                raise DaqkdError(f"{name}: quantized weights with full-precision inputs cannot run in integer "
                                 "kernels: export without --integer")
            factor, offset = fold_batchnorm(bn, conv.out_channels, conv.bias)
            weight = conv.weight.detach().double().cpu().numpy() * factor.reshape((-1,) + (1,) * 3)
            inputs = [self.as_float(x), g.constant(f"{hint}_weight", weight, np.float32),
                      g.constant(f"{hint}_bias", offset - (out_grid.shift if out_grid is not None else 0.0),
                                 np.float32)]
            layer = IntegerLayer("float", 32, 32)
        self.layers[name] = layer
        y = g.node("Conv", inputs, f"{hint}_out", **attrs)
        if out_grid is None:
            return g.node("Relu", [y], f"{hint}_relu") if relu else y
        low = None
        if relu:  # relu(y) - l >= -l: the ReLU is the lowest code round(-l / s) (module docstring)
            low = int(np.clip(torch.round(torch.tensor(0.0 - out_grid.shift, dtype=torch.float32)
                                          / torch.tensor(out_grid.scale, dtype=torch.float32)).item(),
                              out_grid.qmin, out_grid.qmax))
        return self.quantize(y, out_grid, output, low, conv.out_channels)

    def block(self, x: Codes | str, block: nn.Module) -> Codes | str:
        name = self.names[block]
        integer = active(block.output_quantizer) is not None
        residual_q = block.residual_quantizer if integer else None
        pads = hasattr(block, "shortcut") and not isinstance(block.shortcut, nn.Identity)
        if integer and isinstance(x, Codes) and x.from_float and not block.projects and not pads:
            # the stem's codes come from a float QuantizeLinear, which onnxruntime keeps in NCHW: added
            # as they are, every addition of the first stage ran in NCHW between two Transposes (7 of
            # them, ~5 % of a batch-1 run); through an exact identity kernel the stage stays NHWC, the
            # first convolution's requantization included
            x = self.pad_shortcut(x, 0, block.conv1.out_channels, stride=1)
        h = self.conv(x, block.conv1, block.bn1, relu=True, output=input_quantizer(block.conv2))
        r = self.conv(h, block.conv2, block.bn2, relu=False, output=residual_q)
        if block.projects:
            shortcut = self.conv(x, block.downsample[0], block.downsample[1], relu=False,
                                 output=block.shortcut_quantizer if integer else None)
        elif pads:
            shortcut = self.pad_shortcut(x, block.shortcut.pad, block.conv1.out_channels)
        else:
            shortcut = x
        g = self.graph
        if integer:
            if not isinstance(r, Codes) or not isinstance(shortcut, Codes):
                raise DaqkdError(f"{name}: its residual branch is not quantized: export without --integer")
            total = g.node("Add", [self.dequantize(r), self.dequantize(shortcut)], f"{name.replace('.', '_')}_sum")
            grid = input_grid(block.output_quantizer, self.names[block.output_quantizer])
            if grid.qmin < 0:
                raise DaqkdError(f"{name}: a signed block output cannot absorb the ReLU: export without --integer")
            self.additions[name] = "integer"
            # the ReLU is the Q's saturation at zero point 0 (onnxruntime removes a ReLU there too)
            return self.quantize(total, grid, block.output_quantizer, channels=block.conv2.out_channels)
        self.additions[name] = "float"
        total = g.node("Add", [self.as_float(r), self.as_float(shortcut)], f"{name.replace('.', '_')}_sum")
        return g.node("Relu", [total], f"{name.replace('.', '_')}_out")

    def pad_shortcut(self, x: Codes | str, pad: int, channels: int, stride: int = 2) -> Codes | str:
        """Option A: x[:, :, ::stride, ::stride] zero-padded to ``channels`` (stride 1, pad 0: the
        identity). On codes it is a 1x1 convolution with that stride and 0/1 weights, requantized at
        the input's own scale (a multiplier of exactly 1): exact, an integer kernel, and it keeps the
        graph in onnxruntime's NHWC layout (two strided uint8 Slices took ~4 % of a batch-64 run and
        kept Transposes around them); on float values it is Slice + Pad."""
        g = self.graph
        int64 = np.int64
        if isinstance(x, Codes):
            eye = np.zeros((channels, channels - 2 * pad, 1, 1), dtype=np.int8)
            eye[np.arange(pad, channels - pad), np.arange(channels - 2 * pad)] = 1
            weight = g.node("DequantizeLinear", [g.constant("shortcut_weight_codes", eye, np.int8),
                                                 g.constant("shortcut_weight_scale", np.ones(channels), np.float32)],
                            "shortcut_weight", axis=0)
            bias_scale = g.constant("shortcut_bias_scale", np.full(channels, x.scale), np.float32)
            bias = g.node("DequantizeLinear", [g.constant("shortcut_bias_codes", np.zeros(channels), np.int32),
                                               bias_scale], "shortcut_bias", axis=0)
            y = g.node("Conv", [self.dequantize(x), weight, bias], "shortcut", strides=[stride, stride])
            q = g.node("QuantizeLinear", [y, g.constant("shortcut_scale", x.scale, np.float32),
                                          g.constant("shortcut_zero", x.zero_point, np.uint8)], "shortcut_codes")
            return Codes(q, x.scale, x.zero_point, x.top, None, channels)
        sliced = g.node("Slice", [x, g.constant("starts", [0, 0], int64), g.constant("ends", [2 ** 62, 2 ** 62], int64),
                                  g.constant("axes", [2, 3], int64), g.constant("steps", [2, 2], int64)], "subsampled")
        pads = g.constant("pads", [0, pad, 0, 0, 0, pad, 0, 0], int64)
        return g.node("Pad", [sliced, pads, g.constant("pad_value", 0.0, np.float32)], "padded")

    def build(self, image_size: int) -> Any:
        from onnx import TensorProto, helper

        g, net = self.graph, self.net
        norm = self.model.normalization if hasattr(self.model, "normalization") else None
        x = g.node("Cast", [INPUT_NAME], "images_float", to=TensorProto.FLOAT)
        if norm is not None:  # NormalizedModel's (x - 255 mean) / (255 std), in the same float32 ops
            mean = (torch.tensor(norm.mean).view(1, 3, 1, 1) * 255.0).numpy()
            std = (torch.tensor(norm.std).view(1, 3, 1, 1) * 255.0).numpy()
            x = g.node("Div", [g.node("Sub", [x, g.constant("mean", mean, np.float32)], "centered"),
                               g.constant("std", std, np.float32)], "normalized")
        stem_q = active(net.stem_quantizer)
        value: Codes | str = self.conv(x, net.conv1, net.bn1, relu=True, output=stem_q)
        if isinstance(value, Codes):
            value.from_float = True
        for block in net.blocks():
            value = self.block(value, block)
        pooled = g.node("Flatten", [g.node("GlobalAveragePool", [self.as_float(value)], "pooled")], "features")
        head = net.head
        from .quant import QuantLinear

        if isinstance(head, QuantLinear):
            raise DaqkdError("a quantized classifier (--first-last 8 or same) is not supported by --integer yet: "
                             "export without --integer")
        logits = g.node("Gemm", [pooled, g.constant("head_weight", head.weight.detach().numpy(), np.float32),
                                 g.constant("head_bias", head.bias.detach().numpy() if head.bias is not None
                                            else np.zeros(head.out_features), np.float32)], OUTPUT_NAME, transB=1)
        assert logits == OUTPUT_NAME
        inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", 3, image_size, image_size])]
        outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", head.out_features])]
        outputs += [helper.make_tensor_value_info(name, TensorProto.UINT8, ["batch", "channels", "height", "width"])
                    for name in g.outputs]
        graph = helper.make_graph(g.nodes, "daqkd_integer", inputs, outputs, g.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="daqkd")


def export_integer_onnx(model: nn.Module, path: str | Path, *, image_size: int = 32,
                        metadata: dict[str, Any] | None = None, expose_codes: bool = False) -> IntegerReport:
    """Write ``model`` (a NormalizedModel of a quantized CifarResNet, eval mode) as an integer-kernel
    ONNX file (module docstring): input ``images`` uint8 (batch, 3, image_size, image_size), output
    ``logits`` float32 (batch, classes); ``expose_codes`` also outputs every quantizer's uint8 codes
    (named after the quantizer, at its :func:`input_grid` zero point) for equivalence tests. Checked
    with onnx.checker, written atomically."""
    import json

    onnx = require("onnx")
    from .rundir import atomic_path

    model = model.cpu().eval()
    builder = IntegerResNet(model, expose_codes)
    if getattr(builder.net, "kernel_biases", False):
        builder.net.refresh_kernel_biases()  # the bias rounding that the model's eval adds, as the file will
    proto = builder.build(image_size)
    props = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    props["integer"] = json.dumps({name: layer.kernel for name, layer in builder.layers.items()})
    for key, value in sorted(props.items()):
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return IntegerReport(str(path), path.stat().st_size, image_size, builder.layers, builder.additions, props)
