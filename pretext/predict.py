"""From a network's output to colour: decode point estimates and colorize at full resolution.

A trained colorizer is described by its checkpoint (see ``pretext.train``): ``model_name`` / ``model_kwargs`` /
``model`` (weights), ``target`` (what the head predicts: ``ab313`` distributions over ``bins``, ``l2`` ab
regression in units of 1/AB_SCALE, or ``hue_chroma`` histograms; decoded by ``pretext.targets``) and ``bins``.

Full-resolution colorization follows the reference demo: the network sees L resized to ``size`` x ``size``, its
ab prediction is resized back bilinearly and combined with the *original* L. Unlike the demo, out-of-gamut
colours are brought into the sRGB gamut by reducing their chroma (:func:`fit_ab_to_gamut`) instead of clipping
R, G, B independently, so the output keeps the input's lightness exactly (up to 8-bit rounding).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .color import l_ab_to_rgb, lab_to_rgb, rgb_to_l
from .targets import Target, get_target


def _target(target: str | Target, bins: torch.Tensor | None) -> Target:
    return target if isinstance(target, Target) else get_target(target, bins)


def _autocast(device_type: str, dtype: torch.dtype | None):
    if dtype is None or device_type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def resize_l(L: torch.Tensor, size: int | None) -> torch.Tensor:
    """L (B, 1, H, W) -> (B, 1, size, size), antialiased bilinear (identity for ``size=None``)."""
    if size is None or tuple(L.shape[-2:]) == (size, size):
        return L
    return F.interpolate(L, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@torch.inference_mode()
def predict_ab(model: torch.nn.Module, L: torch.Tensor, target: str | Target, bins: torch.Tensor | None,
               size: int | None = 256, T: float = 0.38, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Predict ab for lightness ``L`` (B, 1, H, W) and return it at (H, W).

    The network runs on L resized to ``size`` x ``size`` (None: native size); the predicted ab is resized back
    bilinearly, so that it can be combined with the original full-resolution L (as the reference demo does).
    """
    ab = predict_ab_lowres(model, resize_l(L, size), target, bins, T, autocast_dtype)
    return F.interpolate(ab, size=tuple(L.shape[-2:]), mode="bilinear", align_corners=False)


@torch.inference_mode()
def predict_ab_lowres(model: torch.nn.Module, x: torch.Tensor, target: str | Target, bins: torch.Tensor | None,
                      T: float = 0.38, autocast_dtype: torch.dtype | None = None,
                      channels_last: bool = False) -> torch.Tensor:
    """The fast path: L already at the network's size (B, 1, s, s) -> ab at the network's output size (fp32).

    ``channels_last`` feeds the batch in NHWC (the model should have been converted with
    :func:`prepare_model`); ``autocast_dtype`` (bf16/fp16) runs the network in reduced precision, the decoding
    (softmax over bins, annealed mean) always in fp32. ``target``: a name (``pretext.targets.TARGETS``) or a target.
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device.type, autocast_dtype):
        out = model(x)
    return _target(target, bins).decode(out.float(), T)


def prepare_model(model: torch.nn.Module, device: torch.device | str = "cpu", channels_last: bool = True) -> torch.nn.Module:
    """eval mode, on ``device``, weights in channels_last (faster convolutions on CPU and tensor cores)."""
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _in_gamut(rgb: torch.Tensor, tol: float) -> torch.Tensor:
    return ((rgb >= -tol) & (rgb <= 1 + tol)).all(dim=-3)


def _bisect_chroma(lab: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """lab (3, N, 1) of out-of-gamut pixels -> the largest ab scale in [0, 1] (to 2^-iters) that is in gamut."""
    lo, hi = torch.zeros_like(lab[:1]), torch.ones_like(lab[:1])
    for _ in range(iters):
        mid = (lo + hi) / 2
        good = _in_gamut(lab_to_rgb(torch.cat([lab[:1], lab[1:] * mid]), clip=False), tol).unsqueeze(0)
        lo = torch.where(good, mid, lo)
        hi = torch.where(good, hi, mid)
    return lo


def _fit(L: torch.Tensor, ab: torch.Tensor, iters: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared by :func:`fit_ab_to_gamut` and :func:`compose_rgb`: (fitted ab, sRGB clipped to [0, 1])."""
    L = L.float().clamp(0.0, 100.0).expand(*ab.shape[:-3], 1, *ab.shape[-2:])
    lab = torch.cat([L, ab.float()], dim=-3)
    rgb = lab_to_rgb(lab, clip=False)
    ok = _in_gamut(rgb, tol)
    if bool(ok.all()):
        return lab[..., 1:, :, :], rgb.clamp_(0.0, 1.0)
    # only the out-of-gamut pixels, gathered as a (3, N, 1) "image", are searched and converted again
    bad = (~ok).reshape(-1).nonzero().squeeze(1)
    flat_lab = lab.movedim(-3, -1).reshape(-1, 3)
    sub = flat_lab[bad].t().unsqueeze(-1)
    scale = _bisect_chroma(sub, iters, tol)
    sub = torch.cat([sub[:1], sub[1:] * scale])
    flat_lab[bad] = sub.squeeze(-1).t()
    flat_rgb = rgb.movedim(-3, -1).reshape(-1, 3)
    flat_rgb[bad] = lab_to_rgb(sub, clip=False).squeeze(-1).t()
    unflat = lambda t: t.reshape(*ok.shape, 3).movedim(-1, -3)  # noqa: E731
    return unflat(flat_lab)[..., 1:, :, :], unflat(flat_rgb).clamp_(0.0, 1.0)


