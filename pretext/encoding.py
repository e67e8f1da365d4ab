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
import warnings
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from pretext import encoding_kernel

GRID = 10.0  #: spacing of the reference ab grid
NUM_BINS = 313  #: number of in-gamut bins of the reference table
SIGMA = 5.0  #: Gaussian sigma for soft-encoding and prior smoothing (ab units)


# --------------------------------------------------------------------------------------------- bins
def load_bins(device: torch.device | str | None = None) -> torch.Tensor:
    """The reference 313 ab bin centres (grid 10) shipped with the package, as float32 (313, 2)."""
    with resources.files("pretext").joinpath("data/pts_in_hull.npy").open("rb") as f:
        pts = np.load(f)
    return torch.from_numpy(pts.astype(np.float32)).to(device)


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
_TABLE_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def _build_tables(bins: torch.Tensor, k: int, cell: float, extent: float, max_bits: int) -> dict[str, torch.Tensor]:
    """Lookup tables of :class:`SoftEncoder` (CPU, exact float64 geometry). See the class docstring.

    A quadtree over [-extent, extent)^2, root cells of ~20 ab units, leaves no smaller than ``cell``. Every cell
    carries the candidate bins that can be among the k nearest of some point in it. For two bins s, t the
    difference d(x, s)^2 - d(x, t)^2 is linear in x, so its sign over a (closed) cell is known from the four
    corners: either s is at least as close as t everywhere in the cell ("s dominates t"), or the reverse, or
    their bisector crosses the cell ("uncertain pair"). A bin dominated by k others is never needed. A cell whose
    candidates have at most ``max_bits`` uncertain pairs is a leaf: the ordered k-NN of any point in it is fixed
    by the signs of those few linear functions, so the table stores one k-tuple per sign pattern. Leaves at the
    finest size with more uncertain pairs (points where many bisectors meet) keep their candidate list instead.
    """
    Q = bins.shape[0]
    n = int(round(2 * extent / cell))
    if n <= 0 or abs(n * cell - 2 * extent) > 1e-9 * extent:
        raise ValueError(f"2 * extent / cell must be a positive integer, got extent={extent}, cell={cell}")
    depth = 0
    while n % (2 << depth) == 0 and cell * (2 << depth) <= 20.0:
        depth += 1
    n0, c0 = n >> depth, cell * (1 << depth)
    b64 = bins.double()
    binsx = torch.cat([b64, torch.full((1, 2), 1e6, dtype=torch.float64)])  # sentinel for padding

    # root cells: keep bins whose min distance to the cell <= k-th smallest max distance
    ii = torch.arange(n0).repeat_interleave(n0)
    jj = torch.arange(n0).repeat(n0)
    a0, b0 = (-extent + c0 * ii.double()).view(-1, 1), (-extent + c0 * jj.double()).view(-1, 1)
    ba, bb = b64[:, 0].view(1, -1), b64[:, 1].view(1, -1)
    da = (a0 - ba).clamp(min=0) + (ba - a0 - c0).clamp(min=0)
    db = (b0 - bb).clamp(min=0) + (bb - b0 - c0).clamp(min=0)
    ea = torch.maximum((ba - a0).abs(), (ba - a0 - c0).abs())
    eb = torch.maximum((bb - b0).abs(), (bb - b0 - c0).abs())
    ok = da * da + db * db <= (ea * ea + eb * eb).kthvalue(k, dim=1, keepdim=True).values
    cand, _ = _compact(ok, torch.arange(Q).expand_as(ok))

    grid = torch.full((n0, n0), -1, dtype=torch.int64)
    leaves = []  # per level: (cand, unc_pos, m, dom, slow)
    rec_base = 0
    c = c0
    for level in range(depth + 1):
        valid = cand >= 0
        pts = binsx[torch.where(valid, cand, Q)]  # (C, M, 2)
        a0 = (-extent + c * ii.double()).view(-1, 1, 1)
        b0 = (-extent + c * jj.double()).view(-1, 1, 1)
        ca = torch.cat([a0, a0 + c, a0, a0 + c], 2)  # (C, 1, 4) corners
        cb = torch.cat([b0, b0, b0 + c, b0 + c], 2)
        da, db = ca - pts[..., :1], cb - pts[..., 1:]
        d2 = da * da + db * db  # (C, M, 4), exact: corners and bins are multiples of powers of two
        dom = (d2.unsqueeze(2) <= d2.unsqueeze(1)).all(-1) & valid.unsqueeze(2)  # dom[c, s, t]: s dominates t
        keep = valid & (dom.sum(1) - 1 < k)
        if keep.shape[0] and int(keep.sum(1).min()) < k:
            raise RuntimeError("lookup-table construction lost a neighbour (bins with duplicates?)")
        cand, order = _compact(keep, cand, empty_width=k)
        dom = torch.gather(torch.gather(dom, 1, order.unsqueeze(2).expand(-1, -1, dom.shape[2])), 2,
                           order.unsqueeze(1).expand(-1, order.shape[1], -1))
        kept = cand >= 0
        unc = ~dom & ~dom.transpose(1, 2) & kept.unsqueeze(2) & kept.unsqueeze(1)
        unc = torch.triu(unc, diagonal=1)
        m = unc.sum((1, 2))
        leaf = (m <= max_bits) | (level == depth)
        ids = torch.arange(int(leaf.sum())) + rec_base
        rec_base += int(leaf.sum())
        grid[ii[leaf], jj[leaf]] = ids
        leaves.append((cand[leaf], unc[leaf], m[leaf], dom[leaf]))
        if level == depth:
            break
        go = ~leaf
        cand = cand[go].repeat_interleave(4, 0)
        i2, j2 = ii[go], jj[go]
        ii = (2 * i2.view(-1, 1) + torch.tensor([0, 0, 1, 1])).reshape(-1)
        jj = (2 * j2.view(-1, 1) + torch.tensor([0, 1, 0, 1])).reshape(-1)
        grid = grid.repeat_interleave(2, 0).repeat_interleave(2, 1)
        c = c / 2

    # per leaf: bit coefficients and one ordered k-tuple per sign pattern
    coef, base, tuples, slow_cand = [], [], [], []
    n_pat = 0
    for cand, unc, m, dom in leaves:
        R, M = cand.shape
        if R == 0:
            continue
        slow = m > max_bits
        flat = F.pad(unc.reshape(R, -1), (0, max(0, max_bits - M * M)))
        pos = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :max_bits].clamp(max=M * M - 1)
        has = torch.arange(max_bits).view(1, -1) < m.clamp(max=max_bits).view(-1, 1)
        s_pos, t_pos = pos // M, pos % M
        s = binsx[torch.gather(cand, 1, s_pos).clamp(min=0)]
        t = binsx[torch.gather(cand, 1, t_pos).clamp(min=0)]
        cf = torch.stack([2 * (t[..., 0] - s[..., 0]), 2 * (t[..., 1] - s[..., 1]),
                          (t * t).sum(-1) - (s * s).sum(-1)], -1)  # bit = ga*a + gb*b > h  <=>  t strictly closer
        cf = torch.where(has.unsqueeze(-1), cf, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        cf[slow] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        npat = torch.where(slow, 0, 2 ** m.clamp(max=max_bits))
        b = n_pat + torch.cumsum(npat, 0) - npat
        n_pat += int(npat.sum())
        # slow leaves: base = -1 - row of their candidate list
        b = torch.where(slow, -1 - (sum(x.shape[0] for x in slow_cand) + torch.cumsum(slow.long(), 0) - 1), b)
        if slow.any():
            slow_cand.append(cand[slow])
        coef.append(cf)
        base.append(b)
        # rank of each candidate = number of candidates before it: the certain ones (dominators) plus, per
        # uncertain pair (s, t), one for t if its bit is 0 (s closer) or one for s if its bit is 1
        rank0 = (dom.sum(1) - 1) * M + torch.arange(M)  # ties in rank broken by position: a strict order
        rank0 = rank0.masked_fill(cand < 0, 4 * M * M)
        r_i = torch.arange(R)
        for p in range(2**max_bits):
            sel = ((~slow) & (p < npat)).nonzero().view(-1)
            if sel.numel() == 0:
                break
            rank = rank0[sel]
            for j in range(max_bits):
                hs = has[sel, j]
                who = s_pos[sel, j] if (p >> j) & 1 else t_pos[sel, j]
                rank[r_i[: sel.numel()][hs], who[hs]] += M
            top = torch.argsort(rank, dim=1)[:, :k]
            tuples.append((b[sel] + p, torch.gather(cand[sel], 1, top)))
    code = torch.cat([t[0] for t in tuples])
    tup = torch.full((n_pat, k), -1, dtype=torch.int64)
    tup[code] = torch.cat([t[1] for t in tuples])
    if int(tup.min()) < 0:
        raise RuntimeError("lookup-table construction left a pattern without a tuple")
    uniq, inv = _unique_rows(tup, Q + 1)
    width = max([x.shape[1] for x in slow_cand], default=k)
    scand = torch.cat([F.pad(x, (0, width - x.shape[1]), value=-1) for x in slow_cand]) if slow_cand else \
        torch.zeros(0, width, dtype=torch.int64)
    # ring of brute-force cells around the table: pixels outside [-extent, extent)^2 are clamped into it
    grid = F.pad(grid, (1, 1, 1, 1), value=-1)
    # records: one per leaf, plus the ring. Search records (dense spots, ring) get pattern codes >= n_pat, which
    # map to a dummy tuple: the fast path runs for every pixel and those pixels are then redone by the search.
    rec = torch.cat(base)
    rec = torch.where(rec < 0, n_pat - 1 - rec, rec)
    grid[grid < 0] = rec.numel()
    rec = torch.cat([rec, torch.tensor([n_pat + scand.shape[0]])])
    coef = torch.cat(coef + [torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64).expand(1, max_bits, 3)]).float()
    pattern = torch.cat([inv.view(-1), torch.zeros(scand.shape[0] + 1, dtype=torch.int64)])
    return {
        "grid": grid.reshape(-1).int(),
        "coef_a": coef[..., 0].contiguous(),
        "coef_b": coef[..., 1].contiguous(),
        "coef_h": coef[..., 2].contiguous(),
        "base": rec.float(),  # exact: < 2^24
        "pattern": pattern.int(),
        "tuple": uniq.t().contiguous().view(-1),  # k-major: entry j of tuple u at j * U + u
        "slow_cand": scand,
        "n_fast": torch.tensor(n_pat),
    }


