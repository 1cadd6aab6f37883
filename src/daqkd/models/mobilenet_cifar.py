"""MobileNetV2 (Sandler et al., CVPR 2018) adapted to 32x32 input.

torchvision's implementation with the usual CIFAR changes: the stem and the second stage keep the
stride at 1, so a 32x32 image ends as a 4x4 map instead of 1x1.
"""

from __future__ import annotations

from torchvision.models import MobileNetV2

# (expansion t, channels c, repeats n, first stride s): ImageNet setting with s=1 in stage 2.
CIFAR_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def cifar_mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for 32x32 input. Input (B, 3, 32, 32) float, output (B, num_classes) logits."""
    model = MobileNetV2(
        num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=CIFAR_SETTING
    )
    model.features[0][0].stride = (1, 1)
    return model
