"""Colorization metrics as pure functions (no I/O, no models).

* Zhang et al. 2016 (Table 1): the cumulative mass function (CMF) of the per-pixel ab L2 error over the
  thresholds t = 0, 1, ..., 150 and its area under the curve (AuC), normalised so that a perfect prediction
  scores 100. The papers do not say how the area is integrated. crosschannel's AuC is the mean of the CMF over
  the 151 thresholds (:func:`auc_from_cmf`), so a constant error d (0 <= d <= 150) scores
  ``100 * (151 - ceil(d)) / 151`` and an error above 150 scores 0; the trapezoid rule over [0, 150] divided by 150
  (:func:`auc_trapezoid_from_cmf`) is higher by ``(2 AuC / 100 - CMF(0) - CMF(150)) / 3`` points (CMF values as
  fractions; about 0.25 for typical colorizations) and is reported beside it. The class-rebalanced AuC weights every pixel by
  1 / p(bin of its ground-truth ab) (lambda = 0: no mixing with the uniform distribution).
* Larsson et al. 2016: PSNR of the RGB image at 8-bit peak (255), and the RMSE of ab.

The CMF at integer thresholds only needs ``ceil(error)``: ``err <= t`` iff ``ceil(err) <= t``. Errors are
therefore accumulated as histograms over ``ceil(err)`` (bins 0..150, plus one overflow bin), which can be summed
over images and, per ground-truth bin, re-weighted afterwards by any prior (see :func:`rebalanced_cmf`).
"""
from __future__ import annotations

import math

import torch

MAX_THRESHOLD = 150  #: thresholds 0..150 (Zhang et al.)


def ab_l2_error(pred_ab: torch.Tensor, gt_ab: torch.Tensor) -> torch.Tensor:
    """Per-pixel Euclidean ab error: (..., 2, H, W) x2 -> (..., H, W)."""
    return torch.linalg.vector_norm(pred_ab.float() - gt_ab.float(), dim=-3)


def error_bins(err: torch.Tensor, max_t: int = MAX_THRESHOLD) -> torch.Tensor:
    """``ceil(err)`` clamped to ``max_t + 1`` (the overflow bin), int64, same shape as ``err``."""
    return torch.ceil(err).clamp_(0, max_t + 1).long()


def error_histogram(err: torch.Tensor, weights: torch.Tensor | None = None, max_t: int = MAX_THRESHOLD) -> torch.Tensor:
    """Weighted histogram of ``ceil(err)``: (max_t + 2,) float64; entry t is the mass with t - 1 < err <= t."""
    w = None if weights is None else weights.reshape(-1).double()
    return torch.bincount(error_bins(err, max_t).reshape(-1), weights=w, minlength=max_t + 2).double()


def cmf_from_histogram(hist: torch.Tensor) -> torch.Tensor:
    """(..., max_t + 2) histogram -> (..., max_t + 1) CMF: the fraction of mass with err <= t for t = 0..max_t."""
    hist = hist.double()
    total = hist.sum(-1, keepdim=True)
    cmf = hist.cumsum(-1)[..., :-1] / total.clamp(min=1e-300)
    return torch.where(total > 0, cmf, torch.full_like(cmf, float("nan")))


def auc_from_cmf(cmf: torch.Tensor) -> float:
    """Area under a CMF sampled at t = 0..max_t as the mean of the samples, normalised to 100 (perfect = 100)."""
    return float(100.0 * cmf.double().mean(-1))


def auc_trapezoid_from_cmf(cmf: torch.Tensor) -> float:
    """Area under a CMF sampled at t = 0..max_t by the trapezoid rule, divided by max_t, times 100."""
    c = cmf.double()
    return float(100.0 * (c.sum(-1) - (c[..., 0] + c[..., -1]) / 2) / (c.shape[-1] - 1))


def cmf(pred_ab: torch.Tensor, gt_ab: torch.Tensor, weights: torch.Tensor | None = None,
        max_t: int = MAX_THRESHOLD) -> torch.Tensor:
    """CMF of the ab error of one image or batch (all pixels pooled): (max_t + 1,)."""
    return cmf_from_histogram(error_histogram(ab_l2_error(pred_ab, gt_ab), weights, max_t))


def ab_auc(pred_ab: torch.Tensor, gt_ab: torch.Tensor, weights: torch.Tensor | None = None,
           max_t: int = MAX_THRESHOLD) -> float:
    """Zhang et al.'s AuC (in [0, 100]) of pixels pooled; ``weights`` (..., H, W) for the rebalanced variant.

    Example:
        >>> gt = torch.zeros(1, 2, 4, 4); pred = gt.clone(); pred[:, 0] = 10.0   # constant error 10
        >>> round(ab_auc(pred, gt), 4) == round(100 * 141 / 151, 4)
        True
    """
    return auc_from_cmf(cmf(pred_ab, gt_ab, weights, max_t))


