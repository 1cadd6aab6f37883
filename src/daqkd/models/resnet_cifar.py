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

    def quantize_residuals(self, make_quantizer: Callable[[], nn.Module]) -> None:
        """Fake-quantize the residual stream: the stem's output, every block's residual branch (after
        bn2), projection shortcut and output, each with its own ``make_quantizer()``. Every tensor
        that an addition or a block reads is then on an integer grid (the shortcut of option A is
        the block's quantized input, subsampled and zero-padded), so the network runs in integer
        arithmetic from the stem to the pooling (daqkd.integer_export)."""
        self.stem_quantizer = make_quantizer()
        for block in self.blocks():
            block.residual_quantizer = make_quantizer()
            block.output_quantizer = make_quantizer()
            if block.projects:
                block.shortcut_quantizer = make_quantizer()

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
        out = self.stem_quantizer(F.relu(self.bn1(self.conv1(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.head(out)
