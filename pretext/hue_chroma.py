"""Hue/chroma histogram targets, loss and decoding (Larsson et al.'s alternative colour target).

Paper: G. Larsson, M. Maire, G. Shakhnarovich, "Learning Representations for Automatic
Colorization", ECCV 2016, Sec. 3.2 ("Hue/chroma").

Colour is expressed in LCh instead of ab: chroma ``C = |ab|`` and hue ``h = atan2(b, a)`` in
[0, 2 pi). Each is predicted as a histogram over its own bins:

* hue: ``n_hue`` bins centred at ``2 pi k / n_hue``, circular (bin n_hue-1 neighbours bin 0);
* chroma: ``n_chroma`` bins centred at ``linspace(0, c_max, n_chroma)``; chroma above ``c_max``
  clamps to the last bin (sRGB chroma reaches ~134 at blue, but almost all natural pixels are < 100).

Soft targets use linear (triangular-kernel) assignment to the two nearest bin centres, so the
expectation of a chroma target is exactly the clamped chroma and the circular mean of a hue target
is within a fraction of a bin of the hue. The loss is the KL divergence of each predicted histogram
from its target; since hue is undefined for grey pixels, the hue term is weighted by the ground-truth
chroma (normalised by ``c_max`` to [0, 1]) and by ``lambda_hue`` (5 in the paper):

    loss = mean_pixels[ KL(t_C || p_C) + lambda_hue * (C / c_max) * KL(t_h || p_h) ]

All functions are pure float32 torch ops on batches; the histogram/channel dimension is -3, like
ab in ``pretext.color`` (so both dense (B,2,H,W) maps and sparse point sets (B,2,P,1) work).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['N_HUE', 'N_CHROMA', 'C_MAX', 'ab_to_hue_chroma', 'hue_chroma_to_ab', 'hue_centres',
           'chroma_centres', 'encode_hue_chroma', 'split_logits', 'hue_chroma_kl', 'decode_hue_chroma',
           'hue_chroma_loss', 'decode_ab']

N_HUE = 32
N_CHROMA = 32
C_MAX = 130.0
TWO_PI = 2 * math.pi


def ab_to_hue_chroma(ab: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """ab (..., 2, H, W) -> (hue in [0, 2 pi), chroma >= 0), each (..., 1, H, W)."""
    a, b = ab.narrow(-3, 0, 1), ab.narrow(-3, 1, 1)
    chroma = torch.sqrt(a * a + b * b)
    hue = torch.remainder(torch.atan2(b, a), TWO_PI)
    return hue, chroma


def hue_chroma_to_ab(hue: torch.Tensor, chroma: torch.Tensor) -> torch.Tensor:
    """(hue, chroma) each (..., 1, H, W) -> ab (..., 2, H, W)."""
    return torch.cat([chroma * torch.cos(hue), chroma * torch.sin(hue)], dim=-3)


def hue_centres(n_hue: int = N_HUE, device=None) -> torch.Tensor:
    """(n_hue,) bin centres 2 pi k / n_hue."""
    return torch.arange(n_hue, device=device, dtype=torch.float32) * (TWO_PI / n_hue)


def chroma_centres(n_chroma: int = N_CHROMA, c_max: float = C_MAX, device=None) -> torch.Tensor:
    """(n_chroma,) bin centres linspace(0, c_max, n_chroma)."""
    return torch.linspace(0, c_max, n_chroma, device=device, dtype=torch.float32)


def _linear_assign(pos: torch.Tensor, n: int, circular: bool) -> torch.Tensor:
    """pos (..., 1, H, W) in bin units -> (..., n, H, W) weights on the two nearest bins (sum 1)."""
    if not circular:
        pos = pos.clamp(0, n - 1)
    lo = torch.floor(pos)
    frac = pos - lo
    lo = lo.long()
    hi = lo + 1
    if circular:
        lo, hi = lo % n, hi % n
    else:
        hi = hi.clamp(max=n - 1)  # pos == n-1: frac == 0, the hi weight is 0 anyway
    shape = list(pos.shape)
    shape[-3] = n
    hist = pos.new_zeros(shape)
    hist.scatter_add_(-3, lo, 1 - frac)
    hist.scatter_add_(-3, hi, frac)
    return hist


def encode_hue_chroma(ab: torch.Tensor, n_hue: int = N_HUE, n_chroma: int = N_CHROMA, c_max: float = C_MAX
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft hue and chroma histogram targets.

    Args:
        ab: (..., 2, H, W) float32 Lab a, b.
    Returns:
        hue_hist (..., n_hue, H, W), chroma_hist (..., n_chroma, H, W) (each sums to 1 over dim -3),
        chroma (..., 1, H, W) (unclamped, for the hue weight).

    Example:
        >>> th, tc, c = encode_hue_chroma(torch.tensor([30., 40.]).view(1, 2, 1, 1))
        >>> float(c)
        50.0
    """
    hue, chroma = ab_to_hue_chroma(ab.float())
    hue_hist = _linear_assign(hue * (n_hue / TWO_PI), n_hue, circular=True)
    chroma_hist = _linear_assign(chroma * ((n_chroma - 1) / c_max), n_chroma, circular=False)
    return hue_hist, chroma_hist, chroma


