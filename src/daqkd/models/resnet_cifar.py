"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2).

Depth 6n+2: a 3x3 stem with 16 channels, three stages of n BasicBlocks with 16/32/64 channels
(stride 2 at the start of stages 2 and 3), global average pooling and a linear head.

Where a block changes the shape, the shortcut is one of the paper's two options:

- option A (``resnet20`` ...): parameter-free, spatially subsampled and zero-padded in channels;
  layer names of akamaster/pytorch_resnet_cifar10 (``conv1``, ``bn1``, ``layer1..layer3``, head
  ``linear``), so its published CIFAR-10 checkpoints load without renaming;
- option B (``resnet20b`` ...): a strided 1x1 convolution + BatchNorm (``downsample.0/1``) and head
  ``fc``, the layout of torchvision's ResNets and of chenyaofo/pytorch-cifar-models, whose published
  CIFAR-100 checkpoints load strictly. Quantization treats the 1x1 convolutions as any other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` zero-padded with ``extra_channels // 2`` per side."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


SHORTCUTS = ("A", "B")


def _add_kernel_bias(bn: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of the BatchNorms of an integer ResNet: in eval, the kernel's bias rounding
    (``bn.kernel_bias``, set by CifarResNet.refresh_kernel_biases) added to the output."""
    correction = bn.__dict__.get("kernel_bias")
    return None if correction is None else out + correction.to(out).view(1, -1, 1, 1)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with a residual connection; ReLU after the sum.

    ``shortcut`` "A" stores a parameter-free ``shortcut`` module, "B" a ``downsample`` 1x1 conv +
    BN; both are the identity when the shape does not change. ``residual_quantizer`` (after bn2),
    ``shortcut_quantizer`` (after a projection shortcut) and ``output_quantizer`` (after the ReLU)
    are identities unless the residual stream is quantized (CifarResNet.quantize_residuals).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        reshapes = stride != 1 or in_planes != planes
        if shortcut == "A":
            self.shortcut: nn.Module = PadShortcut(planes - in_planes) if reshapes else nn.Identity()
        else:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            ) if reshapes else nn.Identity()
        self.residual_quantizer: nn.Module = nn.Identity()
        self.shortcut_quantizer: nn.Module = nn.Identity()
        self.output_quantizer: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.residual_quantizer(self.bn2(self.conv2(out)))
        identity = self.shortcut_quantizer(self.shortcut(x) if hasattr(self, "shortcut") else self.downsample(x))
        return self.output_quantizer(F.relu(out + identity))

    @property
    def projects(self) -> bool:
        """Whether the shortcut is a convolution (option B where the shape changes)."""
        return hasattr(self, "downsample") and not isinstance(self.downsample, nn.Identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 input. Input (B, 3, H, W) float, output (B, num_classes) logits.

    ``shortcut``: "A" (head ``linear``) or "B" (head ``fc``), see the module docstring.
    """

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A") -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, 16, n, 1, shortcut)
        self.layer2 = self._make_stage(16, 32, n, 2, shortcut)
        self.layer3 = self._make_stage(32, 64, n, 2, shortcut)
        head = nn.Linear(64, num_classes)
        if shortcut == "A":
            self.linear = head
        else:
            self.fc = head
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        self.stem_quantizer: nn.Module = nn.Identity()
        self.kernel_biases = False  # set by quantize_residuals
        self._kernel_bias_snapshot: list[torch.Tensor] | None = None

    def quantize_residuals(self, make_quantizer: Callable[[], nn.Module]) -> None:
        """Fake-quantize the residual stream: the stem's output, every block's residual branch (after
        bn2), projection shortcut and output, each with its own ``make_quantizer()``. Every tensor
        that an addition or a block reads is then on an integer grid (the shortcut of option A is
        the block's quantized input, subsampled and zero-padded), so the network runs in integer
        arithmetic from the stem to the pooling (daqkd.integer_export), and in eval the model adds the
        integer kernels' bias rounding to its BatchNorms (:meth:`refresh_kernel_biases`)."""
        self.stem_quantizer = make_quantizer()
        for block in self.blocks():
            block.residual_quantizer = make_quantizer()
            block.output_quantizer = make_quantizer()
            if block.projects:
                block.shortcut_quantizer = make_quantizer()
        for bn in self._block_norms():
            bn.register_forward_hook(_add_kernel_bias)
        self.kernel_biases = True

    def _block_norms(self) -> list[nn.Module]:
        """The BatchNorms after the blocks' convolutions (bn1, bn2, a projection's BN)."""
        return [bn for block in self.blocks()
                for bn in (block.bn1, block.bn2, *([block.downsample[1]] if block.projects else []))]

    @torch.compiler.disable
    def refresh_kernel_biases(self) -> None:
        """Eval of an integer ResNet computes what its integer ONNX file computes: each BatchNorm
        before a requantizing integer kernel gets ``kernel_bias``, the difference between the int32
        bias the kernel adds and the folded float one (daqkd.integer_export.kernel_bias_corrections,
        at most half a step of input scale x weight scale). Brevitas quantizes biases to int32 at
        that scale for the same reason. Training mode removes them (BatchNorm then uses the batch's
        statistics, which no kernel folds). Recomputed whenever a parameter or buffer changed since
        the last call (compared value by value: ``.data`` assignments bypass version counters)."""
        from ..integer_export import kernel_bias_corrections

        if self.training:
            if self._kernel_bias_snapshot is not None:  # once after an eval phase, not every training step
                for bn in self._block_norms():
                    bn.__dict__.pop("kernel_bias", None)
                self._kernel_bias_snapshot = None
            return
        state = [*self.parameters(), *self.buffers()]
        snapshot = self._kernel_bias_snapshot
        if snapshot is not None and len(snapshot) == len(state) and all(
                a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
                for a, b in zip(snapshot, state)):
            return
        calibrating = not all(m.is_initialized for m in self.modules() if hasattr(m, "is_initialized"))
        corrections = {} if calibrating else kernel_bias_corrections(self)  # quantizers initialize on this pass
        for bn in self._block_norms():
            if bn in corrections:
                bn.__dict__["kernel_bias"] = corrections[bn]
            else:
                bn.__dict__.pop("kernel_bias", None)
        self._kernel_bias_snapshot = None if calibrating else [t.detach().clone() for t in state]

    def blocks(self) -> list[BasicBlock]:
        return [block for stage in (self.layer1, self.layer2, self.layer3) for block in stage]

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride, shortcut)]
        layers += [BasicBlock(planes, planes, 1, shortcut) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    @property
    def head(self) -> nn.Module:
        """The classifier (``linear`` or ``fc``; a quantized layer after quantization)."""
        return self.linear if hasattr(self, "linear") else self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_biases:
            self.refresh_kernel_biases()
        out = self.stem_quantizer(F.relu(self.bn1(self.conv1(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.head(out)
