"""Image operations with a different parameter for every image of a batch.

torchvision's v2 kernels take one parameter per call, so a batch would get one augmentation. These
kernels take uint8 images (N, C, H, W) and one magnitude per image, shape (N,), and compute what
``torchvision.transforms.v2.functional`` computes image by image (the tests check equality), in a
few batched tensor ops: cheap on CPU, and on the GPU they run on the device beside the model.

Magnitudes follow torchvision's AutoAugment conventions (``_AutoAugmentBase``): shear is the
shear coefficient (the angle is atan of it), translation is in pixels (truncated to int), rotation
in degrees, the color ops take ``factor - 1``, posterize the number of bits kept, solarize the
threshold as a fraction of 255.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

BatchOp = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


def inverse_affine_matrices(
    angle: torch.Tensor,
    translate: torch.Tensor,
    shear: torch.Tensor,
    center: torch.Tensor,
) -> torch.Tensor:
    """Batched ``torchvision.transforms.v2.functional._geometry._get_inverse_affine_matrix``.

    angle (N,) degrees; translate, shear (N, 2) pixels and degrees; center (N, 2) pixels relative to
    the image center. Returns (N, 2, 3) float64 matrices mapping output to input coordinates
    (scale 1).
    """
    rot = torch.deg2rad(angle)
    sx, sy = torch.deg2rad(shear[:, 0]), torch.deg2rad(shear[:, 1])
    cx, cy = center[:, 0], center[:, 1]
    tx, ty = translate[:, 0], translate[:, 1]
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -(c * torch.tan(sx)) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3)


def warp_affine(images: torch.Tensor, matrices: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Apply one inverse affine matrix per image with zero fill, as torchvision's tensor kernel.

    images (N, C, H, W) uint8, matrices (N, 2, 3) -> (N, C, H, W) uint8.
    """
    n, _, h, w = images.shape
    theta = matrices.to(device=images.device, dtype=torch.float32)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=images.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=images.device)
    base = torch.stack(
        [xs.expand(h, w), ys.unsqueeze(1).expand(h, w), torch.ones(h, w, device=images.device)],
        dim=-1,
    ).view(1, h * w, 3)
    scale = torch.tensor([0.5 * w, 0.5 * h], device=images.device)
    grid = base.expand(n, -1, -1).bmm(theta.transpose(1, 2) / scale).view(n, h, w, 2)
    out = F.grid_sample(
        images.float(), grid, mode=interpolation, padding_mode="zeros", align_corners=False
    )
    return out.round_().to(torch.uint8)


def _zeros2(n: int) -> torch.Tensor:
    return torch.zeros(n, 2, dtype=torch.float64)


def _shear_matrices(magnitude: torch.Tensor, axis: int, height: int, width: int) -> torch.Tensor:
    n = len(magnitude)
    shear = _zeros2(n)
    shear[:, axis] = torch.rad2deg(torch.atan(magnitude.double()))
    center = torch.tensor([[-0.5 * width, -0.5 * height]], dtype=torch.float64).expand(n, 2)
    return inverse_affine_matrices(torch.zeros(n, dtype=torch.float64), _zeros2(n), shear, center)


def _translate_matrices(magnitude: torch.Tensor, axis: int) -> torch.Tensor:
    n = len(magnitude)
    translate = _zeros2(n)
    translate[:, axis] = magnitude.double().trunc()
    return inverse_affine_matrices(torch.zeros(n, dtype=torch.float64), translate, _zeros2(n), _zeros2(n))


