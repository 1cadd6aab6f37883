"""Shared machinery of the quantizers: the config, the registry, quantized layers, bit checks.

A quantized layer fake-quantizes its input activations and its weights with two quantizer modules
and then runs the ordinary convolution or matmul, so any optimizer trains it and evaluation uses
the same form. Quantizers initialize themselves from the first batch they see (calibration):
whether activations can be negative (signed) is decided there too, so no model surgery needs to
know which layers follow a ReLU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DaqkdError
from ..rundir import store_python_scalars

FP_BITS = 32  # "not quantized"
# QuantConfig's fields for EWGS's Hessian delta: when and from how large a sample it is estimated
EWGS_HESSIAN_FIELDS = ("ewgs_delta_every", "ewgs_hessian_batches", "ewgs_hessian_probes")


@dataclass
class QuantConfig:
    """How to quantize a model.

    method: a name in QUANTIZERS (ewgs, lsq, pact, dorefa, ste); w_bits / a_bits: 1..8, or 32 for
    full precision; per_channel: one weight scale or interval per output channel; first_last:
    "fp" keeps the first conv and the last linear in full precision (the paper's CIFAR runs), an
    int quantizes them at that many bits (8 in its Tiny-ImageNet runs), "same" like every layer.
    ewgs_delta: None (default) for the Hessian-based delta of the EWGS paper and the authors' code:
    0 for the first ``ewgs_delta_every`` epochs, then re-estimated every ``ewgs_delta_every`` epochs
    (see ewgs.update_ewgs_delta); a number for a fixed one (0 = STE with learnable intervals).
    ewgs_init: "paper" for the authors' 3-sigma intervals (made for 2-4 bits: they clip a pretrained
    model's large weights, costing ~10 points of W8A8 top-1 before training), "mse" for the
    interval that minimizes the quantization error at the layer's bit width.
    residual_bits: 32 (default) keeps the tensors between quantized layers in full precision, as the
    paper does; 1..8 also fake-quantizes the residual stream at that many bits (a model that
    implements ``quantize_residuals``: the CIFAR ResNets' stem output, each block's residual branch,
    projection shortcut and output) with LSQ's learned step on a zero-anchored grid, whatever
    ``method``: what an integer ``Add`` needs, so that the whole network exports to integer kernels
    (daqkd.integer_export).
    """

    method: str = "ewgs"
    w_bits: int = 2
    a_bits: int = 2
    per_channel: bool = False
    first_last: str | int = "fp"
    ewgs_delta: float | None = None
    ewgs_init: str = "paper"
    pact_alpha: float = 10.0
    ewgs_delta_every: int = 10  # epochs between Hessian updates of EWGS's delta (when ewgs_delta is None)
    ewgs_hessian_batches: int = 3  # training batches per Hessian update (the authors' 3)
    ewgs_hessian_probes: int = 4  # Rademacher probes per batch, shared by all layers (ewgs.update_ewgs_delta)
    residual_bits: int = FP_BITS

    def __post_init__(self) -> None:
        store_python_scalars(self)  # validate() checks the values

    def validate(self) -> None:
        if self.method not in QUANTIZERS:
            raise DaqkdError(f"unknown quantization method {self.method!r}: use one of {', '.join(sorted(QUANTIZERS))}")
        for name, bits in (("--w-bits", self.w_bits), ("--a-bits", self.a_bits),
                           ("--residual-bits", self.residual_bits)):
            check_bits(name, bits)
        if self.first_last not in ("fp", "same"):
            check_bits("first_last", self.first_last)
        if self.ewgs_init not in ("paper", "mse"):
            raise DaqkdError(f"unknown EWGS initialization {self.ewgs_init!r}: use paper or mse")
        if not isinstance(self.per_channel, bool):
            raise DaqkdError(f"per_channel must be True or False, got {self.per_channel!r}")
        if isinstance(self.ewgs_delta, bool) or not isinstance(self.ewgs_delta, (int, float, type(None))):
            raise DaqkdError(f"--ewgs-delta must be a number >= 0 (or 'hessian'), got {self.ewgs_delta!r}")
        if self.ewgs_delta is not None and self.ewgs_delta < 0:
            raise DaqkdError(f"--ewgs-delta must be >= 0 (or 'hessian'), got {self.ewgs_delta}")
        for name in EWGS_HESSIAN_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DaqkdError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def check_bits(name: str, bits: object) -> int:
    """Bits must be an int in 1..8, or 32 for full precision."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= 8 or bits == FP_BITS):
        raise DaqkdError(f"{name} must be an integer from 1 to 8, or 32 for full precision, got {bits!r}")
    return bits


@dataclass
class Grid:
    """The integer grid a quantizer rounds to, in the form ONNX's QDQ operators compute (export).

    Output y = out_shift + out_scale * q with q an integer in [qmin, qmax]:
    activations: q = clamp(round((x - shift) / scale), qmin, qmax), or q = [x >= 0] when ``binary``
    (sign quantizers, whose zero goes up); weights: q is read back from the fake-quantized weight.
    scale, shift: 0-d (activations); out_scale, out_shift: 0-d or (C,) per output channel (weights).
    ``shift``/``out_shift`` None mean 0 (no op in the graph).
    """

    qmin: int
    qmax: int
    out_scale: torch.Tensor
    out_shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    binary: bool = False


def range_grid(low: torch.Tensor | float, high: torch.Tensor | float, bits: int) -> Grid:
    """The grid of ``functional.clip_quantize``: 2^bits levels from low to high (low 0: no shift)."""
    low = torch.as_tensor(low, dtype=torch.float32).detach()
    high = torch.as_tensor(high, dtype=torch.float32).detach()
    step = (high - low) / ((1 << bits) - 1)
    shift = low if bool(low != 0) else None
    return Grid(0, (1 << bits) - 1, out_scale=step, out_shift=shift, scale=step, shift=shift)


class Quantizer(nn.Module):
    """Fake-quantizes a tensor to ``bits`` bits. Subclasses implement ``quantize`` and may override
    ``initialize`` (called once, on the first tensor seen). ``signed`` is settled at initialization
    for activations (True if the first batch has negative values), fixed True for weights."""

    def __init__(self, bits: int, is_weight: bool, channels: int | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.is_weight = is_weight
        self.channels = channels  # per-output-channel parameters when set (weights only)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(is_weight))
        self._flags: tuple[bool, bool] | None = None  # host copies of (initialized, signed)

    @property
    def is_initialized(self) -> bool:
        return self._host_flags()[0]

    @property
    def is_signed(self) -> bool:
        return self._host_flags()[1]

    def _host_flags(self) -> tuple[bool, bool]:
        # reading a CUDA buffer waits for the GPU: read the pair once, not twice per layer and step
        if self._flags is None:
            self._flags = (bool(self.initialized), bool(self.signed))
        return self._flags

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._flags = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            # under autocast: at 2-8 bits, rounding (x - l) / s in 16-bit floats moves values
            # across level boundaries (half the activations of a W3A3 ResNet-20 in bf16)
            x = x.float()
        if not self.is_initialized:
            with torch.no_grad():
                if not self.is_weight:
                    self.signed.fill_(bool((x < 0).any()))
                self._flags = (False, bool(self.signed))
                self.initialize(x.detach())
            self.initialized.fill_(True)
            self._flags = (True, bool(self.signed))
        with torch.autocast(x.device.type, enabled=False):
            return self.quantize(x)

    # The protocol a QAT method implements; train.py and quantize_model know no method by name.
    l2_parameters: tuple[str, ...] = ()  # own parameters that want weight decay (PACT's alpha)
    calibrates_output = False  # whether the layer calls calibrate_output on its first batch

    def initialize(self, x: torch.Tensor) -> None:
        """Set data-dependent parameters from the first tensor (no grad)."""

    def calibrate_output(self, fp_out: torch.Tensor, quant_out: torch.Tensor) -> None:
        """Fit output-side state on the first batch: the layer's FP and quantized outputs (weights'
        quantizers with ``calibrates_output``; EWGS's output scale)."""

    @classmethod
    def on_epoch_start(cls, model: nn.Module, epoch: int,
                       sample_batches: Callable[[int, int], list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Called once per epoch (before its first step) for each quantizer class in the model, with
        the 0-based epoch and a function ``sample_batches(n, max_images)`` that returns up to n
        training batches (x, targets) of the run's batch size, each cut to ``max_images``, on demand;
        EWGS updates its Hessian delta here."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grid(self, weight: torch.Tensor | None = None) -> Grid:
        """The grid of the trained quantizer in eval mode (ONNX export, daqkd.export); ``weight``: the
        layer's FP weight for weight quantizers whose grid depends on it (DoReFa's, STE's)."""
        raise DaqkdError(f"the {type(self).__name__} quantizer cannot be exported: it does not declare its grid")

    def param_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """(C, 1, 1, ...) for per-channel weight parameters, () otherwise."""
        if self.channels is None:
            return ()
        return (self.channels,) + (1,) * (x.ndim - 1)

    def reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """Dimensions to reduce over for statistics matching ``param_shape``."""
        return tuple(range(1, x.ndim)) if self.channels is not None else tuple(range(x.ndim))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'weight' if self.is_weight else 'activation'}" + (
            f", per_channel={self.channels}" if self.channels else "")


class Identity(Quantizer):
    """Full precision (32 bits)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x


QuantizerFactory = Callable[[int, bool, "int | None", QuantConfig], Quantizer]
QUANTIZERS: dict[str, QuantizerFactory] = {}


def register_quantizer(name: str) -> Callable[[QuantizerFactory], QuantizerFactory]:
    """Register ``factory(bits, is_weight, channels, config) -> Quantizer`` under ``name``."""

    def decorator(factory: QuantizerFactory) -> QuantizerFactory:
        QUANTIZERS[name] = factory
        return factory

    return decorator


def make_quantizer(config: QuantConfig, bits: int, is_weight: bool, channels: int | None) -> Quantizer:
    if bits == FP_BITS:
        return Identity(bits, is_weight)
    return QUANTIZERS[config.method](bits, is_weight, channels if config.per_channel else None, config)


class QuantLayerMixin:
    """What QuantConv2d and QuantLinear share: quantize input and weight, then the FP op.

    An optional ``output_scale`` quantizer attribute (EWGS) is initialized on the first batch as
    mean|FP output| / mean|quantized output|.
    """

    weight: torch.Tensor
    weight_quantizer: Quantizer
    act_quantizer: Quantizer

    bias: torch.Tensor | None

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight_quantizer.is_initialized and self.weight_quantizer.calibrates_output:
            with torch.no_grad():
                # the scale multiplies the weights, so it is fitted on the outputs without the bias
                quant_out = self._op(self.act_quantizer(x), self.weight_quantizer(self.weight), None)
                self.weight_quantizer.calibrate_output(self._op(x, self.weight, None), quant_out)
        return self._op(self.act_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """Conv2d with fake-quantized weights and inputs; same parameter names as nn.Conv2d."""

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """Linear with fake-quantized weights and inputs; same parameter names as nn.Linear."""

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)
