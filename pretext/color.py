"""sRGB <-> CIE Lab (D65, 2 degree observer) as pure, batched, differentiable float32 torch functions.

Conventions used across crosschannel:
    * RGB images are float tensors in [0, 1], channels at dim -3: (..., 3, H, W).
    * Lab images are float32 (..., 3, H, W) with L in [0, 100] and a, b roughly in [-110, 110].
    * There is no 8-bit Lab anywhere: quantising Lab to uint8 (as OpenCV does) loses colour precision.

The maths match ``skimage.color.rgb2lab`` / ``lab2rgb`` (same matrix, white point and piecewise functions), so
results agree to ~1e-4 in L, a, b units.
"""
from __future__ import annotations

import functools

import torch

# Constants of the colorization task (one place).
L_CENT = 50.0  #: networks see (L - L_CENT) / L_NORM
L_NORM = 100.0
AB_SCALE = 110.0  #: |a|, |b| bound used to normalise regression targets (Zhang et al.)

_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS = 0.008856  # (6/29)^3
_KAPPA = 7.787  # (29/6)^2 / 3


def _float32_maths(fn):
    """Colour maths always run in float32 (or float64), also inside an autocast region (AMP would otherwise run the
    matrix products in bf16/fp16: errors of ~0.6 L and ~2 ab units, enough to move soft-encoded targets)."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        if x.device.type in ("cuda", "cpu", "mps", "xpu"):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return wrapper


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix over the channel dim (-3)."""
    return torch.einsum("ij,...jhw->...ihw", m.to(device=x.device, dtype=x.dtype), x)


def _check(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"{name} expects (..., 3, H, W), got shape {tuple(x.shape)}")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    high = torch.pow(((rgb.clamp(min=0.04045) + 0.055) / 1.055), 2.4)
    return torch.where(rgb > 0.04045, high, rgb / 12.92)


def linear_to_srgb(lin: torch.Tensor) -> torch.Tensor:
    high = 1.055 * torch.pow(lin.clamp(min=0.0031308), 1.0 / 2.4) - 0.055
    return torch.where(lin > 0.0031308, high, lin * 12.92)


@_float32_maths
def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE Lab.

    Args:
        rgb: (..., 3, H, W) float tensor in [0, 1] (any device; differentiable).
    Returns:
        (..., 3, H, W) float tensor: L in [0, 100], a and b in about [-128, 128].
    """
    rgb = _check(rgb, "rgb_to_lab")
    xyz = _mix(_XYZ_FROM_RGB, srgb_to_linear(rgb))
    xyz = xyz / _WHITE_D65.to(device=xyz.device, dtype=xyz.dtype).view(3, 1, 1)
    f = torch.where(xyz > _EPS, torch.pow(xyz.clamp(min=_EPS), 1.0 / 3.0), _KAPPA * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-3)
    L = 116.0 * fy - 16.0
    a = 500.0 * (fx - fy)
    b = 200.0 * (fy - fz)
    return torch.stack([L, a, b], dim=-3)


@_float32_maths
def lab_to_rgb(lab: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """CIE Lab -> sRGB in [0, 1]; out-of-gamut colours are clipped to [0, 1] (as skimage does).

    Args:
        lab: (..., 3, H, W) float tensor, L in [0, 100].
        clip: clip the result to [0, 1] (default). ``False`` returns the unclipped sRGB values.
    Returns:
        (..., 3, H, W) float tensor.
    """
    lab = _check(lab, "lab_to_rgb")
    L, a, b = lab.unbind(-3)
    fy = (L + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp(min=0.0)  # skimage clips negative z the same way
    f = torch.stack([fx, fy, fz], dim=-3)
    xyz = torch.where(f > 0.2068966, f.pow(3), (f - 16.0 / 116.0) / _KAPPA)
    xyz = xyz * _WHITE_D65.to(device=xyz.device, dtype=xyz.dtype).view(3, 1, 1)
    rgb = linear_to_srgb(_mix(_RGB_FROM_XYZ, xyz))
    return rgb.clamp(0.0, 1.0) if clip else rgb


@_float32_maths
def rgb_to_l(rgb: torch.Tensor) -> torch.Tensor:
    """Lightness only: (..., 3, H, W) sRGB in [0, 1] -> (..., 1, H, W) L in [0, 100]."""
    rgb = _check(rgb, "rgb_to_l")
    y = torch.einsum("j,...jhw->...hw", _XYZ_FROM_RGB[1].to(device=rgb.device, dtype=rgb.dtype), srgb_to_linear(rgb))
    fy = torch.where(y > _EPS, torch.pow(y.clamp(min=_EPS), 1.0 / 3.0), _KAPPA * y + 16.0 / 116.0)
    return (116.0 * fy - 16.0).unsqueeze(-3)


def l_ab_to_rgb(L: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Combine lightness (..., 1, H, W) and ab (..., 2, H, W) into sRGB in [0, 1]."""
    return lab_to_rgb(torch.cat([L, ab], dim=-3))


def gray_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """Desaturate: keep L, set ab = 0, back to sRGB (the 'all-gray' baseline image)."""
    L = rgb_to_l(rgb)
    return lab_to_rgb(torch.cat([L, torch.zeros_like(L).expand(*L.shape[:-3], 2, *L.shape[-2:])], dim=-3))


def grey_to_l(grey: torch.Tensor) -> torch.Tensor:
    """sRGB grey level (..., 1, H, W) in [0, 1] -> the L of that grey (R = G = B = grey); inverse of ``l_to_grey``."""
    y = srgb_to_linear(grey if grey.dtype in (torch.float32, torch.float64) else grey.float())
    fy = torch.where(y > _EPS, torch.pow(y.clamp(min=_EPS), 1.0 / 3.0), _KAPPA * y + 16.0 / 116.0)
    return 116.0 * fy - 16.0


def l_to_grey(L: torch.Tensor) -> torch.Tensor:
    """L (..., 1, H, W) in [0, 100] -> the sRGB grey level in [0, 1] with that lightness (a = b = 0)."""
    L = L if L.dtype in (torch.float32, torch.float64) else L.float()
    fy = (L + 16.0) / 116.0
    y = torch.where(fy > 0.2068966, fy.pow(3), (fy - 16.0 / 116.0) / _KAPPA)
    return linear_to_srgb(y.clamp(min=0.0)).clamp(0.0, 1.0)
