"""Quantised ab space of Zhang et al., "Colorful Image Colorization" (ECCV 2016), section 2.1-2.3.

* the Q = 313 in-gamut ab bins (grid 10) of the reference implementation (``pts_in_hull.npy``), or bins derived
  from data for any grid size;
* soft-encoding of ground-truth ab into the k nearest bins with Gaussian weights (sigma = 5);
* the empirical colour prior (histogram over bins, Gaussian-smoothed in ab space);
* class-rebalancing weights;
* point estimates from a predicted distribution (annealed mean).

Everything is batched torch on any device. Shapes: ab images are (B, 2, H, W) in Lab units; distributions are
(B, Q, H, W) along dim 1; bins are (Q, 2) float32 (a, b) centres.
"""
from __future__ import annotations

import math
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

GRID = 10.0  #: spacing of the reference ab grid
NUM_BINS = 313  #: number of in-gamut bins of the reference table
SIGMA = 5.0  #: Gaussian sigma for soft-encoding and prior smoothing (ab units)


# --------------------------------------------------------------------------------------------- bins
def load_bins(device: torch.device | str | None = None) -> torch.Tensor:
    """The reference 313 ab bin centres (grid 10) shipped with the package, as float32 (313, 2)."""
    with resources.files("pretext").joinpath("data/pts_in_hull.npy").open("rb") as f:
        pts = np.load(f)
    return torch.from_numpy(pts.astype(np.float32)).to(device)


def quantize_to_grid(ab: torch.Tensor, grid: float) -> torch.Tensor:
    """Round ab values (..., 2, ...) with channel dim 1 to the nearest grid-cell centre (multiples of ``grid``)."""
    return torch.round(ab / grid) * grid


