"""Linear probe heads: reduce each tap to a vector, then BatchNorm (no affine) + linear.

Pooling modes (``pool``), all pure functions of a (B, C, H, W) activation:

* ``avg`` (default): Zhang et al. ECCV16, Fig. 7 caption: features are "average-pooled, with equal kernel and
  stride sizes, until feature dimensionality is below 10k". The kernel is the smallest ``k`` (stride ``k``, no
  padding) whose output has ``C * h * w < max_dims``, with Caffe's output size
  ``ceil((H - k) / k) + 1`` (a last, partial window averages the elements it covers). AlexNet at 227:
  conv1 k6 -> 10x10x96, pool1 k3 -> 9x9x96, conv2 k5 -> 6x6x256, pool2 k3 -> 5x5x256, conv3/conv4 k3 ->
  5x5x384, conv5 k3 -> 5x5x256, pool5 k1 (as it is) -> 6x6x256.
* ``fixed``: explicit per-tap (kernel, stride), e.g. the VOC07 SVM pooling of Goyal et al. ICCV19.
* ``bilinear``: the released linear test (richzhang/colorization:feature_learning_tests/linear/train_val.prototxt)
  resizes every map with Caffe's ``Resize`` layer to the largest square ``s x s`` with ``C s^2 <= max_dims``
  (conv1/pool1 10, conv2/pool2/conv5 6, conv3/conv4 5; pool5 6x6 is left as it is). The layer
  (caffe-colorization/src/caffe/layers/resize_layer.cpp) blurs with a tent filter of radius 1/scale when
  shrinking, then interpolates linearly with aligned corners; :func:`caffe_resize` does the same.
* ``adaptive``: ``adaptive_avg_pool2d`` to the same ``s x s`` (overlapping, unequal windows; not the paper's).

Every tap has its own head (independent parameters), so summing the per-tap losses and taking one optimiser
step trains each head exactly as a separate run would: one pass of the frozen encoder serves all taps.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POOL_MODES = ("avg", "fixed", "bilinear", "adaptive")
HEAD_INITS = ("zeros", "normal")


def _key(tap: str) -> str:
    """Module-dict key of a tap ('encoder.layer3' is a valid tap name, not a valid submodule name)."""
    return tap.replace(".", "__")


# --------------------------------------------------------------------------------------------- geometry
def caffe_pooled_size(n: int, kernel: int, stride: int, pad: int = 0) -> int:
    """Output length of Caffe's pooling layer (caffe/src/caffe/layers/pooling_layer.cpp, ``Reshape``).

    ``ceil((n + 2 pad - kernel) / stride) + 1``; with padding, a last window that would start in the padding is
    dropped. Windows may run past the input; they average only the elements they cover.
    """
    out = -(-(n + 2 * pad - kernel) // stride) + 1
    if pad and (out - 1) * stride >= n + pad:
        out -= 1
    return out


def floor_pooled_size(n: int, kernel: int, stride: int, pad: int = 0) -> int:
    """Output length with floor rounding (PyTorch's default and Caffe2's ``AveragePool``)."""
    return (n + 2 * pad - kernel) // stride + 1


def fig7_kernel(shape: tuple[int, ...], max_dims: int = 10000) -> int:
    """Smallest kernel = stride ``k`` for which the Caffe-pooled map has fewer than ``max_dims`` values.

    ``shape`` is (C, H, W); ``k = 1`` leaves the map as it is. If even one value per channel is too many, the
    kernel covering the whole map is returned (C values).
    """
    c, h, w = shape
    for k in range(1, max(h, w) + 1):
        if c * caffe_pooled_size(h, k, k) * caffe_pooled_size(w, k, k) < max_dims:
            return k
    return max(h, w)


def pooled_side(channels: int, max_dims: int = 10000) -> int:
    """Largest square side ``s >= 1`` with ``channels * s * s <= max_dims`` (the released Resize sizes)."""
    return max(1, math.isqrt(max_dims // channels)) if channels <= max_dims else 1


# --------------------------------------------------------------------------------------------- Caffe Resize
def _tent_blur(x: torch.Tensor, radius: float, dim: int) -> torch.Tensor:
    """Tent filter of (real) radius R along ``dim`` (-1 or -2), edges replicated: weights R - |r| for
    |r| < R, normalised to sum 1 (resize_layer.cpp, ``tentx_cpu`` / ``tenty_cpu``)."""
    ir = math.ceil(radius) - 1  # taps r = 1 .. ceil(R) - 1 have weight R - r > 0
    if ir <= 0:
        return x
    r = torch.arange(-ir, ir + 1, dtype=x.dtype, device=x.device)
    w = radius - r.abs()
    w = w / w.sum()
    xt = x.movedim(dim, -1)
    shape = xt.shape
    flat = F.pad(xt.reshape(-1, 1, shape[-1]), (ir, ir), mode="replicate")
    return F.conv1d(flat, w.view(1, 1, -1)).reshape(shape).movedim(-1, dim)


def caffe_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The released linear test's ``Resize`` layer: (B, C, H, W) -> (B, C, h, w).

    Per axis: scale = (out - 1) / (in - 1); when shrinking, a tent blur of radius 1 / scale first, then linear
    interpolation at positions i / scale (aligned corners). Identity when the size already matches.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    for dim, out in ((-1, size[1]), (-2, size[0])):
        n = x.shape[dim]
        scale = (out - 1) / (n - 1) if out > 1 and n > 1 else 1.0
        if scale < 1:
            x = _tent_blur(x, 1.0 / max(scale, 0.01), dim)
        pos = torch.arange(out, dtype=torch.float64) / scale if out > 1 else torch.zeros(1, dtype=torch.float64)
        pos = pos.clamp(0, n - 1)
        i0 = pos.floor().long()
        i1 = (i0 + 1).clamp(max=n - 1)
        w1 = (pos - i0).to(x.dtype).to(x.device)
        shape = [1] * x.dim()
        shape[dim] = out
        w1 = w1.view(shape)
        x = x.index_select(dim, i0.to(x.device)) * (1 - w1) + x.index_select(dim, i1.to(x.device)) * w1
    return x


# --------------------------------------------------------------------------------------------- pooling
@dataclass(frozen=True)
class PoolSpec:
    """How one tap is reduced: ``mode`` plus kernel/stride (``avg``/``fixed``) or output side (``bilinear``/
    ``adaptive``); ``out`` is the pooled (C, h, w) for the tap's input shape."""
    mode: str
    out: tuple[int, int, int]
    kernel: int = 0
    stride: int = 0
    ceil_mode: bool = True

    @property
    def dims(self) -> int:
        return self.out[0] * self.out[1] * self.out[2]

    def describe(self) -> dict:
        d = asdict(self)
        d["out"] = list(self.out)
        if self.mode in ("bilinear", "adaptive"):
            for k in ("kernel", "stride", "ceil_mode"):
                d.pop(k)
        return d


