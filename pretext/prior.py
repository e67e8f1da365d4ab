"""Empirical ab prior of an image folder (Zhang et al. 2016, sec. 2.2): ``crosschannel prior DATA -o prior.npz``.

Streams the images once (multi-worker decoding, progress bar), histograms every pixel's ab value over the bins
(nearest bin), smooths the histogram with a Gaussian (sigma 5) in ab space and saves probabilities with
metadata. Unreadable and grey images are skipped and counted. With ``--grid G`` the bins are derived from the
data (the occupied cells of a G-spaced grid) instead of the reference 313-bin table.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .color import rgb_to_lab
from .data import DecodedImages, is_grey, list_images, pil_to_tensor, read_image, resize_shorter
from .encoding import SIGMA, GridCounter, SoftEncoder, gaussian_smooth_prior, load_bins
from .runtime import UserError, atomic_write_bytes, log, setup_logging


def _decode_ab(path, size: int):
    """Decode + resize + Lab (in a loader worker): ab (2, h, w), or None for a grey image."""
    img = read_image(path, min_size=size)  # JPEG draft decoding, never below ``size``
    if size > 0:
        img = resize_shorter(img, size)
    rgb = pil_to_tensor(img)
    if is_grey(rgb):
        return None, "grey"
    return rgb_to_lab(rgb)[1:], None


def compute_prior(paths, bins: torch.Tensor | None, size: int = 256, grid: float = 10.0, sigma: float = SIGMA,
                  workers: int = 2, progress: bool = True) -> dict:
    """Histogram + smoothing. ``bins=None`` derives bins from the data on a ``grid``-spaced grid."""
    ds = DecodedImages(paths, functools.partial(_decode_ab, size=size))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
    enc = SoftEncoder(bins, k=1) if bins is not None else None
    counts = torch.zeros(bins.shape[0], dtype=torch.float64) if bins is not None else None
    grid_counter = GridCounter(grid) if bins is None else None
    n_ok, unreadable, grey, pixels = 0, 0, 0, 0
    for i, ab, reason in tqdm(loader, total=len(ds), desc="prior", unit="img", disable=not progress):
        if ab is None:
            if reason == "grey":
                grey += 1
            else:
                unreadable += 1
                log.warning("skipped %s: %s", ds.paths[i], reason)
            continue
        ab = ab.unsqueeze(0)
        if enc is not None:
            counts += torch.bincount(enc.nearest(ab).reshape(-1), minlength=counts.numel()).double()
        else:
            grid_counter.update(ab)
        n_ok += 1
        pixels += ab.shape[-1] * ab.shape[-2]
    if n_ok == 0:
        raise UserError(f"no usable colour images ({unreadable} unreadable, {grey} grey of {len(ds)})")
    if bins is None:
        bins, counts = grid_counter.bins(min_count=1)
    raw = counts / counts.sum()
    return {
        "bins": bins.numpy().astype(np.float32),
        "counts": counts.numpy(),
        "probs_raw": raw.numpy(),
        "probs": gaussian_smooth_prior(raw, bins, sigma).numpy(),
        "sigma": np.float64(sigma),
        "num_images": np.int64(n_ok),
        "num_pixels": np.int64(pixels),
        "skipped_unreadable": np.int64(unreadable),
        "skipped_grey": np.int64(grey),
        "size": np.int64(size),
        "grid": np.float64(grid),
    }


def save_prior(prior: dict, path: str | Path, source: str) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    meta = dict(prior, source=np.str_(source), created=np.str_(datetime.datetime.now().isoformat(timespec="seconds")))
    np.savez(buf, **meta)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_prior(path: str | Path) -> dict:
    """Load a prior file written by :func:`save_prior`; returns tensors ``bins`` (Q, 2) and ``probs`` (Q,)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prior file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a prior file ({type(e).__name__})") from None
    for key in ("bins", "probs"):
        if key not in d:
            raise UserError(f"{path}: missing '{key}' (not written by 'crosschannel prior'?)")
    d["bins"] = torch.from_numpy(d["bins"].astype(np.float32))
    d["probs"] = torch.from_numpy(d["probs"].astype(np.float64))
    if d["bins"].shape[0] != d["probs"].shape[0]:
        raise UserError(f"{path}: {d['bins'].shape[0]} bins but {d['probs'].shape[0]} probabilities")
    return d


#: the prior shipped with the package (eval-color's default for checkpoints that carry none): the quickstart sample's
#: training photos, ``compute_prior(list_images("pretext/sample/train"), load_bins(), size=160)`` (as the quickstart)
SHIPPED_PRIOR = "data/prior_sample.npz"


def shipped_prior_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("pretext") / SHIPPED_PRIOR))


def load_shipped_prior() -> dict:
    """The shipped prior (:data:`SHIPPED_PRIOR`) with a ``description`` naming it and its provenance."""
    d = load_prior(shipped_prior_path())
    d["description"] = (f"the shipped prior (pretext/{SHIPPED_PRIOR}: {int(d['num_images'])} colour photos of the "
                        f"quickstart sample pretext/sample/train, {len(d['probs'])} bins, sigma {float(d['sigma']):g})")
    return d


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("crosschannel prior", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="+", help="image folder(s), list file(s) or glob(s)")
    p.add_argument("-o", "--output", default="prior.npz")
    p.add_argument("--size", type=int, default=256, help="resize the shorter side to this before histogramming (0: native)")
    p.add_argument("--max-images", type=int, default=0, help="use at most N images (evenly spaced; 0: all)")
    p.add_argument("--sigma", type=float, default=SIGMA, help="Gaussian smoothing in ab units")
    p.add_argument("--grid", type=float, default=0, help="derive bins from the data on this grid instead of the 313-bin table")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    return p


def check_args(args) -> None:
    """Refuse bad values in one line before anything is read or written."""
    for key in ("size", "max_images", "workers"):
        if getattr(args, key) < 0:
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 0")
    if not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise UserError(f"--sigma {args.sigma}: must be >= 0 (0: no smoothing)")
    if not (math.isfinite(args.grid) and (args.grid == 0 or args.grid >= 1)):
        raise UserError(f"--grid {args.grid}: must be 0 (the 313-bin table) or at least 1 (ab units)")
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"-o {out}: is a folder; give a file name such as {out / 'prior.npz'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"-o {out}: {parent} is a file, not a folder")
            break


def main(args) -> int:
    check_args(args)
    setup_logging()
    paths = list_images(args.data)
    if not paths:
        raise UserError(f"{' '.join(args.data)}: no images found")
    if args.max_images and len(paths) > args.max_images:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, args.max_images)]
    bins = None if args.grid else load_bins()
    t0 = time.time()
    prior = compute_prior(paths, bins, size=args.size, grid=args.grid or 10.0, sigma=args.sigma,
                          workers=args.workers, progress=not args.no_progress)
    save_prior(prior, args.output, source=" ".join(str(Path(d).resolve()) for d in args.data))
    p = torch.from_numpy(prior["probs"])
    top = torch.from_numpy(prior["bins"])[p.argmax()].tolist()
    print(f"prior: {prior['num_images']} images ({prior['skipped_unreadable']} unreadable, {prior['skipped_grey']} grey skipped), "
          f"{len(p)} bins, mode at ab={top}, {time.time() - t0:.1f}s -> {args.output}")
    return 0


if __name__ == "__main__":
    import sys

    from .runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