class GridCounter:
    """Streaming histogram of ab values on a square grid (cell centres at multiples of ``grid``).

    ``bins(min_count)`` gives the occupied cells: bins derived from data, for grids other than the reference one.
    """

    def __init__(self, grid: float = GRID, extent: float = 130.0):
        self.grid = float(grid)
        self.n = int(math.ceil(extent / grid))
        self.counts = torch.zeros((2 * self.n + 1) ** 2, dtype=torch.float64)

    def update(self, ab: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """ab: (B, 2, H, W); mask: optional (B, H, W) bool of pixels to count."""
        q = torch.round(ab / self.grid).long().clamp(-self.n, self.n) + self.n
        idx = (q[:, 0] * (2 * self.n + 1) + q[:, 1])
        if mask is not None:
            idx = idx[mask]
        self.counts += torch.bincount(idx.reshape(-1).cpu(), minlength=self.counts.numel()).double()

    def centres(self) -> torch.Tensor:
        r = torch.arange(-self.n, self.n + 1, dtype=torch.float32) * self.grid
        a, b = torch.meshgrid(r, r, indexing="ij")
        return torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)

    def bins(self, min_count: float = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Occupied cells as (bins (Q, 2) float32, counts (Q,) float64), sorted like ``pts_in_hull`` (a, then b)."""
        keep = self.counts >= min_count
        return self.centres()[keep], self.counts[keep]


# --------------------------------------------------------------------------------------------- soft-encoding
class SoftEncoder(torch.nn.Module):
    """Soft-encode ab into the ``k`` nearest of ``bins`` with Gaussian weights (Zhang et al. 2016, eq. 2).

    Exact k-NN, fast because the bins lie (mostly) on a grid: for every cell of a coarse lookup grid we keep only
    the bins that can be among the k nearest of *some* point in that cell (a bin whose minimum distance to the
    cell exceeds the k-th smallest maximum distance cannot be). Each pixel then compares against its cell's few
    candidates instead of all Q bins; pixels outside the lookup grid fall back to brute force.

    Args:
        bins: (Q, 2) bin centres.
        k: neighbours per pixel (paper: 5; the reference code: 10).
        sigma: Gaussian sigma in ab units.
        cell: lookup-grid cell size (ab units); extent: the lookup grid covers [-extent, extent)^2.
    Call:
        ``idx, w = enc(ab)`` with ab (B, 2, H, W) -> idx (B, k, H, W) int64, w (B, k, H, W) float32 summing to 1
        over dim 1, neighbours ordered nearest first.
    """

    def __init__(self, bins: torch.Tensor, k: int = 5, sigma: float = SIGMA, cell: float = GRID, extent: float = 160.0):
        super().__init__()
        bins = torch.as_tensor(bins, dtype=torch.float32)
        if bins.dim() != 2 or bins.shape[1] != 2:
            raise ValueError(f"bins must be (Q, 2), got {tuple(bins.shape)}")
        if not 1 <= k <= bins.shape[0]:
            raise ValueError(f"k must be in [1, {bins.shape[0]}], got {k}")
        self.k, self.sigma, self.cell, self.extent = int(k), float(sigma), float(cell), float(extent)
        self.register_buffer("bins", bins, persistent=False)
        cand = self._candidates(bins.double(), self.k, self.cell, self.extent)
        self.register_buffer("cand", cand, persistent=False)
        self.n_side = int(round(2 * extent / cell))

    @property
    def num_bins(self) -> int:
        return self.bins.shape[0]

    @staticmethod
    def _candidates(bins: torch.Tensor, k: int, cell: float, extent: float) -> torch.Tensor:
        n = int(round(2 * extent / cell))
        lo = -extent + cell * torch.arange(n, dtype=torch.float64)
        a0, b0 = torch.meshgrid(lo, lo, indexing="ij")
        a0, b0 = a0.reshape(-1, 1), b0.reshape(-1, 1)  # cell lower corners (C, 1)
        a1, b1 = a0 + cell, b0 + cell
        ba, bb = bins[:, 0].view(1, -1), bins[:, 1].view(1, -1)
        # min distance from the cell (a rectangle) to each bin, and max distance (farthest corner)
        dmin_a = (a0 - ba).clamp(min=0) + (ba - a1).clamp(min=0)
        dmin_b = (b0 - bb).clamp(min=0) + (bb - b1).clamp(min=0)
        dmin = dmin_a**2 + dmin_b**2
        dmax = torch.maximum((ba - a0).abs(), (ba - a1).abs()) ** 2 + torch.maximum((bb - b0).abs(), (bb - b1).abs()) ** 2
        bound = dmax.kthvalue(k, dim=1, keepdim=True).values
        ok = dmin <= bound + 1e-9
        width = int(ok.sum(1).max())
        # pad with -1; sort so real candidates come first
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :width]
        cand = torch.where(torch.gather(ok, 1, order), order, torch.full_like(order, -1))
        return cand

    def knn(self, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest bins: (idx (B, k, H, W) int64, squared distances (B, k, H, W)), nearest first."""
        if ab.dim() != 4 or ab.shape[1] != 2:
            raise ValueError(f"ab must be (B, 2, H, W), got {tuple(ab.shape)}")
        B, _, H, W = ab.shape
        pts = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()
        ci = torch.floor((pts + self.extent) / self.cell).long()
        inside = ((ci >= 0) & (ci < self.n_side)).all(1)
        cell_id = (ci[:, 0].clamp(0, self.n_side - 1) * self.n_side + ci[:, 1].clamp(0, self.n_side - 1))
        cand = self.cand[cell_id]  # (N, M)
        valid = cand >= 0
        cb = self.bins[cand.clamp(min=0)]  # (N, M, 2)
        d2 = ((pts.unsqueeze(1) - cb) ** 2).sum(-1)
        d2 = torch.where(valid, d2, torch.full_like(d2, float("inf")))
        d2k, j = torch.topk(d2, self.k, dim=1, largest=False, sorted=True)
        idx = torch.gather(cand, 1, j)
        if not bool(inside.all()):  # rare: far outside the lookup grid -> brute force for those pixels
            out = ~inside
            d2o = torch.cdist(pts[out], self.bins) ** 2
            d2ok, io = torch.topk(d2o, self.k, dim=1, largest=False, sorted=True)
            d2k[out], idx[out] = d2ok, io
        idx = idx.view(B, H, W, self.k).permute(0, 3, 1, 2)
        d2k = d2k.view(B, H, W, self.k).permute(0, 3, 1, 2)
        return idx, d2k

    def forward(self, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, d2 = self.knn(ab)
        # subtract the nearest distance first: same normalised weights, no underflow far outside the gamut
        w = torch.exp(-(d2 - d2[:, :1]) / (2 * self.sigma**2))
        w = w / w.sum(dim=1, keepdim=True)
        return idx.contiguous(), w.contiguous()

    def nearest(self, ab: torch.Tensor) -> torch.Tensor:
        """Index of the nearest bin, (B, H, W) int64."""
        return self.knn(ab)[0][:, 0]

    def dense(self, ab: torch.Tensor) -> torch.Tensor:
        """Dense soft targets (B, Q, H, W)."""
        idx, w = self(ab)
        return to_dense(idx, w, self.num_bins)


def to_dense(idx: torch.Tensor, w: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Scatter a sparse encoding (B, k, H, W) into a dense distribution (B, Q, H, W)."""
    out = torch.zeros(idx.shape[0], num_bins, *idx.shape[2:], dtype=w.dtype, device=w.device)
    return out.scatter_(1, idx, w)


# --------------------------------------------------------------------------------------------- prior
def gaussian_smooth_prior(probs: torch.Tensor, bins: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """Smooth a distribution over bins with a Gaussian of ``sigma`` in ab space and renormalise to sum 1."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    b = torch.as_tensor(bins, dtype=torch.float64)
    if sigma <= 0:
        return probs / probs.sum()
    K = torch.exp(-torch.cdist(b, b) ** 2 / (2 * sigma**2))
    out = K @ probs
    return out / out.sum()


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5, mode: str = "paper", alpha: float = 1.0) -> torch.Tensor:
    """Class-rebalancing weights of Zhang et al. eq. 4: w ~ ((1 - lam) p + lam / Q)^-alpha, with E_p[w] = 1.

    Args:
        prior: (Q,) smoothed empirical distribution over the bins.
        lam: weight of the uniform distribution (0.5 in the paper; 1 gives w = 1 everywhere: no rebalancing).
        mode: ``"paper"`` mixes with the uniform distribution over all Q bins. ``"reference"`` follows the
            released code (``PriorFactor``), which mixes with the uniform distribution over the *non-empty*
            bins only; empty bins would get an infinite weight there, so they receive the largest finite one.
        alpha: exponent (1 in the paper).
    Returns:
        (Q,) float32 weights, normalised so that sum_q p_q w_q = 1.
    """
    p = torch.as_tensor(prior, dtype=torch.float64)
    p = p / p.sum()
    Q = p.numel()
    if mode == "paper":
        uni = torch.full_like(p, 1.0 / Q)
    elif mode == "reference":
        uni = (p > 0).double()
        uni = uni / uni.sum()
    else:
        raise ValueError(f"rebalance mode must be 'paper' or 'reference', got {mode!r}")
    mix = (1 - lam) * p + lam * uni
    w = torch.where(mix > 0, mix.clamp(min=1e-300) ** -alpha, torch.zeros_like(mix))
    w = w / (p * w).sum()
    if (mix <= 0).any():
        w = torch.where(mix > 0, w, w[mix > 0].max())
    return w.float()


def pixel_weights(class_weights: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-pixel rebalancing weight = weight of the target's argmax bin, from a sparse encoding.

    Args: class_weights (Q,), idx/w (B, k, H, W). Returns (B, H, W).
    """
    top = torch.gather(idx, 1, w.argmax(dim=1, keepdim=True)).squeeze(1)
    return class_weights.to(w.device)[top]


# --------------------------------------------------------------------------------------------- decoding
def annealed_mean(scores: torch.Tensor, bins: torch.Tensor, T: float = 0.38, from_probs: bool = False) -> torch.Tensor:
    """Point estimate H(Z) = E[f_T(Z)] of Zhang et al. eq. 5: re-normalise Z^(1/T), then take the mean.

    Args:
        scores: (B, Q, H, W) logits (default) or probabilities (``from_probs=True``).
        bins: (Q, 2) bin centres.
        T: temperature; 1 is the mean, 0.38 the paper's choice, 0 the mode (computed as argmax, no overflow).
    Returns:
        (B, 2, H, W) ab.
    """
    bins = bins.to(device=scores.device, dtype=torch.float32)
    scores = scores.float()
    if T <= 0:
        top = scores.argmax(dim=1)
        return bins[top].permute(0, 3, 1, 2).contiguous()
    logits = torch.log(scores.clamp(min=1e-30)) if from_probs else scores
    p = torch.softmax(logits / T, dim=1)  # softmax(log z / T) == z^(1/T) / sum z^(1/T); stable for small T
    return torch.einsum("bqhw,qc->bchw", p, bins)


def resize_ab(ab: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an ab map to the network's output size (area average when shrinking)."""
    if tuple(ab.shape[-2:]) == tuple(size):
        return ab
    if ab.shape[-2] >= size[0] and ab.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(ab, size)
    return F.interpolate(ab, size=size, mode="bilinear", align_corners=False)

