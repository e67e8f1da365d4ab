"""From a network's output to colour: decode point estimates and colorize at full resolution.

A trained colorizer is described by its checkpoint (see ``pretext.train``): ``model_name`` / ``model_kwargs`` /
``model`` (weights), ``target`` (what the head predicts: ``ab313`` distributions over ``bins``, ``l2`` ab
regression in units of 1/AB_SCALE, or ``hue_chroma`` histograms) and ``bins``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .color import AB_SCALE, lab_to_rgb, rgb_to_l
from .encoding import annealed_mean


def decode_ab(output: torch.Tensor, target: str, bins: torch.Tensor | None, T: float = 0.38) -> torch.Tensor:
    """Network output (B, C, h, w) -> ab point estimate (B, 2, h, w) in Lab units."""
    if target == "ab313":
        return annealed_mean(output, bins, T)
    if target == "l2":
        return output.float() * AB_SCALE
    if target == "hue_chroma":
        from .hue_chroma import decode_ab as hc_decode

        return hc_decode(output.float())
    raise ValueError(f"unknown target '{target}' (expected ab313, l2 or hue_chroma)")


@torch.inference_mode()
def predict_ab(model: torch.nn.Module, L: torch.Tensor, target: str, bins: torch.Tensor | None,
               size: int | None = 256, T: float = 0.38, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Predict ab for lightness ``L`` (B, 1, H, W) and return it at (H, W).

    The network runs on L resized to ``size`` x ``size`` (None: native size); the predicted ab is resized back
    bilinearly, so that it can be combined with the original full-resolution L (as the reference demo does).
    """
    H, W = L.shape[-2:]
    x = L if size is None else F.interpolate(L, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if autocast_dtype is not None and x.device.type in ("cuda", "cpu"):
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            out = model(x)
    else:
        out = model(x)
    ab = decode_ab(out.float(), target, bins, T)
    return F.interpolate(ab, size=(H, W), mode="bilinear", align_corners=False)


def colorize_rgb(model: torch.nn.Module, rgb: torch.Tensor, target: str, bins: torch.Tensor | None,
                 size: int | None = 256, T: float = 0.38) -> torch.Tensor:
    """Colorize (B, 3, H, W) sRGB images in [0, 1] (only their lightness is used) -> (B, 3, H, W) sRGB."""
    L = rgb_to_l(rgb)
    ab = predict_ab(model, L, target, bins, size=size, T=T)
    return lab_to_rgb(torch.cat([L, ab], dim=1))
