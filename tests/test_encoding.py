"""pretext.encoding against independent references: the reference bin file, brute-force k-NN in float64 numpy,
numpy histograms, hand-computed priors / weights / decodings."""
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from pretext import encoding_kernel
from pretext.color import rgb_to_lab
from pretext.encoding import (
    GridCounter,
    SoftEncoder,
    annealed_mean,
    gaussian_smooth_prior,
    load_bins,
    nongray_mask,
    pixel_weights,
    rebalance_weights,
    subsample_ab,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_BINS = SHARED / "reference" / "pts_in_hull.npy"
PHOTOS = SHARED / "data" / "photos"


def _photo_ab(n: int = 6, size: int = 64) -> torch.Tensor:
    from PIL import Image

    if not PHOTOS.is_dir():
        pytest.skip(f"photo folder {PHOTOS} missing (CI clones the repo beside shared/)")
    files = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    ims = [Image.open(f).convert("RGB").resize((size, size)) for f in files[:: max(1, len(files) // n)][:n]]
    rgb = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in ims])
    return rgb_to_lab(rgb)[:, 1:]


@pytest.fixture(params=["native", "torch"])
def backend(request) -> str:
    """SoftEncoder's two CPU paths: the C kernel (where a C compiler exists: then it must build) and torch."""
    if request.param == "native" and encoding_kernel._compiler() is None:
        pytest.skip("no C compiler on this machine: the C kernel cannot be built (SoftEncoder uses its torch path)")
    return request.param


def _brute_knn(ab: torch.Tensor, bins: torch.Tensor, k: int, sigma: float = 5.0):
    """float64 numpy: full distance matrix, argsort. Returns (sorted squared distances (N, k), weights (N, k),
    full distance matrix (N, Q))."""
    pts = ab.permute(0, 2, 3, 1).reshape(-1, 2).double().numpy()
    c = bins.double().numpy()
    D = ((pts[:, None, :] - c[None]) ** 2).sum(-1)
    d = np.take_along_axis(D, np.argsort(D, axis=1, kind="stable")[:, :k], 1)
    w = np.exp(-(d - d[:, :1]) / (2 * sigma**2))
    return d, w / w.sum(1, keepdims=True), D


def _check_against_brute(enc: SoftEncoder, ab: torch.Tensor):
    k = enc.k
    idx, w = enc(ab)
    assert idx.shape == (ab.shape[0], k, *ab.shape[2:]) and idx.dtype == torch.int64 and w.dtype == torch.float32
    d_ref, w_ref, D = _brute_knn(ab, enc.bins, k)
    oi = idx.permute(0, 2, 3, 1).reshape(-1, k).numpy()
    ow = w.permute(0, 2, 3, 1).reshape(-1, k).double().numpy()
    d_ours = np.take_along_axis(D, oi, 1)  # true distances of the bins we chose
    # same neighbours up to ties: the chosen bins' true distances are the k smallest, in order (nearest first);
    # float32 inputs put ties within ~1e-3 (squared ab units) of each other
    tol = 1e-3 * np.maximum(1.0, d_ref / 1e4)
    np.testing.assert_array_less(np.abs(d_ours - d_ref), tol)
    srt = np.sort(oi, 1)
    assert not (srt[:, 1:] == srt[:, :-1]).any(), "a bin chosen twice"
    np.testing.assert_allclose(ow, w_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ow.sum(1), 1.0, atol=1e-5)
    _, d2 = enc.knn(ab)
    np.testing.assert_allclose(d2.permute(0, 2, 3, 1).reshape(-1, k).double().numpy(), d_ours,
                               rtol=1e-5, atol=2e-3)


def test_bins_equal_reference_file_and_package_data():
    ref = np.load(REF_BINS) if REF_BINS.exists() else pytest.skip(f"{REF_BINS} missing")
    bins = load_bins()
    assert bins.shape == (313, 2) and bins.dtype == torch.float32
    np.testing.assert_array_equal(bins.numpy(), ref.astype(np.float32))
    with resources.files("pretext").joinpath("data/pts_in_hull.npy").open("rb") as f:
        np.testing.assert_array_equal(np.load(f), ref)
    assert (ref % 10 == 0).all()


@pytest.mark.parametrize("k", [1, 5, 10])
def test_soft_encoding_equals_brute_force(k, backend):
    enc = SoftEncoder(load_bins(), k=k, backend=backend)
    g = torch.Generator().manual_seed(k)
    rnd = torch.rand(1, 2, 48, 48, generator=g) * 300 - 150  # inside and outside the gamut
    grid = (torch.randint(-24, 25, (1, 2, 48, 48), generator=g) * 5).float()  # bin centres and bisectors: ties
    near = grid + (torch.rand(1, 2, 48, 48, generator=g) - 0.5) * 1e-3  # just off the ties
    far = torch.tensor([[400.0, -400, 0, 0, 1e4, 159.99, 160, -160.01],
                        [0, 0, 400, -400, -1e4, 159.99, -160, 12.3]]).view(1, 2, 1, 8).expand(1, 2, 48, 8)
    far = torch.cat([far, torch.zeros(1, 2, 48, 40)], 3)
    _check_against_brute(enc, torch.cat([rnd, grid, near, far]))
    _check_against_brute(enc, _photo_ab(4, 48))


def test_soft_encoding_other_grid_and_weights(backend):
    bins = torch.tensor([[0.0, 0.0], [20, 0], [0, 20], [20, 20], [-20, 40], [60, -20]])
    enc = SoftEncoder(bins, k=3, sigma=7.0, backend=backend)
    ab = torch.rand(2, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 160 - 80
    _, w_ref, _ = _brute_knn(ab, bins, 3, sigma=7.0)
    _check_against_brute(SoftEncoder(bins, k=3, backend=backend), ab)
    w = enc(ab)[1].permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    np.testing.assert_allclose(w, w_ref, atol=1e-4)
    ab = torch.tensor([[0.0, 10.0]]).view(1, 2, 1, 1)  # equidistant from bins 0 and 2 (distance 10)
    idx, w = SoftEncoder(bins, k=2, backend=backend)(ab)
    assert sorted(idx.view(-1).tolist()) == [0, 2] and torch.allclose(w, torch.full_like(w, 0.5))


def test_dense_and_nearest(backend):
    enc = SoftEncoder(load_bins(), k=5, backend=backend)
    ab = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 200 - 100
    dense = enc.dense(ab)
    assert dense.shape == (2, 313, 8, 8)
    assert torch.allclose(dense.sum(1), torch.ones(2, 8, 8), atol=1e-6)
    # dense target vs a brute-force dense encoding (random ab: no exact ties)
    _, w_ref, D = _brute_knn(ab, enc.bins, 5)
    ref = np.zeros_like(D)
    np.put_along_axis(ref, np.argsort(D, axis=1, kind="stable")[:, :5], w_ref, 1)
    assert np.abs(dense.permute(0, 2, 3, 1).reshape(-1, 313).double().numpy() - ref).max() < 1e-4
    assert (D.argmin(1) == enc.nearest(ab).permute(0, 1, 2).reshape(-1).numpy()).all()


def test_grid_counter_on_photos():
    ab = _photo_ab()
    counter = GridCounter(10)
    counter.update(ab)
    bins, counts = counter.bins()
    assert counts.sum() == ab[:, 0].numel()
    ref = {tuple(p) for p in np.load(REF_BINS).tolist()} if REF_BINS.exists() else None
    assert bins.shape[0] > 20 and (bins.abs() <= 130).all()
    if ref is not None:  # sRGB colours fall in the in-gamut cells
        assert {tuple(p) for p in bins.tolist()} <= ref
    # another grid: equals a numpy histogram
    counter = GridCounter(20)
    mask = torch.rand(ab.shape[0], *ab.shape[2:], generator=torch.Generator().manual_seed(0)) < 0.7
    counter.update(ab, mask)
    bins, counts = counter.bins()
    q = np.round(ab.permute(0, 2, 3, 1)[mask].double().numpy() / 20).astype(int)
    cells, ref_counts = np.unique(q, axis=0, return_counts=True)  # lexicographic: a, then b
    np.testing.assert_array_equal(bins.numpy(), cells * 20.0)
    np.testing.assert_array_equal(counts.numpy(), ref_counts)


def test_gaussian_smooth_prior_of_a_delta():
    bins = load_bins().double()
    delta = torch.zeros(313, dtype=torch.float64)
    delta[100] = 1
    out = gaussian_smooth_prior(delta, bins, sigma=5.0)
    d2 = ((bins.numpy() - bins.numpy()[100]) ** 2).sum(1)
    g = np.exp(-d2 / 50)
    np.testing.assert_allclose(out.numpy(), g / g.sum(), atol=1e-12)
    assert torch.allclose(gaussian_smooth_prior(delta, bins, sigma=0), delta)


def test_rebalance_weights():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(313, generator=g, dtype=torch.float64) ** 4
    p /= p.sum()
    for lam in (0.0, 0.5, 0.9):
        w = rebalance_weights(p, lam).double()
        assert abs(float((p * w).sum()) - 1) < 1e-5
    assert torch.allclose(rebalance_weights(torch.full((313,), 1 / 313.0)), torch.ones(313))
    assert torch.allclose(rebalance_weights(p, lam=1.0), torch.ones(313))
    # hand-computed, 3 bins: p = (0.5, 0.3, 0.2), lam = 0.5: mix = (0.41667, 0.31667, 0.26667)
    p3 = torch.tensor([0.5, 0.3, 0.2])
    mix = 0.5 * np.array([0.5, 0.3, 0.2]) + 0.5 / 3
    w3 = (1 / mix) / (np.array([0.5, 0.3, 0.2]) / mix).sum()
    np.testing.assert_allclose(rebalance_weights(p3, 0.5).numpy(), w3, rtol=1e-6)
    np.testing.assert_allclose(w3, [0.8283, 1.0899, 1.2943], atol=1e-4)
    # alpha: w ~ mix^-alpha
    wa = rebalance_weights(p3, 0.5, alpha=0.5).numpy()
    np.testing.assert_allclose(wa / wa[0], (mix / mix[0]) ** -0.5, rtol=1e-6)


def test_rebalance_reference_mode_matches_released_prior_factor():
    p = np.random.default_rng(0).random(313) ** 3
    p[[3, 50, 200]] = 0  # empty bins
    p /= p.sum()
    # PriorFactor of richzhang/colorization (caffe_traininglayers.py), gamma = 0.5, alpha = 1
    uni = np.zeros_like(p)
    uni[p != 0] = 1.0
    uni = uni / uni.sum()
    mix = 0.5 * p + 0.5 * uni
    with np.errstate(divide="ignore"):
        factor = mix**-1.0
    factor = factor / np.nansum(p * np.where(np.isinf(factor), 0, factor))
    w = rebalance_weights(torch.from_numpy(p), 0.5, mode="reference").double().numpy()
    full = p != 0
    np.testing.assert_allclose(w[full], factor[full], rtol=1e-6)
    assert np.isfinite(w).all() and np.allclose(w[~full], w[full].max())
    assert abs((p * w).sum() - 1) < 1e-5
    wp = rebalance_weights(torch.from_numpy(p), 0.5, mode="paper").numpy()
    assert not np.allclose(wp, w) and np.isfinite(wp).all()
    with pytest.raises(ValueError):
        rebalance_weights(torch.from_numpy(p), mode="nope")


def test_pixel_weights_is_weight_of_argmax_bin():
    enc = SoftEncoder(load_bins(), k=5)
    ab = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 200 - 100
    idx, w = enc(ab)
    cw = torch.rand(313, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pixel_weights(cw, idx, w), cw[enc.dense(ab).argmax(1)])


def test_annealed_mean():
    bins = torch.tensor([[0.0, 0.0], [10, 0], [0, 20]])
    logits = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    p = np.exp([1.0, 2.0, 0.5])
    p /= p.sum()
    mean = p @ bins.numpy()  # T = 1: the plain mean sum_q p_q c_q
    np.testing.assert_allclose(annealed_mean(logits, bins, T=1.0).view(2).numpy(), mean, rtol=1e-5)
    # T -> 0: the mode, without NaN / inf even for huge logits
    for T in (0.0, 1e-6):
        for scale in (1.0, 1e4):
            out = annealed_mean(logits * scale, bins, T=T)
            assert torch.isfinite(out).all() and torch.allclose(out.view(2), bins[1])
    # probabilities in: z^(1/T) renormalised, hand-computed for T = 0.5
    probs = torch.from_numpy(p).float().view(1, 3, 1, 1)
    z = p**2 / (p**2).sum()
    np.testing.assert_allclose(annealed_mean(probs, bins, T=0.5, from_probs=True).view(2).numpy(), z @ bins.numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(annealed_mean(probs, bins, T=0.38, from_probs=True).numpy(),
                               annealed_mean(logits, bins, T=0.38).numpy(), rtol=1e-5)
    # batched (B, Q, H, W)
    lg = torch.randn(3, 313, 4, 5, generator=torch.Generator().manual_seed(0))
    out = annealed_mean(lg, load_bins(), T=0.38)
    assert out.shape == (3, 2, 4, 5)
    assert torch.allclose(out[2:, :, 1:2, 3:4], annealed_mean(lg[2:, :, 1:2, 3:4], load_bins(), T=0.38))


def test_subsample_ab_point_and_area():
    # the release's data_ab_ss: a 1x1 convolution with weight 1, stride s, no padding -> pixel (s*i, s*j)
    ab = torch.arange(2 * 180 * 180, dtype=torch.float32).view(1, 2, 180, 180)
    pt = subsample_ab(ab, 8)
    assert pt.shape == (1, 2, 23, 23)  # (180 - 1) // 8 + 1: Caffe's convolution output size
    assert pt[0, 1, 22, 3] == ab[0, 1, 176, 24] and pt[0, 0, 0, 0] == ab[0, 0, 0, 0]
    assert subsample_ab(ab[..., :176, :176], 4).shape == (1, 2, 44, 44)  # the VGG net: 176 -> 44, its output size
    # the averaging option: cell means on the same grid
    area = subsample_ab(ab[..., :16, :16], 8, mode="area")
    assert area.shape == (1, 2, 2, 2) and area[0, 0, 1, 0] == ab[0, 0, 8:16, 0:8].mean()
    assert torch.equal(subsample_ab(ab, 1, "area"), ab)
    with pytest.raises(ValueError):
        subsample_ab(ab, 8, mode="nearest")


def test_point_sampling_keeps_edge_colours():
    """Why point sampling is the default: averaging over a cell that straddles an edge gives a colour of neither
    side (a red / green edge averages to a dull in-between), a point sample gives one of the two."""
    ab = torch.zeros(1, 2, 8, 8)
    ab[:, 0, :, :3] = 60.0  # red-ish left part
    ab[:, 0, :, 3:] = -50.0  # green-ish right part
    enc = SoftEncoder(load_bins(), k=1)
    sides = set(enc.nearest(ab[..., :1, :]).unique().tolist())
    assert enc.nearest(subsample_ab(ab, 8)).item() in sides
    assert enc.nearest(subsample_ab(ab, 8, "area")).item() not in sides


def test_nongray_mask_as_released():
    # NonGrayMaskLayer: 1 if any |a| or |b| of the (subsampled) target exceeds 5, strictly
    ab = torch.zeros(4, 2, 3, 3)
    ab[1, 0, 2, 2] = 5.0  # at the threshold: grey
    ab[2, 1, 0, 1] = -5.01  # above it, negative b
    ab[3] = 4.9
    assert nongray_mask(ab).tolist() == [False, False, True, False]
    assert nongray_mask(ab, thresh=4.8).tolist() == [False, True, True, True]
