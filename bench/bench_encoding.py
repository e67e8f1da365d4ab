"""Soft-encoding speed: crosschannel's ``SoftEncoder`` vs the reference method of Zhang et al.

The reference is ``NNEncode.encode_points_mtx_nd`` of richzhang/colorization
(``resources/caffe_traininglayers.py``): a scikit-learn ball tree (fitted once, outside the timing) queried for
the k nearest bins of every pixel, Gaussian weights, scattered into a dense (N, 313) float64 array that is
pre-allocated once and zeroed per call (``sameBlock=True``), returned as a (B, 313, H, W) view.

Rounds alternate reference and ours (machine speed drifts within minutes), medians are reported. "ours" is the
default CPU path (the C kernel of ``pretext.encoding_kernel``); the torch path, which SoftEncoder falls back to where
no C compiler exists (and which runs on GPUs), is timed alongside.
Inputs: ab of real photos (``--data``; random ab in [-110, 110] if the folder is missing) at 56 x 56.

    python bench/bench_encoding.py --k 5 --batch 32 --rounds 7
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pretext.color import rgb_to_lab
from pretext.data import list_images, pil_to_tensor, read_image
from pretext.encoding import SoftEncoder, load_bins


class NNEncode:
    """The reference soft-encoder (richzhang/colorization, caffe_traininglayers.py), numpy / scikit-learn."""

    def __init__(self, NN: int, sigma: float, cc: np.ndarray):
        from sklearn.neighbors import NearestNeighbors

        self.cc, self.K, self.NN, self.sigma = cc, cc.shape[0], int(NN), sigma
        self.nbrs = NearestNeighbors(n_neighbors=self.NN, algorithm="ball_tree").fit(self.cc)
        self.alreadyUsed = False

    def encode_points_mtx_nd(self, pts_nd: np.ndarray, axis: int = 1, sameBlock: bool = True) -> np.ndarray:
        pts_flt = np.moveaxis(pts_nd, axis, -1).reshape(-1, pts_nd.shape[axis])  # flatten_nd_array
        P = pts_flt.shape[0]
        if sameBlock and self.alreadyUsed:
            self.pts_enc_flt[...] = 0
        else:
            self.alreadyUsed = True
            self.pts_enc_flt = np.zeros((P, self.K))
            self.p_inds = np.arange(0, P, dtype="int")[:, None]
        dists, inds = self.nbrs.kneighbors(pts_flt)
        wts = np.exp(-(dists**2) / (2 * self.sigma**2))
        wts = wts / np.sum(wts, axis=1)[:, None]
        self.pts_enc_flt[self.p_inds, inds] = wts
        shp = [s for i, s in enumerate(pts_nd.shape) if i != axis] + [self.K]  # unflatten_2d_array (a view)
        return np.moveaxis(self.pts_enc_flt.reshape(shp), -1, axis)


def photo_ab(folder: Path, batch: int, size: int) -> torch.Tensor:
    files = list_images(folder) if folder.is_dir() else []
    if not files:
        print(f"no photos under {folder}: using random ab")
        return torch.rand(batch, 2, size, size, generator=torch.Generator().manual_seed(0)) * 220 - 110
    imgs = [pil_to_tensor(read_image(f).resize((size, size), Image.BILINEAR)) for f in files[:: max(1, len(files) // batch)][:batch]]
    while len(imgs) < batch:
        imgs.append(imgs[len(imgs) % len(files)].flip(-1))
    return rgb_to_lab(torch.stack(imgs))[:, 1:].contiguous()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: robust to other jobs on a busy machine)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "photos")
    ap.add_argument("--random", action="store_true", help="uniform random ab in [-110, 110] instead of photos")
    ap.add_argument("--max-bits", type=int, default=4, help="SoftEncoder max_bits")
    ap.add_argument("--backend", default="native", choices=["native", "torch"],
                    help="SoftEncoder backend for the 'ours' rows (the torch path is always shown too)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bins = load_bins()
    if args.random:
        ab = torch.rand(args.batch, 2, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 220 - 110
    else:
        ab = photo_ab(args.data, args.batch, args.size)
    ab_np = ab.double().numpy()
    t0 = time.perf_counter()
    enc = SoftEncoder(bins, k=args.k, max_bits=args.max_bits, backend=args.backend)
    enc(ab[:1])  # binds the C kernel (compiled at first use, then cached on disk)
    build = time.perf_counter() - t0
    enc_torch = SoftEncoder(bins, k=args.k, max_bits=args.max_bits, backend="torch")
    ref = NNEncode(args.k, enc.sigma, bins.double().numpy())

    # correctness: same dense encoding as the reference
    dense_ref = ref.encode_points_mtx_nd(ab_np)
    dense = enc.dense(ab)
    err = float(np.abs(dense.double().numpy() - dense_ref).max())

    buf = torch.empty_like(dense)
    cases = {
        "reference kneighbors only": lambda: ref.nbrs.kneighbors(ab_np.transpose(0, 2, 3, 1).reshape(-1, 2)),
        "reference full (dense)": lambda: ref.encode_points_mtx_nd(ab_np),
        "ours sparse (idx, w)": lambda: enc(ab),
        "ours sparse, torch path": lambda: enc_torch(ab),
        "ours dense, new tensor": lambda: enc.dense(ab),
        "ours dense, reused buffer": lambda: enc.dense(ab, out=buf),
    }
    wall = {name: [] for name in cases}
    cpu = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            w, c = timed(fn)
            wall[name].append(w * 1e3)
            cpu[name].append(c * 1e3)
    mw = {name: statistics.median(t) for name, t in wall.items()}
    mc = {name: statistics.median(t) for name, t in cpu.items()}

    n = args.batch * args.size * args.size
    print(f"k={args.k}  batch {args.batch}x{args.size}x{args.size} ({n} pixels, {'random' if args.random else 'photo'} ab)"
          f"  torch threads {args.threads}  rounds {args.rounds}  table build {build:.2f} s  backend {args.backend}")
    print(f"max |ours dense - reference dense| = {err:.2e}  (nonzero only where distances tie at the k-th neighbour)")
    print(f"{'method':<28}{'wall median':>12}{'min':>8}{'max':>8}{'CPU median':>12}   (ms)")
    for name in cases:
        print(f"{name:<28}{mw[name]:>12.2f}{min(wall[name]):>8.2f}{max(wall[name]):>8.2f}{mc[name]:>12.2f}")
    print("speed-up, median reference / median ours (wall | CPU time):")
    for ours in [name for name in cases if name.startswith("ours")]:
        print(f"  {ours:<26} vs reference full {mw['reference full (dense)'] / mw[ours]:6.1f}x |"
              f"{mc['reference full (dense)'] / mc[ours]:6.1f}x   vs kneighbors only "
              f"{mw['reference kneighbors only'] / mw[ours]:6.1f}x |{mc['reference kneighbors only'] / mc[ours]:6.1f}x")


if __name__ == "__main__":
    main()