def shear_x_matrices(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Horizontal shear by coefficient ``magnitude`` about the top-left corner: (N, 2, 3)."""
    return _shear_matrices(magnitude, 0, height, width)


def shear_y_matrices(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Vertical shear by coefficient ``magnitude`` about the top-left corner: (N, 2, 3)."""
    return _shear_matrices(magnitude, 1, height, width)


def translate_x_matrices(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Shift right by ``int(magnitude)`` pixels (left if negative): (N, 2, 3)."""
    return _translate_matrices(magnitude, 0)


def translate_y_matrices(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Shift down by ``int(magnitude)`` pixels (up if negative): (N, 2, 3)."""
    return _translate_matrices(magnitude, 1)


def rotate_matrices(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rotate counter-clockwise by ``magnitude`` degrees about the center: (N, 2, 3)."""
    n = len(magnitude)
    return inverse_affine_matrices(-(magnitude.double() % 360), _zeros2(n), _zeros2(n), _zeros2(n))


def rotate_exactly(images: torch.Tensor, warped: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``warped`` (the rotation of ``images`` by ``magnitude`` degrees through the affine warp) with
    multiples of 90 degrees replaced by torchvision's exact fast path (rot90), as ``F.rotate`` does."""
    h, w = images.shape[-2:]
    angle = magnitude.double() % 360
    for degrees, k in ((0.0, 0), (90.0, 1), (180.0, 2), (270.0, 3)):
        exact = angle == degrees
        if (k % 2 == 1 and h != w) or not bool(exact.any()):
            continue
        on_device = exact.to(images.device)
        warped[on_device] = torch.rot90(images[on_device], k=k, dims=(-2, -1))
    return warped


# The geometric ops: one inverse affine matrix per image, so images under different ones share a
# single warp (apply_ops in policies.py); magnitude (N,), image height, width -> (N, 2, 3) float64.
AFFINE_MATRICES: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "ShearX": shear_x_matrices,
    "ShearY": shear_y_matrices,
    "TranslateX": translate_x_matrices,
    "TranslateY": translate_y_matrices,
    "Rotate": rotate_matrices,
}


def shear_x(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Horizontal shear by coefficient ``magnitude`` about the top-left corner."""
    return warp_affine(images, shear_x_matrices(magnitude, *images.shape[-2:]), interpolation)


def shear_y(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Vertical shear by coefficient ``magnitude`` about the top-left corner."""
    return warp_affine(images, shear_y_matrices(magnitude, *images.shape[-2:]), interpolation)


def translate_x(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Shift right by ``int(magnitude)`` pixels (left if negative), zero fill."""
    return warp_affine(images, translate_x_matrices(magnitude, *images.shape[-2:]), interpolation)


def translate_y(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Shift down by ``int(magnitude)`` pixels (up if negative), zero fill."""
    return warp_affine(images, translate_y_matrices(magnitude, *images.shape[-2:]), interpolation)


def rotate(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Rotate counter-clockwise by ``magnitude`` degrees about the center, zero fill (multiples of
    90 degrees exactly, :func:`rotate_exactly`)."""
    warped = warp_affine(images, rotate_matrices(magnitude, *images.shape[-2:]), interpolation)
    return rotate_exactly(images, warped, magnitude)


def blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``ratio * images + (1 - ratio) * other`` clamped to [0, 255] and truncated to uint8.

    ratio (N,) per image; other broadcasts against images.
    """
    # torchvision multiplies float32 pixels by Python floats: round both factors from float64.
    r = ratio.double().view(-1, 1, 1, 1)
    keep, mix = r.float().to(images.device), (1.0 - r).float().to(images.device)
    return torch.addcmul(images * keep, other, mix).clamp_(0, 255).to(torch.uint8)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma as float, floored, (N, 1, H, W): torchvision's degenerate for color ops."""
    r, g, b = images.float().unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1).floor_()


def brightness(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Scale intensities by ``1 + magnitude``."""
    return blend(images, torch.zeros((), device=images.device), 1.0 + magnitude)


def color(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Saturation: blend with the grayscale image, factor ``1 + magnitude``."""
    return blend(images, grayscale(images), 1.0 + magnitude)


def contrast(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Contrast: blend with the mean gray level, factor ``1 + magnitude``."""
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return blend(images, mean, 1.0 + magnitude)


def sharpness(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Blend the interior with a 3x3 smoothed image (PIL's SMOOTH kernel), factor ``1 + magnitude``.

    Border pixels stay as they are, as in PIL and torchvision.
    """
    _n, c, h, w = images.shape
    if h <= 2 or w <= 2:
        return images.clone()
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], device=images.device)
    blurred = F.conv2d(images.float(), kernel.expand(c, 1, 3, 3), groups=c).round_()
    out = images.float()
    interior = out[..., 1:-1, 1:-1]
    # x + (1 - factor) * (blurred - x) with one rounding, as torchvision's add_(..., alpha=1 - factor),
    # which fuses the multiply-add (a separate mul_ rounds twice: 0.8 % of pixels one level off)
    mix = (-magnitude.double()).float().to(images.device).view(-1, 1, 1, 1)
    interior.addcmul_(blurred.sub_(interior), mix)
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Keep the ``int(magnitude)`` most significant bits of each value."""
    bits = magnitude.to(torch.int64).clamp(0, 8)
    masks = ((1 << bits) - 1) << (8 - bits)
    return images & masks.to(device=images.device, dtype=torch.uint8).view(-1, 1, 1, 1)


def solarize(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Invert values at or above ``255 * magnitude``, compared in float32 as torchvision compares a
    uint8 image with a Python float (bin 8 of 31: 187.000004 in float64, 187.0 in float32)."""
    threshold = (255.0 * magnitude.double()).float().to(images.device).view(-1, 1, 1, 1)
    return torch.where(images >= threshold, 255 - images, images)


def autocontrast(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Stretch each channel of each image to [0, 255] (torchvision's kernel is per image)."""
    return TF.autocontrast(images)


def equalize(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Histogram-equalize each channel of each image (torchvision's kernel is per image)."""
    return TF.equalize(images)


def invert(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """255 - x."""
    return 255 - images


def identity(images: torch.Tensor, magnitude: torch.Tensor, interpolation: str) -> torch.Tensor:
    """The image unchanged."""
    return images


BATCH_OPS: dict[str, BatchOp] = {
    "Identity": identity,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
    "Brightness": brightness,
    "Color": color,
    "Contrast": contrast,
    "Sharpness": sharpness,
    "Posterize": posterize,
    "Solarize": solarize,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": invert,
}
