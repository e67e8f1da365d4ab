"""Colorization losses of Zhang et al. 2016 as pure functions (no state, no distributed calls).

Shapes: logits (B, Q, H, W); sparse soft targets idx / w (B, k, H, W) from :class:`pretext.encoding.SoftEncoder`;
dense targets (B, Q, H, W); masks (B, H, W) or (B,) bool selecting the pixels / images that carry colour.

:func:`rebalanced_softmax_loss` is the loss as released (``models/colorization_train_val_v2.prototxt``): the
``ClassRebalanceMultLayer`` of ``resources/caffe_traininglayers.py`` passes the logits through unchanged and
multiplies their gradient by the rebalancing factor times the grey-image mask, then the ``SoftmaxCrossEntropyLoss``
layer (``resources/softmax_cross_entropy_loss_layer.cpp``) computes sum_pixels KL(target || softmax) / batch size,
with the gradient (softmax - target) / batch size. So the value the release logs is the plain (un-rebalanced)
loss, while the update is rebalanced; the sum over pixels divided by the number of images is the release's
normalisation (``normalize="batch"``); ``normalize="pixel"`` (mean over the counted pixels) is an option.
:func:`multinomial_cross_entropy` is the textbook weighted cross-entropy (eq. 2 + 3), mean over pixels.

Example::

    enc = SoftEncoder(load_bins(), k=10)
    idx, w = enc(ab)                                # ab: (B, 2, h, w) at the logits' resolution
    loss, weighted = rebalanced_softmax_loss(logits, idx, w, pixel_weights(class_weights, idx, w), mask=nongray)
    loss.backward()                                 # loss.item(): plain loss; gradient: rebalanced
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


class _ClassRebalanceMult(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return grad * factor.unsqueeze(1).to(grad.dtype), None


def class_rebalance_mult(logits: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The release's ``ClassRebalanceMultLayer``: identity forward; backward multiplies the gradient of ``logits``
    (B, Q, H, W) by ``factor`` (B, H, W) (rebalancing weight x grey-image mask), per pixel, over all Q channels."""
    return _ClassRebalanceMult.apply(logits, factor.detach())


def softmax_kl(logits: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL(target || softmax(logits)) from a sparse target: (B, Q, H, W), (B, k, H, W) -> (B, H, W).

    Equals the cross-entropy minus the target's entropy (a constant), so its gradient is softmax - target, the
    ``SoftmaxCrossEntropyLoss`` gradient; zero target weights contribute nothing (0 log 0 = 0)."""
    logp = F.log_softmax(logits.float(), dim=1)
    return (torch.xlogy(w, w) - w * torch.gather(logp, 1, idx)).sum(dim=1)


def rebalanced_softmax_loss(
    logits: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    pixel_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalize: str = "batch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zhang et al.'s loss as released: plain value, rebalanced gradient.

    Args:
        logits: (B, Q, H, W). idx, w: (B, k, H, W) sparse soft encoding of the target.
        pixel_weight: (B, H, W) rebalancing factor per pixel (``pixel_weights``), or None (no rebalancing).
        mask: (B, H, W) or (B,) bool; pixels outside it neither count nor get a gradient (the grey-image mask).
        normalize: ``"batch"`` (sum over pixels / number of images, as released) or ``"pixel"`` (mean over the
            counted pixels).
    Returns:
        (loss, weighted): ``loss`` has the plain KL as its value and the rebalanced gradient
        d loss / d logits = pixel_weight * mask * (softmax - target) / norm; ``weighted`` (no gradient) is the
        rebalanced value sum(pixel_weight * mask * KL) / norm, i.e. the objective the gradient descends.
    """
    B = logits.shape[0]
    shape = (B, *logits.shape[-2:])
    m = _pixel_mask(mask, shape, logits.device)
    m = torch.ones(shape, device=logits.device) if m is None else m.float()
    factor = m if pixel_weight is None else m * pixel_weight.to(m.device).float()
    kl = softmax_kl(class_rebalance_mult(logits, factor), idx, w) * m
    if normalize == "batch":
        norm = float(B)
    elif normalize == "pixel":
        norm = m.sum().clamp(min=1.0)
    else:
        raise ValueError(f"normalize must be 'batch' or 'pixel', got {normalize!r}")
    loss = kl.sum() / norm
    weighted = (kl.detach() * factor).sum() / norm
    return loss, weighted


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


def l2_ab_loss(pred: torch.Tensor, ab: torch.Tensor, mask: torch.Tensor | None = None,
               normalize: str = "pixel") -> torch.Tensor:
    """Euclidean regression loss (Zhang et al. eq. 1): 1/2 ||pred - ab / AB_SCALE||^2 per pixel.

    Args: pred (B, 2, H, W) normalised ab prediction (ab / 110); ab (B, 2, H, W) ground truth in Lab units;
        mask (B, H, W) or (B,) bool; normalize ``"pixel"`` (mean over counted pixels) or ``"batch"`` (sum over
        counted pixels / number of images, the release's normalisation of its classification loss).
    """
    per_pixel = 0.5 * ((pred.float() - ab / AB_SCALE) ** 2).sum(dim=1)
    if normalize == "batch":
        m = _pixel_mask(mask, per_pixel.shape, pred.device)
        return (per_pixel if m is None else per_pixel * m).sum() / per_pixel.shape[0]
    if normalize != "pixel":
        raise ValueError(f"normalize must be 'batch' or 'pixel', got {normalize!r}")
    return _reduce(per_pixel, None, _pixel_mask(mask, per_pixel.shape, pred.device))