def _unique_rows(x: torch.Tensor, radix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(x, dim=0, return_inverse=True)`` for small non-negative ints (< radix), via 1-D uniques of
    packed column groups (much faster than the row-sorting ``unique(dim=0)``)."""
    bits = max(1, (radix - 1).bit_length())
    per = max(1, 62 // bits - 1)
    inv = torch.zeros(x.shape[0], dtype=torch.int64)
    for c0 in range(0, x.shape[1], per):
        key = inv
        for c in range(c0, min(c0 + per, x.shape[1])):
            key = key * (1 << bits) + x[:, c]
        _, inv = torch.unique(key, return_inverse=True)
    first = torch.full((int(inv.max()) + 1 if inv.numel() else 0,), x.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, inv, torch.arange(x.shape[0]), reduce="amin")
    return x[first], inv


def _compact(keep: torch.Tensor, values: torch.Tensor, empty_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the kept values first (original order), padded with -1; width = max kept count (``empty_width``
    for no rows). Also returns the column order used, to reorder companion arrays alike."""
    width = int(keep.sum(1).max()) if keep.shape[0] else empty_width
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    return torch.where(torch.gather(keep, 1, order), torch.gather(values, 1, order), -1), order


class SoftEncoder(torch.nn.Module):
    """Soft-encode ab into the ``k`` nearest of ``bins`` with Gaussian weights (Zhang et al. 2016, eq. 2).

    Exact k-NN without a per-pixel search or sort. A lookup table over [-extent, extent)^2 (a quadtree flattened
    onto a grid of ``cell``-sized squares) gives, for the square a pixel falls in, up to ``max_bits`` linear
    tests ``g . ab > h``: each is "is bin t closer than bin s", for the bin pairs whose bisector crosses that
    square. Their signs select the pixel's ordered k-tuple of bins from a precomputed table. The squared
    distances, hence the weights, are then computed exactly from the pixel's ab. Squares where more bisectors
    meet (a few, around points where many bins are equidistant), and pixels outside the table, go through a
    candidate search (top-k over the square's few candidates, or over all bins). The table is built once per
    process and cached per (bins, k, cell, extent, max_bits): ~0.3 s for k = 5, ~2 s for k = 10 (2-core machine).

    On the CPU the whole lookup runs as one fused C pass (:mod:`pretext.encoding_kernel`, compiled at first use and
    cached); the torch path (any device) gives the same results and is the fallback where no C compiler works.

    Args:
        bins: (Q, 2) bin centres.
        k: neighbours per pixel (paper: 5; the reference code: 10).
        sigma: Gaussian sigma in ab units.
        cell: finest lookup cell (ab units); extent: the table covers [-extent, extent)^2.
        max_bits: linear tests per pixel (more: fewer pixels in the search path, a larger table).
        backend: for CPU inputs, ``"auto"`` (the C kernel if it builds, else torch, with a warning), ``"native"``
            (the C kernel or an error) or ``"torch"``. Inputs on other devices always take the torch path.
    Call:
        ``idx, w = enc(ab)`` with ab (B, 2, H, W) -> idx (B, k, H, W) int64, w (B, k, H, W) float32 summing to 1
        over dim 1, neighbours ordered nearest first (ties in any order).
    """

    def __init__(self, bins: torch.Tensor, k: int = 5, sigma: float = SIGMA, cell: float = 0.3125,
                 extent: float = 160.0, max_bits: int = 4, backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "native", "torch"):
            raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
        bins = torch.as_tensor(bins, dtype=torch.float32).cpu()
        if bins.dim() != 2 or bins.shape[1] != 2:
            raise ValueError(f"bins must be (Q, 2), got {tuple(bins.shape)}")
        if not 1 <= k <= bins.shape[0]:
            raise ValueError(f"k must be in [1, {bins.shape[0]}], got {k}")
        self.k, self.sigma, self.cell, self.extent = int(k), float(sigma), float(cell), float(extent)
        self.max_bits = int(max_bits)
        key = (bins.numpy().tobytes(), self.k, self.cell, self.extent, self.max_bits)
        if key not in _TABLE_CACHE:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # many small ops: threads only add overhead (and stall on a busy machine)
            try:
                _TABLE_CACHE[key] = _build_tables(bins, self.k, self.cell, self.extent, self.max_bits)
            finally:
                torch.set_num_threads(threads)
        tables = _TABLE_CACHE[key]
        self._table_key = key
        self.n_side = int(round(2 * extent / cell))
        self.register_buffer("bins", bins, persistent=False)
        # bin coordinates with a far sentinel at index Q (padding of candidate lists)
        self.register_buffer("bins_a", torch.cat([bins[:, 0], bins.new_tensor([1e15])]), persistent=False)
        self.register_buffer("bins_b", torch.cat([bins[:, 1], bins.new_tensor([1e15])]), persistent=False)
        for name, t in tables.items():
            if name != "n_fast":
                self.register_buffer(name, t, persistent=False)
        self._n_fast = int(tables["n_fast"])
        self.backend = backend
        self._tables = tables  # CPU originals for the C kernel (buffers may move to another device)
        self._native: encoding_kernel.NativeSoftEncode | None = None
        self.register_buffer("_bit_values", 2.0 ** torch.arange(self.max_bits), persistent=False)
        self.register_buffer("_tuple_offsets", (torch.arange(self.k) * (self.tuple.numel() // self.k)).view(
            1, self.k, 1, 1).int(), persistent=False)

    @property
    def num_bins(self) -> int:
        return self.bins.shape[0]

    def __getstate__(self):  # copy / pickle without the ctypes binding; it is rebuilt at the next CPU call
        state = self.__dict__.copy()
        state["_native"] = None
        return state

    def _kernel(self, ab: torch.Tensor) -> encoding_kernel.NativeSoftEncode | None:
        """The C kernel for this input, or None for the torch path."""
        if self.backend == "torch" or ab.device.type != "cpu":
            return None
        if self._native is None:
            try:
                self._native = encoding_kernel.bind(self._table_key, self._tables, self.bins, self.k, self.max_bits,
                                                    self.n_side + 2, self.extent + self.cell, self.cell)
            except (RuntimeError, ValueError) as e:
                if self.backend == "native":
                    raise RuntimeError(f"the native soft-encoding kernel is unavailable: {e}") from None
                _warn_fallback(str(e))
                self.backend = "torch"  # "auto" resolved: do not try again
                return None
        return self._native

    def knn(self, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest bins: (idx (B, k, H, W) int64, squared distances (B, k, H, W) float32), nearest first."""
        if ab.dim() != 4 or ab.shape[1] != 2:
            raise ValueError(f"ab must be (B, 2, H, W), got {tuple(ab.shape)}")
        kernel = self._kernel(ab)
        if kernel is not None:
            return kernel(ab, self.sigma, want_d2=True)
        B, _, H, W = ab.shape
        ab = ab.float()
        a, b = ab[:, 0:1], ab[:, 1:2]  # (B, 1, H, W)
        n = self.n_side + 2  # the table, with a ring of brute-force squares for pixels outside it
        sq = (ab + (self.extent + self.cell)).mul_(1.0 / self.cell).floor_().clamp_(0, n - 1).nan_to_num_(0.0)
        sq = sq[:, 0].mul_(n).add_(sq[:, 1]).int().view(-1)
        rec = self.grid.index_select(0, sq)
        # sign tests of the square's uncertain bin pairs -> pattern code -> ordered k-tuple
        a1, b1 = a.reshape(-1, 1), b.reshape(-1, 1)
        v = self.coef_a.index_select(0, rec).mul_(a1).addcmul_(self.coef_b.index_select(0, rec), b1)
        v = v.gt_(self.coef_h.index_select(0, rec))
        code = torch.addmv(self.base.index_select(0, rec), v, self._bit_values)
        slow = code >= self._n_fast
        tup = self.pattern.index_select(0, code.int()).view(B, 1, H, W)
        idx = self.tuple.index_select(0, (tup + self._tuple_offsets).view(-1)).view(B, self.k, H, W)
        # exact squared distances to the selected bins
        da = self.bins_a.index_select(0, idx.view(-1)).view(B, self.k, H, W).sub_(a)
        db = self.bins_b.index_select(0, idx.view(-1)).view(B, self.k, H, W).sub_(b)
        d2 = da.mul_(da).addcmul_(db, db)
        if bool(slow.any()):
            pix = slow.nonzero().view(-1)
            row = code[pix].long() - self._n_fast
            self._search(a.reshape(-1), b.reshape(-1), pix, row, idx, d2)
        return idx, d2

    def _search(self, a, b, pix, row, idx, d2) -> None:
        """k-NN by top-k over candidate lists for pixels ``pix`` (flat b*H*W indices), written into idx / d2."""
        B, k, H, W = idx.shape
        Q = self.num_bins
        brute = row >= self.slow_cand.shape[0]
        cand = self.slow_cand.index_select(0, row.clamp(max=max(self.slow_cand.shape[0] - 1, 0))) \
            if self.slow_cand.shape[0] else torch.empty(row.numel(), 0, dtype=torch.long, device=row.device)
        if bool(brute.any()):
            width = max(cand.shape[1], Q)
            cand = F.pad(cand, (0, width - cand.shape[1]), value=-1)
            cand[brute] = torch.arange(Q, device=cand.device)
        cand = torch.where(cand < 0, Q, cand)
        pa, pb = a[pix].view(-1, 1), b[pix].view(-1, 1)
        da, db = self.bins_a[cand] - pa, self.bins_b[cand] - pb
        dd, j = torch.topk(da * da + db * db, k, dim=1, largest=False, sorted=True)
        bi, hw = pix // (H * W), pix % (H * W)
        kk = torch.arange(k, device=pix.device).view(1, -1)
        idx.view(B, k, H * W)[bi.view(-1, 1), kk, hw.view(-1, 1)] = torch.gather(cand, 1, j)
        d2.view(B, k, H * W)[bi.view(-1, 1), kk, hw.view(-1, 1)] = dd

    def forward(self, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = self._kernel(ab) if ab.dim() == 4 and ab.shape[1] == 2 else None
        if kernel is not None:
            return kernel(ab, self.sigma, want_d2=False)
        idx, d2 = self.knn(ab)
        # subtract the nearest distance first: same normalised weights, no underflow far outside the gamut
        w = torch.sub(d2[:, :1], d2).mul_(1.0 / (2 * self.sigma**2)).exp_()
        w = w.div_(w.sum(dim=1, keepdim=True))
        return idx, w

    def nearest(self, ab: torch.Tensor) -> torch.Tensor:
        """Index of the nearest bin, (B, H, W) int64."""
        return self.knn(ab)[0][:, 0]

    def dense(self, ab: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense soft targets (B, Q, H, W); ``out``: optional buffer to reuse (see :func:`to_dense`)."""
        idx, w = self(ab)
        return to_dense(idx, w, self.num_bins, out=out)


_warned: list[str] = []


def _warn_fallback(reason: str | None) -> None:
    if not _warned:
        _warned.append(str(reason))
        warnings.warn(f"crosschannel: the C soft-encoding kernel is unavailable ({reason}); using the slower torch "
                      "path", RuntimeWarning, stacklevel=3)


def to_dense(idx: torch.Tensor, w: torch.Tensor, num_bins: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter a sparse encoding (B, k, H, W) into a dense distribution (B, Q, H, W).

    ``out``: optional (B, Q, H, W) tensor to reuse (zeroed here); on CPU, reusing one large buffer avoids the
    page faults of a fresh allocation, which cost more than the scatter itself.
    """
    if out is None:
        out = torch.zeros(idx.shape[0], num_bins, *idx.shape[2:], dtype=w.dtype, device=w.device)
    else:
        out.zero_()
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
    """Resize an ab map to ``size`` (area average when shrinking, bilinear when growing)."""
    if tuple(ab.shape[-2:]) == tuple(size):
        return ab
    if ab.shape[-2] >= size[0] and ab.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(ab, size)
    return F.interpolate(ab, size=size, mode="bilinear", align_corners=False)


def subsample_ab(ab: torch.Tensor, stride: int, mode: str = "point") -> torch.Tensor:
    """ab targets on a grid of ``stride`` pixels: (B, 2, H, W) -> (B, 2, ceil(H / stride), ceil(W / stride)).

    ``mode="point"`` takes the pixels (stride * i, stride * j), as the release does (a 1x1 convolution with weight 1
    and stride 4 for the VGG net or 8 for the AlexNet, ``data_ab_ss`` in ``colorization_train_val_v2.prototxt`` and
    ``train_alexnet/train_val.prototxt``). ``mode="area"`` averages ab over the stride x stride cell whose corner is
    that pixel instead (clipped at the image border; an option: it pulls colours at edges towards grey).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if mode == "point":
        return ab[..., ::stride, ::stride]
    if mode == "area":
        return ab if stride == 1 else F.avg_pool2d(ab, stride, stride, ceil_mode=True)
    raise ValueError(f"target sampling must be 'point' or 'area', got {mode!r}")


def nongray_mask(ab: torch.Tensor, thresh: float = 5.0) -> torch.Tensor:
    """Which images carry colour: (B, 2, ...) -> (B,) bool, True where some |a| or |b| exceeds ``thresh``.

    The release's ``NonGrayMaskLayer`` (``resources/caffe_traininglayers.py``, threshold 5), applied to the
    subsampled ab target: an image counts only if one of its target cells is coloured.
    """
    return (ab.abs() > thresh).flatten(1).any(dim=1)