def inverse_prior_weights(prior: torch.Tensor, max_weight: float | None = None) -> torch.Tensor:
    """Class weights 1 / p_q (lambda = 0), normalised so that sum_q p_q w_q = 1 (a pixel drawn from the prior
    weighs 1 on average), then capped at ``max_weight`` if given (None: uncapped, as the paper).

    A bin with p = 0 cannot be a ground-truth bin when the prior comes from the evaluated data; for a prior from
    elsewhere it gets the largest finite weight instead of infinity (the guard of ``rebalance_weights``).
    """
    p = torch.as_tensor(prior, dtype=torch.float64)
    p = p / p.sum()
    w = torch.where(p > 0, 1.0 / p.clamp(min=1e-300), torch.zeros_like(p))
    if (p <= 0).any():
        w = torch.where(p > 0, w, w[p > 0].max())
    w = w / (p * w).sum()
    return w if max_weight is None else w.clamp(max=max_weight)


def rebalanced_cmf(hist_by_bin: torch.Tensor, prior: torch.Tensor, max_weight: float | None = None) -> torch.Tensor:
    """CMF with every pixel weighted by 1 / p(its ground-truth bin) (:func:`inverse_prior_weights`).

    Args:
        hist_by_bin: (Q, max_t + 2) error histograms per ground-truth bin (unweighted mass).
        prior: (Q,) probabilities of the same bins.
        max_weight: cap of the normalised weights (None: uncapped).
    Returns:
        (max_t + 1,) CMF.
    """
    w = inverse_prior_weights(prior, max_weight).to(hist_by_bin.device)
    return cmf_from_histogram((w[:, None] * hist_by_bin.double()).sum(0))


RARE_FACTOR = 100.0  #: a bin is rare when the prior puts less than 1 / (RARE_FACTOR Q) in it (100x below uniform)


def rebalanced_weight_stats(mass_by_bin: torch.Tensor, prior: torch.Tensor, max_weight: float | None = None,
                            rare_factor: float = RARE_FACTOR) -> dict:
    """How concentrated the rebalanced AuC's weight is, for the report.

    Args:
        mass_by_bin: (Q,) ground-truth pixel mass per bin in the evaluated data (as the CMF counts it).
        prior: (Q,) the prior of the weights. max_weight: their cap (None: uncapped).
    Returns:
        ``rare_weight_share``: the share of the total weight carried by pixels of rare bins (prior below
        1 / (``rare_factor`` Q)); ``rare_mass_share``: their share of the pixels; ``top_bin``, ``top_bin_weight_share``:
        the bin carrying most weight and its share; ``max_weight_used``: the largest weight of an occupied bin.
    """
    p = torch.as_tensor(prior, dtype=torch.float64)
    p = p / p.sum()
    m = torch.as_tensor(mass_by_bin, dtype=torch.float64)
    wm = inverse_prior_weights(p, max_weight) * m
    total = float(wm.sum())
    rare = p < 1.0 / (rare_factor * len(p))
    top = int(wm.argmax())
    occupied = m > 0
    return dict(rare_weight_share=float(wm[rare].sum()) / total if total > 0 else math.nan,
                rare_mass_share=float(m[rare].sum() / m.sum()) if float(m.sum()) > 0 else math.nan,
                top_bin=top, top_bin_weight_share=float(wm[top]) / total if total > 0 else math.nan,
                max_weight_used=float(inverse_prior_weights(p, max_weight)[occupied].max()) if occupied.any() else math.nan)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error over all elements (float64)."""
    return float(((a.double() - b.double()) ** 2).mean())


def psnr_from_mse(mse_value: float, peak: float = 255.0) -> float:
    """PSNR in dB; identical images (mse = 0) give ``math.inf`` (no division warning)."""
    if mse_value <= 0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse_value)


def psnr_rgb8(pred_rgb8: torch.Tensor, gt_rgb8: torch.Tensor) -> float:
    """PSNR of two RGB images on the 8-bit scale (values 0..255, any dtype), peak 255."""
    return psnr_from_mse(mse(pred_rgb8, gt_rgb8), 255.0)


def rmse_ab(pred_ab: torch.Tensor, gt_ab: torch.Tensor) -> float:
    """Root mean squared error of a and b (per channel, Lab units) over all pixels."""
    return math.sqrt(mse(pred_ab, gt_ab))


def mean_finite_aware(values) -> float:
    """Mean that stays finite-clean: NaNs are ignored, any +inf makes the mean +inf (e.g. PSNR of exact copies)."""
    vals = [float(v) for v in values if not math.isnan(float(v))]
    if not vals:
        return math.nan
    if any(math.isinf(v) for v in vals):
        return math.inf
    return sum(vals) / len(vals)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k scores, for each k (k is capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top == labels.view(-1, 1)
    return {k: int(hit[:, :min(k, maxk)].any(1).sum()) for k in ks}