def plan_pooling(shape: tuple[int, ...], mode: str = "avg", max_dims: int = 10000,
                 kernel_stride: tuple[int, int] | None = None) -> PoolSpec:
    """The :class:`PoolSpec` of a tap of activation ``shape`` ((C, H, W), or (C,) for a vector tap)."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool must be one of {POOL_MODES}, got '{mode}'")
    if len(shape) == 1:
        return PoolSpec("avg", (shape[0], 1, 1), 1, 1)  # a vector tap (fc6, fc7) is used as it is
    c, h, w = shape
    if mode == "avg":
        k = fig7_kernel(shape, max_dims)
        return PoolSpec("avg", (c, caffe_pooled_size(h, k, k), caffe_pooled_size(w, k, k)), k, k, True)
    if mode == "fixed":
        if kernel_stride is None:
            raise ValueError("pool 'fixed' needs a (kernel, stride) for every tap")
        k, s = (int(v) for v in kernel_stride)
        if k > min(h, w):
            raise ValueError(f"pooling kernel {k} is larger than the {h}x{w} map")
        return PoolSpec("fixed", (c, floor_pooled_size(h, k, s), floor_pooled_size(w, k, s)), k, s, False)
    side = pooled_side(c, max_dims)
    if mode == "bilinear" and (h, w) == (side, side):
        return PoolSpec("bilinear", (c, h, w))
    return PoolSpec(mode, (c, side, side))


class TapPool(nn.Module):
    """(B, C, H, W) or (B, C) -> (B, C * h * w) float32 according to a :class:`PoolSpec`; no parameters."""

    def __init__(self, spec: PoolSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = x.float()
        if x.dim() == 2:
            return x
        if s.mode in ("avg", "fixed"):
            if s.kernel > 1 or s.stride > 1:
                x = F.avg_pool2d(x, s.kernel, s.stride, ceil_mode=s.ceil_mode)
        elif s.mode == "adaptive":
            x = F.adaptive_avg_pool2d(x, s.out[1:])
        else:
            x = caffe_resize(x, s.out[1:])
        return x.flatten(1)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec.describe().items())


class TapPools(nn.Module):
    """The pooling of every tap: ``forward(feats)`` maps a dict of tap activations to pooled (B, D) features.

    Args:
        tap_shapes: tap name -> activation shape without the batch ((C, H, W) or (C,)), in layer order.
        pool: one of :data:`POOL_MODES`.
        max_dims: the bound of ``avg`` (strict: fewer than), ``bilinear`` and ``adaptive`` (at most).
        kernels: tap -> (kernel, stride) for ``pool='fixed'``.
    """

    def __init__(self, tap_shapes: dict[str, tuple[int, ...]], pool: str = "avg", max_dims: int = 10000,
                 kernels: dict[str, tuple[int, int]] | None = None):
        super().__init__()
        self.taps = list(tap_shapes)
        if pool == "fixed":
            missing = [t for t in self.taps if len(tap_shapes[t]) == 3 and t not in (kernels or {})]
            if missing:
                raise ValueError(f"pool 'fixed': no (kernel, stride) for tap(s) {missing}")
        self.specs = {t: plan_pooling(tuple(tap_shapes[t]), pool, max_dims, (kernels or {}).get(t)) for t in self.taps}
        self.dims = {t: s.dims for t, s in self.specs.items()}
        self.pools = nn.ModuleDict({_key(t): TapPool(self.specs[t]) for t in self.taps})

    def describe(self) -> dict[str, dict]:
        return {t: s.describe() for t, s in self.specs.items()}

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: self.pools[_key(t)](feats[t]) for t in self.taps}


# --------------------------------------------------------------------------------------------- heads
class LinearHead(nn.Module):
    """BatchNorm1d without affine (only whitening; frozen statistics at eval) then a linear classifier.

    The released net (feature_learning_tests/linear/train_val.prototxt) has a Caffe ``BatchNorm`` without scale
    and an ``InnerProduct`` with Caffe's default (constant 0) fillers. The encoder is frozen, so the pooled
    features are stationary and the running statistics are the plain average over all training batches
    (``momentum=None``); Caffe's moving average (fraction 0.999) estimates the same quantity.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, momentum=None)
        self.fc = nn.Linear(dim, num_classes)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, init: str = "zeros") -> None:
        self.bn.reset_running_stats()
        if init == "zeros":
            self.fc.weight.zero_()
        elif init == "normal":
            self.fc.weight.normal_(0.0, 0.01, generator=generator)
        else:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got '{init}'")
        self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class ProbeHeads(nn.Module):
    """A :class:`TapPools` and one :class:`LinearHead` per tap.

    Args:
        tap_shapes: tap name -> activation shape (without batch), in layer order.
        num_classes: classifier width.
        pool, max_dims: see :class:`TapPools`.
        seed: ``init='normal'`` heads draw from ``seed + crc32(tap)``, so a head's initial weights do not depend
            on which other taps are trained alongside it (single pass == separate runs).
        init: 'zeros' (the released prototxt: Caffe's default filler) or 'normal' (std 0.01).

    ``pool(feats)`` maps a dict of tap activations to pooled (B, D) features (what the feature cache stores);
    ``forward(pooled)`` maps those to a dict of logits. DDP wraps this module; only ``forward`` has parameters.
    """

    def __init__(self, tap_shapes: dict[str, tuple[int, ...]], num_classes: int, pool: str = "avg",
                 max_dims: int = 10000, seed: int = 0, init: str = "zeros"):
        super().__init__()
        self.pooler = TapPools(tap_shapes, pool, max_dims)
        self.taps, self.dims = self.pooler.taps, self.pooler.dims
        self.heads = nn.ModuleDict({_key(t): LinearHead(self.dims[t], num_classes) for t in self.taps})
        for t in self.taps:
            self.heads[_key(t)].reset_parameters(torch.Generator().manual_seed(seed + zlib.crc32(t.encode())), init)

    def pool(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.pooler(feats)

    def param_groups(self, lr: float, weight_decay: float, bias_lr_mult: float = 1.0,
                     bias_decay_mult: float = 1.0) -> list[dict]:
        """Weights and biases as two optimiser groups (Caffe's ``lr_mult`` / ``decay_mult`` of the bias)."""
        weights = [p for n, p in self.named_parameters() if not n.endswith(".bias")]
        biases = [p for n, p in self.named_parameters() if n.endswith(".bias")]
        return [dict(params=weights, lr=lr, weight_decay=weight_decay),
                dict(params=biases, lr=lr * bias_lr_mult, weight_decay=weight_decay * bias_decay_mult)]

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
