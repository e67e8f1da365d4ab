"""Larsson et al.'s hue / chroma targets, loss and decoding, as released.

Paper: G. Larsson, M. Maire, G. Shakhnarovich, "Learning Representations for Automatic Colorization",
ECCV 2016. Release: gustavla/autocolorize (``train/train_vgg16.prototxt``, its Caffe layers under
``caffe/src/caffe/layers/`` and ``autocolorize/extraction.py``); PROVENANCE.md ("Pretext: Larsson et al.")
names the file of every constant.

Targets are computed from sRGB in [0, 1] (``BgrToMunsell``): value v = max(R, G, B), chroma
c = max - min, HSV hue h in [0, 1) (0 where c = 0). Hue and chroma are each quantised into 32 equal
bins of [0, 1] (``UniformToHistogram``: one-hot at bin int(32 x)), and the target of a point is the
histogram of its 7 x 7 window (``SparseHistogramExtractor``: the box clipped to the image, normalised).
The loss (``SoftmaxKLDLoss`` with ``normalization: FULL``) is, over the N sampled points,

    5 * sum_p c_p KL(t_h || softmax(z_h)) / N  +  1 * sum_p w(g_p) KL(t_c || softmax(z_c)) / N

with c_p the chroma at the point and w(g) = min(3g, 1, 3 - 3g) of its grey level g = (R + G + B) / 3
(the ``sr_*`` layers): chroma is not penalised at black and white, hue not where there is no colour.

Decoding (``calc_rgb_from_hue_chroma``, its default ``median:expectation-cf``): chroma is the centre of the
median bin, hue the circular mean, and chroma fades to 0 where the hue histogram is flat (|mean_k p_k
e^{2 pi i (k + 1/2) / 32}| < 0.03); then HSV with v = g + c / 2, s = 2c / (2g + c) gives RGB, whose mean
is reset to g (``match_lightness``). crosschannel keeps the input's L and uses the ab of that colour.

Dense targets for the trainer (``dense_targets``): channels [a, b] (Lab, for masks and logs), the hue
and chroma window histograms, the hue weight c and the chroma weight w(g), per pixel; the trainer picks
them at the sampled points (or output grid).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .color import grey_to_l, l_to_grey, rgb_to_lab

__all__ = ['N_BINS', 'N_HUE', 'N_CHROMA', 'WINDOW', 'HUE_LOSS_WEIGHT', 'CHROMA_LOSS_WEIGHT', 'GREY_MEAN',
           'rgb_to_hcv', 'release_grey', 'model_grey_l', 'chroma_weight', 'value_to_bin', 'window_histogram',
           'dense_targets', 'n_target_channels', 'softmax_kld', 'hue_chroma_loss', 'bin_centres', 'estimate_hue',
           'estimate_chroma', 'hsv_to_rgb', 'hue_chroma_to_rgb', 'decode_rgb', 'decode_ab']

N_BINS = 32                 #: UniformToHistogramParameter.bins default (add_to_caffe.proto), hue and chroma
N_HUE = N_CHROMA = N_BINS   #: prediction_h4 / prediction_c4 num_output 32 (train_vgg16.prototxt)
WINDOW = 7                  #: sparse_histogram_extractor_param size 7 (sparse_h, sparse_c)
HUE_LOSS_WEIGHT = 5.0       #: loss_h4 loss_weight
CHROMA_LOSS_WEIGHT = 1.0    #: loss_c4 loss_weight
GREY_MEAN = 0.4488          #: take_mean Power shift -0.4488 (on BGR in [0, 1])
GREY_SUM_SCALE = 0.33333    #: take_mean / take01_mean Power scale applied to B + G + R
FADE = 0.03                 #: extraction.py 'expectation-cf': cc.clip(0, 0.03) / 0.03
FLT_MIN = 1.17549435e-38    #: SoftmaxKLDLoss: log(max(p, FLT_MIN))


# ------------------------------------------------------------------------------------------------ targets
def rgb_to_hcv(rgb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``BgrToMunsell``: sRGB (..., 3, H, W) in [0, 1] -> hue in [0, 1), chroma = max - min, value = max,
    each (..., 1, H, W). Float32 arithmetic as the layer, the hue wrap in double (``fmod(out0 / 6.0 + 10.0,
    1.0)`` with double literals); ties pick red, then green, as the layer's if-chain."""
    rgb = rgb.float()
    r, g, b = rgb.narrow(-3, 0, 1), rgb.narrow(-3, 1, 1), rgb.narrow(-3, 2, 1)
    v = torch.maximum(r, torch.maximum(g, b))
    delta = v - torch.minimum(r, torch.minimum(g, b))
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    s = torch.where(v == 0, torch.zeros_like(v), delta / torch.where(v == 0, torch.ones_like(v), v))
    out0 = torch.where(r == v, (g - b) / safe, torch.where(g == v, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.remainder(out0.double() / 6.0 + 10.0, 1.0).float()
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    return h, s * v, v


def release_grey(rgb: torch.Tensor) -> torch.Tensor:
    """The release's grey level in [0, 1] (``data01``): 0.33333 (B + G + R), (..., 1, H, W)."""
    rgb = rgb.float()
    total = rgb.narrow(-3, 2, 1) + rgb.narrow(-3, 1, 1) + rgb.narrow(-3, 0, 1)  # Eltwise SUM of blue, green, red
    return GREY_SUM_SCALE * total


def model_grey_l(rgb: torch.Tensor) -> torch.Tensor:
    """What a Larsson network is fed in crosschannel: the L of the release's grey, so that a model taking L
    (every crosschannel model does) recovers that grey exactly with ``color.l_to_grey``. (..., 1, H, W)."""
    return grey_to_l(release_grey(rgb).clamp(0.0, 1.0))


def chroma_weight(grey01: torch.Tensor) -> torch.Tensor:
    """The chroma loss weight of a grey level (``sr_minus_x``, ``sr_x_minus_one``, ``sr_max``,
    ``sparse_chroma_weight``): -3 max(-g, -1/3, g - 1) = min(3g, 1, 3 - 3g)."""
    m = torch.maximum(torch.maximum(-grey01, torch.full_like(grey01, -0.3333333333)), grey01 - 1.0)
    return -3.0 * m


def value_to_bin(v: torch.Tensor, n_bins: int = N_BINS) -> torch.Tensor:
    """``UniformToHistogram``: the bin int(v * bins), the last for v >= 1 (long tensor, same shape)."""
    return torch.floor(v.float() * n_bins).clamp(0, n_bins - 1).long()


def window_histogram(v: torch.Tensor, n_bins: int = N_BINS, size: int = WINDOW) -> torch.Tensor:
    """Per pixel, the normalised histogram of the ``size`` x ``size`` window (``SparseHistogramExtractor`` over
    the one-hot ``UniformToHistogram``): rows y - size//2 .. y - size//2 + size - 1 (and columns likewise),
    clipped to the image. v (B, 1, H, W) in [0, 1] -> (B, n_bins, H, W)."""
    if v.dim() != 4 or v.shape[1] != 1:
        raise ValueError(f'window_histogram expects (B, 1, H, W), got {tuple(v.shape)}')
    h, w = v.shape[-2:]
    onehot = F.one_hot(value_to_bin(v[:, 0], n_bins), n_bins).permute(0, 3, 1, 2).float()
    half = size // 2
    pooled = F.avg_pool2d(onehot, size, stride=1, padding=half, count_include_pad=False)
    return pooled[..., :h, :w]  # even sizes give one extra row / column at the end


def n_target_channels(n_bins: int = N_BINS) -> int:
    """Channels of ``dense_targets``: ab, hue and chroma histograms, hue weight, chroma weight."""
    return 2 + 2 * n_bins + 2


def dense_targets(rgb: torch.Tensor, lab: Optional[torch.Tensor] = None, n_bins: int = N_BINS,
                  size: int = WINDOW) -> torch.Tensor:
    """Everything the loss needs at a pixel, for every pixel: (B, 2 + 2 n_bins + 2, H, W) =
    [a, b | hue histogram | chroma histogram | hue weight (chroma c) | chroma weight w(grey)].

    Args:
        rgb: (B, 3, H, W) sRGB in [0, 1] (the crop the network sees).
        lab: its Lab (computed if None); only a, b are used (grey-image masks, saturation logs).
    """
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        h, c, _ = rgb_to_hcv(rgb)
        ab = (rgb_to_lab(rgb.float()) if lab is None else lab.float())[:, 1:3]
        return torch.cat([ab, window_histogram(h, n_bins, size), window_histogram(c, n_bins, size), c,
                          chroma_weight(release_grey(rgb))], dim=1)


# ------------------------------------------------------------------------------------------------ loss
def softmax_kld(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) over dim 1 with 0 log 0 = 0 (``SoftmaxKLDLoss``, type KL_DIVERGENCE).

    Its gradient is softmax - target (the layer's backward). The layer's value floors p at FLT_MIN; the stable
    log-softmax used here only differs where p < 1e-38.
    """
    return (torch.xlogy(target, target) - target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def hue_chroma_loss(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    n_bins: int = N_BINS, hue_weight: float = HUE_LOSS_WEIGHT,
                    chroma_loss_weight: float = CHROMA_LOSS_WEIGHT) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released loss: ``hue_weight`` x mean_p c_p KL_hue + ``chroma_loss_weight`` x mean_p w_p KL_chroma.

    Args:
        logits: (B, 2 n_bins, ...) hue logits first (``prediction_h4``, ``prediction_c4``), e.g. (B, 64, P, 1).
        targets: (B, 2 + 2 n_bins + 2, ...) from ``dense_targets`` at the same positions.
        mask: optional (B,) or (B, ...) bool: positions outside it do not count (the release has none).
    Returns:
        (loss, hue term, chroma term), scalars. The mean is over all counted positions (``normalization: FULL``
        divides by the number of points of the batch).

    Example:
        >>> t = dense_targets(torch.rand(2, 3, 8, 8))
        >>> hue_chroma_loss(torch.zeros(2, 64, 8, 8), t)[0].shape
        torch.Size([])
    """
    n = n_bins
    if logits.shape[1] != 2 * n or targets.shape[1] != n_target_channels(n):
        raise ValueError(f'hue_chroma_loss: logits need {2 * n} channels and targets {n_target_channels(n)}, got '
                         f'{logits.shape[1]} and {targets.shape[1]}')
    t = targets.float()
    kl_h = softmax_kld(logits[:, :n], t[:, 2:2 + n]) * t[:, 2 + 2 * n]
    kl_c = softmax_kld(logits[:, n:], t[:, 2 + n:2 + 2 * n]) * t[:, 3 + 2 * n]
    if mask is None:
        hue, chroma = kl_h.mean(), kl_c.mean()
    else:
        m = mask.to(device=kl_h.device, dtype=kl_h.dtype)
        m = m.view(-1, *([1] * (kl_h.dim() - 1))).expand_as(kl_h) if m.dim() == 1 else m.expand_as(kl_h)
        count = m.sum().clamp(min=1.0)
        hue, chroma = (kl_h * m).sum() / count, (kl_c * m).sum() / count
    return hue_weight * hue + chroma_loss_weight * chroma, hue, chroma


# ------------------------------------------------------------------------------------------------ decoding
def bin_centres(n_bins: int = N_BINS, device=None) -> torch.Tensor:
    """(k + 0.5) / n_bins, the value each bin stands for (extraction.py ``spaced``)."""
    return (torch.arange(n_bins, device=device, dtype=torch.float32) + 0.5) / n_bins


def estimate_hue(probs: torch.Tensor, method: str = 'expectation-cf') -> Tuple[torch.Tensor, torch.Tensor]:
    """Hue in [0, 1) from a histogram over dim 1, and the chroma fading factor (1 unless 'expectation-cf').

    Methods of ``calc_rgb_from_hue_chroma``: 'expectation-cf' (circular mean; factor = min(|mean_k p_k
    e^{2 pi i centre_k}|, 0.03) / 0.03), 'expectation', 'mode', 'median'. (B, n, ...) -> two (B, 1, ...).
    """
    n = probs.shape[1]
    centre = bin_centres(n, probs.device).view(1, n, *([1] * (probs.dim() - 2)))
    ones = torch.ones_like(probs[:, :1])
    if method in ('expectation', 'expectation-cf'):
        re = (probs * torch.cos(2 * math.pi * centre)).sum(1, keepdim=True)
        im = (probs * torch.sin(2 * math.pi * centre)).sum(1, keepdim=True)
        hue = torch.remainder(torch.atan2(im, re) / (2 * math.pi), 1.0)
        if method == 'expectation':
            return hue, ones
        return hue, (torch.sqrt(re * re + im * im) / n).clamp(0, FADE) / FADE
    if method == 'mode':
        return (probs.argmax(1, keepdim=True).float() + 0.5) / n, ones
    if method == 'median':
        return ((probs.cumsum(1) < 0.5).sum(1, keepdim=True).float() + 0.5) / n, ones
    raise ValueError(f"hue method must be expectation-cf, expectation, mode or median; got {method!r}")


def estimate_chroma(probs: torch.Tensor, method: str = 'median') -> torch.Tensor:
    """Chroma in [0, 1] from a histogram over dim 1: 'median' (the centre of the bin where the CDF reaches 0.5,
    the release's default), 'expectation', 'mode' (the bin's lower edge, as released), 'q75'."""
    n = probs.shape[1]
    if method == 'median':
        return ((probs.cumsum(1) < 0.5).sum(1, keepdim=True).float() + 0.5) / n
    if method == 'q75':
        return ((probs.cumsum(1) < 0.75).sum(1, keepdim=True).float() + 0.5) / n
    if method == 'expectation':
        return (probs * bin_centres(n, probs.device).view(1, n, *([1] * (probs.dim() - 2)))).sum(1, keepdim=True)
    if method == 'mode':
        return probs.argmax(1, keepdim=True).float() / n
    raise ValueError(f"chroma method must be median, expectation, mode or q75; got {method!r}")


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV (B, 3, ...) in [0, 1] -> RGB (as ``skimage.color.hsv2rgb``)."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    i = i.long() % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = torch.zeros_like(torch.cat([v, v, v], 1))
    for k, (r, g, b) in enumerate(choices):
        rgb = torch.where(i == k, torch.cat([r, g, b], 1), rgb)
    return rgb


def hue_chroma_to_rgb(hue: torch.Tensor, chroma: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    """The release's colour from hue, chroma (each (B, 1, ...), in [0, 1]) and the grey level (B, 1, ...):
    v = g + c/2, s = 2c / (2g + c) (s = 0 where g = c = 0; the release divides 0 by 0 there), HSV clipped to
    [0, 1] -> RGB clipped to [0, 1], then ``match_lightness``: RGB - mean(RGB) + g, clipped."""
    v = grey + chroma / 2
    den = 2 * grey + chroma
    s = torch.where(den > 0, 2 * chroma / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    rgb = hsv_to_rgb(torch.cat([hue, s, v], 1).clamp(0, 1)).clamp(0, 1)
    return (rgb - rgb.mean(1, keepdim=True) + grey).clamp(0, 1)


def decode_rgb(logits: torch.Tensor, grey: torch.Tensor, n_bins: int = N_BINS, hue_method: str = 'expectation-cf',
               chroma_method: str = 'median') -> torch.Tensor:
    """(B, 2 n_bins, h, w) logits and the grey level (B, 1, h, w) in [0, 1] -> sRGB (B, 3, h, w), as released."""
    probs = logits.float()
    hue, factor = estimate_hue(probs[:, :n_bins].softmax(1), hue_method)
    chroma = estimate_chroma(probs[:, n_bins:].softmax(1), chroma_method) * factor
    return hue_chroma_to_rgb(hue, chroma, grey)


def decode_ab(logits: torch.Tensor, L: Optional[torch.Tensor] = None, n_bins: int = N_BINS,
              hue_method: str = 'expectation-cf', chroma_method: str = 'median') -> torch.Tensor:
    """Point estimate ab (B, 2, h, w): the ab of ``decode_rgb`` at the input's grey level.

    ``L`` (B, 1, H, W) is the input lightness (resized to the logits' size when it differs); without it (the
    trainer's saturation log, which only sees the output) the grey level is the release's data mean 0.4488.
    """
    if L is None:
        grey = torch.full_like(logits[:, :1].float(), GREY_MEAN)
    else:
        if L.shape[-2:] != logits.shape[-2:]:
            L = F.interpolate(L.float(), size=tuple(logits.shape[-2:]), mode='bilinear', align_corners=False)
        grey = l_to_grey(L.float())
    return rgb_to_lab(decode_rgb(logits, grey, n_bins, hue_method, chroma_method))[:, 1:3]
