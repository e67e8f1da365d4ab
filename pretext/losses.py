"""Colorization losses of Zhang et al. 2016 as pure functions (no state, no distributed calls).

Shapes: logits (B, Q, H, W); sparse soft targets idx / w (B, k, H, W) from :class:`pretext.encoding.SoftEncoder`;
dense targets (B, Q, H, W); masks (B, H, W) or (B,) bool selecting the pixels / images that carry colour.
Every loss is the mean over selected pixels (the paper sums; the mean keeps the learning rate independent of
resolution and batch size).

Example::

    enc = SoftEncoder(load_bins(), k=5)
    idx, w = enc(ab)                                # ab: (B, 2, h, w) at the logits' resolution
    loss = multinomial_cross_entropy(logits, idx, w, class_weights=weights)   # rebalanced (eq. 2 + 3)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .color import AB_SCALE
from .encoding import pixel_weights


def _pixel_mask(mask: torch.Tensor | None, shape: tuple[int, ...], device) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.to(device=device, dtype=torch.bool)
    if mask.dim() == 1:
        mask = mask.view(-1, 1, 1).expand(shape[0], shape[-2], shape[-1])
    return mask


def _reduce(per_pixel: torch.Tensor, weight: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        per_pixel = per_pixel * weight
    if mask is not None:
        m = mask.to(per_pixel.dtype)
        return (per_pixel * m).sum() / m.sum().clamp(min=1.0)
    return per_pixel.mean()


def multinomial_cross_entropy(
    logits: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multinomial cross-entropy against sparse soft targets (Zhang et al. eq. 2), optionally rebalanced (eq. 3).

    L = -sum_{h,w} v(Z_{h,w}) sum_q Z_{h,w,q} log softmax(logits)_{h,w,q}, where v = class weight of the
    target's argmax bin. Only the k target bins are gathered: the dense (B, Q, H, W) target is never built.

    Args:
        logits: (B, Q, H, W). idx, w: (B, k, H, W) sparse soft encoding.
        class_weights: (Q,) rebalancing weights, or None for the un-rebalanced loss.
        mask: (B, H, W) or (B,) bool; pixels outside it do not count.
    Returns: scalar mean loss.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    per_pixel = -(torch.gather(logp, 1, idx) * w).sum(dim=1)
    weight = pixel_weights(class_weights, idx, w) if class_weights is not None else None
    return _reduce(per_pixel, weight, _pixel_mask(mask, per_pixel.shape, logits.device))


def dense_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same loss from a dense target (B, Q, H, W): the textbook formula, used as the reference in tests and
    for targets that are not sparse (e.g. Larsson's histograms over the 313 bins)."""
    logp = F.log_softmax(logits.float(), dim=1)
    per_pixel = -(target * logp).sum(dim=1)
    weight = class_weights.to(logits.device)[target.argmax(dim=1)] if class_weights is not None else None
    return _reduce(per_pixel, weight, _pixel_mask(mask, per_pixel.shape, logits.device))


def l2_ab_loss(pred: torch.Tensor, ab: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean regression loss (Zhang et al. eq. 1): 1/2 ||pred - ab / AB_SCALE||^2 per pixel, averaged.

    Args: pred (B, 2, H, W) normalised ab prediction (ab / 110); ab (B, 2, H, W) ground truth in Lab units.
    """
    per_pixel = 0.5 * ((pred.float() - ab / AB_SCALE) ** 2).sum(dim=1)
    return _reduce(per_pixel, None, _pixel_mask(mask, per_pixel.shape, pred.device))
