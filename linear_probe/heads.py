"""Linear probe heads: reduce each tap to at most ``max_dims`` features, then BatchNorm (no affine) + linear.

Zhang et al. ECCV16 (Sec. 3.2, Table 4) reduce every AlexNet layer to roughly 9-10k dims by average pooling:
conv1 -> 10x10x96 = 9600, conv2 -> 6x6x256 = 9216, conv3/conv4 -> 5x5x384 = 9600, conv5 -> 6x6x256 = 9216.
The reference implementation's README resizes the maps bilinearly to the same sizes instead. Both are here:
the side ``s`` is the largest with ``C * s * s <= max_dims``; ``pool='avg'`` uses adaptive average pooling,
``pool='bilinear'`` bilinear interpolation to ``s x s``.

Every tap has its own head (independent parameters), so summing the per-tap losses and taking one optimiser
step trains each head exactly as a separate run would: one pass of the frozen encoder serves all taps.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

POOL_MODES = ("avg", "bilinear")


def _key(tap: str) -> str:
    """Module-dict key of a tap ('encoder.layer3' is a valid tap name, not a valid submodule name)."""
    return tap.replace(".", "__")


def pooled_side(channels: int, max_dims: int = 10000) -> int:
    """Largest square side ``s >= 1`` with ``channels * s * s <= max_dims`` (1 if even 1x1 exceeds it)."""
    return max(1, math.isqrt(max_dims // channels)) if channels <= max_dims else 1


class TapPool(nn.Module):
    """(B, C, H, W) or (B, C) -> (B, C * s * s) float32; no parameters."""

    def __init__(self, side: int, mode: str = "avg"):
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got '{mode}'")
        self.side, self.mode = side, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dim() == 2:  # fully connected taps (e.g. torchvision fc6): already a vector
            x = x[:, :, None, None]
        if self.mode == "avg":
            x = F.adaptive_avg_pool2d(x, self.side)
        elif x.shape[-2:] != (self.side, self.side):
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        return x.flatten(1)

    def extra_repr(self) -> str:
        return f"side={self.side}, mode={self.mode}"


class LinearHead(nn.Module):
    """BatchNorm1d without affine (only whitening; frozen statistics at eval) then a linear classifier."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, num_classes)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        self.bn.reset_running_stats()
        self.fc.weight.normal_(0.0, 0.01, generator=generator)
        self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class TapPools(nn.Module):
    """The pooling of every tap: ``forward(feats)`` maps a dict of tap activations to pooled (B, D) features.

    Args:
        tap_channels: tap name -> number of channels, in layer order.
        pool: 'avg' or 'bilinear'.
        max_dims: upper bound on the pooled dimension of every tap.
    """

    def __init__(self, tap_channels: dict[str, int], pool: str = "avg", max_dims: int = 10000):
        super().__init__()
        self.taps = list(tap_channels)
        self.sides = {t: pooled_side(c, max_dims) for t, c in tap_channels.items()}
        self.dims = {t: tap_channels[t] * self.sides[t] ** 2 for t in self.taps}
        self.pools = nn.ModuleDict({_key(t): TapPool(self.sides[t], pool) for t in self.taps})

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: self.pools[_key(t)](feats[t]) for t in self.taps}


class ProbeHeads(nn.Module):
    """A :class:`TapPools` and one :class:`LinearHead` per tap.

    Args:
        tap_channels: tap name -> number of channels, in layer order.
        num_classes: classifier width.
        pool: 'avg' or 'bilinear'.
        max_dims: upper bound on the pooled dimension of every tap.
        seed: heads are initialised from ``seed + crc32(tap)``, so a head's initial weights do not depend on
            which other taps are trained alongside it (single pass == separate runs).

    ``pool(feats)`` maps a dict of tap activations to pooled (B, D) features (what the feature cache stores);
    ``forward(pooled)`` maps those to a dict of logits. DDP wraps this module; only ``forward`` has parameters.
    """

    def __init__(self, tap_channels: dict[str, int], num_classes: int, pool: str = "avg", max_dims: int = 10000,
                 seed: int = 0):
        super().__init__()
        self.pooler = TapPools(tap_channels, pool, max_dims)
        self.taps, self.sides, self.dims = self.pooler.taps, self.pooler.sides, self.pooler.dims
        self.heads = nn.ModuleDict({_key(t): LinearHead(self.dims[t], num_classes) for t in self.taps})
        for t in self.taps:
            self.heads[_key(t)].reset_parameters(torch.Generator().manual_seed(seed + zlib.crc32(t.encode())))

    def pool(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.pooler(feats)

    def forward(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: self.heads[_key(t)](pooled[t].float()) for t in self.taps}


def probe_loss(logits: dict[str, torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of per-tap cross-entropies (heads are independent, so each gets its own gradient); also per tap."""
    per_tap = {t: F.cross_entropy(z, target) for t, z in logits.items()}
    return torch.stack(list(per_tap.values())).sum(), per_tap


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k clipped to the class count)."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred.eq(target[:, None])
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]