def fit_ab_to_gamut(L: torch.Tensor, ab: torch.Tensor, iters: int = 8, tol: float = 1e-4) -> torch.Tensor:
    """Scale each pixel's ab towards 0 (same hue, less chroma) until (L, ab) is inside the sRGB gamut.

    Grey (ab = 0) is in gamut for every L in [0, 100], so a per-pixel bisection on the scale s in [0, 1] always
    finds a colour that keeps L; in-gamut pixels are left untouched, and only the others are searched (cost: one
    Lab -> RGB conversion of the image plus ``iters`` + 1 of the out-of-gamut pixels). The scale is found to
    2^-iters, i.e. within 0.4 % of the chroma for the default 8 steps.

    Args:
        L: (..., 1, H, W) lightness in [0, 100]; ab: (..., 2, H, W).
    Returns:
        (..., 2, H, W) ab such that ``lab_to_rgb(L, ab)`` needs no clipping beyond ``tol``.
    """
    return _fit(L, ab, iters, tol)[0]


def compose_rgb(L: torch.Tensor, ab: torch.Tensor, gamut: str = "chroma") -> torch.Tensor:
    """Full-resolution L (..., 1, H, W) + ab (..., 2, H, W) -> sRGB in [0, 1].

    ``gamut='chroma'`` keeps L (see :func:`fit_ab_to_gamut`); ``'clip'`` clips R, G, B like the reference demo."""
    if gamut == "chroma":
        return _fit(L, ab, 8, 1e-4)[1]
    if gamut != "clip":
        raise ValueError(f"gamut must be 'chroma' or 'clip', got {gamut!r}")
    return l_ab_to_rgb(L.float(), ab.float())


def to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> uint8 (rounded, clipped)."""
    return rgb.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def colorize_rgb(model: torch.nn.Module, rgb: torch.Tensor, target: str | Target, bins: torch.Tensor | None,
                 size: int | None = 256, T: float = 0.38) -> torch.Tensor:
    """Colorize (B, 3, H, W) sRGB images in [0, 1] (only their lightness is used) -> (B, 3, H, W) sRGB."""
    L = rgb_to_l(rgb)
    return l_ab_to_rgb(L, predict_ab(model, L, target, bins, size=size, T=T))