def split_logits(logits: torch.Tensor, n_hue: int = N_HUE) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, n_hue + n_chroma, ...) -> (hue logits, chroma logits); hue first, as in the hue_chroma head."""
    return logits[:, :n_hue], logits[:, n_hue:]


def _kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # KL(t || softmax(logits)) over dim 1, with 0 log 0 = 0
    return (torch.xlogy(target, target) - target * F.log_softmax(logits, dim=1)).sum(dim=1)


def hue_chroma_kl(logits: torch.Tensor, hue_target: torch.Tensor, chroma_target: torch.Tensor,
                  chroma: torch.Tensor, c_max: float = C_MAX, lambda_hue: float = 5.0,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Larsson et al. hue/chroma loss: KL(chroma) + lambda_hue * (C / c_max) * KL(hue), mean over pixels.

    Args:
        logits: (B, n_hue + n_chroma, H, W) (or (B, n, P, 1) at sampled points), hue logits first.
        hue_target: (B, n_hue, H, W); chroma_target: (B, n_chroma, H, W) from ``encode_hue_chroma``.
        chroma: (B, 1, H, W) ground-truth chroma, the hue weight (clamped to [0, 1] after / c_max).
        mask: optional (B, H, W) or (B,) bool; pixels / images outside it do not count.
    Returns:
        scalar loss (mean over the counted pixels).

    Example:
        >>> th, tc, c = encode_hue_chroma(torch.randn(2, 2, 4, 4) * 30)
        >>> hue_chroma_kl(torch.zeros(2, 64, 4, 4), th, tc, c).shape
        torch.Size([])
    """
    hue_logits, chroma_logits = split_logits(logits, hue_target.shape[1])
    if chroma_logits.shape[1] != chroma_target.shape[1]:
        raise ValueError(f'logits have {logits.shape[1]} channels, '
                         f'targets {hue_target.shape[1]} + {chroma_target.shape[1]}')
    w = (chroma[:, 0] / c_max).clamp(0, 1)
    per_pixel = _kl(chroma_target, chroma_logits) + lambda_hue * w * _kl(hue_target, hue_logits)  # (B, H, W)
    if mask is None:
        return per_pixel.mean()
    m = mask.to(device=per_pixel.device, dtype=per_pixel.dtype)
    m = m.view(-1, 1, 1).expand_as(per_pixel) if m.dim() == 1 else m
    return (per_pixel * m).sum() / m.sum().clamp(min=1.0)


def hue_chroma_loss(logits: torch.Tensor, ab: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    n_hue: int = N_HUE, c_max: float = C_MAX, lambda_hue: float = 5.0) -> torch.Tensor:
    """Encode ab targets and return ``hue_chroma_kl``; n_chroma is ``logits.shape[1] - n_hue``.

    Args:
        logits: (B, n_hue + n_chroma, H, W) or (B, n, P, 1); ab: (B, 2, H, W) / (B, 2, P, 1) at the
        same resolution; mask: optional (B, H, W) or (B,) bool.
    """
    n_chroma = logits.shape[1] - n_hue
    th, tc, c = encode_hue_chroma(ab, n_hue, n_chroma, c_max)
    return hue_chroma_kl(logits.float(), th, tc, c, c_max, lambda_hue, mask)


def decode_hue_chroma(hue_probs: torch.Tensor, chroma_probs: torch.Tensor, c_max: float = C_MAX,
                      chroma_estimate: str = 'median') -> torch.Tensor:
    """Point estimate ab from hue and chroma histograms (probabilities over dim -3).

    Hue: circular mean, the angle of sum_k p_k exp(i theta_k). Chroma: 'mean' (expectation) or
    'median' (Larsson's choice; the 0.5 crossing of the CDF, each bin's mass spread uniformly over
    its width around the centre).

    Returns:
        ab (..., 2, H, W).
    """
    n_hue, n_chroma = hue_probs.shape[-3], chroma_probs.shape[-3]
    view = (-1, 1, 1)
    theta = hue_centres(n_hue, hue_probs.device).view(view)
    s = (hue_probs * torch.sin(theta)).sum(-3, keepdim=True)
    c = (hue_probs * torch.cos(theta)).sum(-3, keepdim=True)
    hue = torch.atan2(s, c)
    centres = chroma_centres(n_chroma, c_max, chroma_probs.device).view(view)
    if chroma_estimate == 'mean':
        chroma = (chroma_probs * centres).sum(-3, keepdim=True)
    elif chroma_estimate == 'median':
        step = c_max / (n_chroma - 1)
        cdf = chroma_probs.cumsum(-3)
        k = (cdf < 0.5).sum(-3, keepdim=True).clamp(max=n_chroma - 1)
        p_k = chroma_probs.gather(-3, k)
        cdf_prev = cdf.gather(-3, k) - p_k
        frac = ((0.5 - cdf_prev) / p_k.clamp_min(1e-12)).clamp(0, 1)
        chroma = ((k.to(frac.dtype) - 0.5 + frac) * step).clamp(0, c_max)
    else:
        raise ValueError(f"chroma_estimate must be 'mean' or 'median', got {chroma_estimate!r}")
    return hue_chroma_to_ab(hue, chroma)


def decode_ab(logits: torch.Tensor, n_hue: int = N_HUE, c_max: float = C_MAX,
              chroma_estimate: str = 'median') -> torch.Tensor:
    """(B, n_hue + n_chroma, H, W) logits -> ab (B, 2, H, W)."""
    hue_logits, chroma_logits = split_logits(logits, n_hue)
    return decode_hue_chroma(hue_logits.softmax(1), chroma_logits.softmax(1), c_max, chroma_estimate)
