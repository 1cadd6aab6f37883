"""VGG with batch normalization for 32x32 input (Simonyan & Zisserman, ICLR 2015).

The 8-layer variant is the small student of the KD literature (as in Tian et al., CRD, ICLR 2020):
five conv stages ending in a 512-channel 1x1 map and a single linear head.
"""

from __future__ import annotations

import torch
from torch import nn

# Channel counts per conv layer; "M" is a 2x2 max pool.
VGG_CONFIGS: dict[int, list[int | str]] = {
    8: [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG-BN. Input (B, 3, 32, 32) float, output (B, num_classes) logits."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        layers: list[nn.Module] = []
        in_channels = 3
        for spec in VGG_CONFIGS[depth]:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(in_channels, int(spec), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(spec)),
                    nn.ReLU(inplace=True),
                ]
                in_channels = int(spec)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)
