"""Training images/s: crosschannel's pipeline vs a reference-style pipeline, same model, same run, alternating.

Reference style (as richzhang/colorization's Caffe layers did it): PIL decode + crop in the main process,
skimage.color.rgb2lab per image, ab subsampled to the output grid, sklearn NearestNeighbors (ball tree, k=10)
soft-encoding into a dense (B, 313, h, w) target, dense rebalanced cross-entropy.
crosschannel: DataLoader workers decode, Lab + soft-encoding batched on the training device (sparse targets),
sparse rebalanced cross-entropy (no dense target), channels_last + AMP on CUDA.

    python bench/bench_train_throughput.py --model alexnet_cc --size 180 --batch 8 --steps 4 --rounds 3
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
from pretext.data import ImageDataset, list_images, train_transform
from pretext.encoding import SoftEncoder, load_bins, rebalance_weights, resize_ab
from pretext.losses import dense_cross_entropy, multinomial_cross_entropy
from pretext.models import create_model

REPO = Path(__file__).resolve().parents[1]


def reference_batches(paths, size, batch, rng):
    """PIL decode + random crop + flip in the main process, one image at a time."""
    while True:
        imgs = []
        for p in rng.choice(len(paths), batch):
            im = Image.open(paths[p]).convert("RGB")
            s = size * 256 / 176 / min(im.size)
            im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
            x0, y0 = rng.integers(0, im.width - size + 1), rng.integers(0, im.height - size + 1)
            a = np.asarray(im.crop((x0, y0, x0 + size, y0 + size)))
            imgs.append(a[:, ::-1] if rng.random() < 0.5 else a)
        yield imgs


def reference_step(model, opt, imgs, nbrs, weights, Q):
    from skimage.color import rgb2lab

    labs = np.stack([rgb2lab(a) for a in imgs]).transpose(0, 3, 1, 2).astype(np.float32)  # (B, 3, H, W)
    L = torch.from_numpy(labs[:, :1])
    out = model(L)
    h, w = out.shape[-2:]
    step = labs.shape[-1] // w
    ab = labs[:, 1:, ::step, ::step][:, :, :h, :w]  # subsampled as the reference data layer did
    pts = ab.transpose(0, 2, 3, 1).reshape(-1, 2)
    d, idx = nbrs.kneighbors(pts)
    wts = np.exp(-d**2 / (2 * 5.0**2))
    wts /= wts.sum(1, keepdims=True)
    dense = np.zeros((pts.shape[0], Q), np.float32)
    dense[np.arange(pts.shape[0])[:, None], idx] = wts
    target = torch.from_numpy(dense.reshape(ab.shape[0], h, w, Q).transpose(0, 3, 1, 2).copy())
    loss = dense_cross_entropy(out, target, weights)
    opt.zero_grad()
    loss.backward()
    opt.step()


def ours_step(model, opt, rgb, enc, weights, device, amp):
    rgb = rgb.to(device, non_blocking=True)
    if device.type == "cuda":
        rgb = rgb.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        lab = rgb_to_lab(rgb)
        out = model(lab[:, :1])
    idx, w = enc(resize_ab(lab[:, 1:].float(), tuple(out.shape[-2:])))
    loss = multinomial_cross_entropy(out, idx, w, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet_cc")
    ap.add_argument("--fc-dim", type=int, default=1024, help="alexnet_cc fc6/fc7 width (4096 in the paper)")
    ap.add_argument("--size", type=int, default=180)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "photos"))
    args = ap.parse_args()
    from sklearn.neighbors import NearestNeighbors

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bins = load_bins()
    Q = bins.shape[0]
    prior = torch.full((Q,), 1.0 / Q)
    weights = rebalance_weights(prior)
    kw = {"fc_dim": args.fc_dim} if args.model == "alexnet_cc" else {}
    torch.manual_seed(0)
    model_ref = create_model(args.model, **kw)
    model_ours = create_model(args.model, **kw).to(device)
    if device.type == "cuda":
        model_ours = model_ours.to(memory_format=torch.channels_last)
    opt_ref = torch.optim.Adam(model_ref.parameters(), 3e-5, betas=(0.9, 0.99))
    opt_ours = torch.optim.Adam(model_ours.parameters(), 3e-5, betas=(0.9, 0.99))
    nbrs = NearestNeighbors(n_neighbors=10, algorithm="ball_tree").fit(bins.numpy())
    enc = SoftEncoder(bins, k=5).to(device)

    paths = list_images(args.data)
    rng = np.random.default_rng(0)
    ref_iter = reference_batches(paths, args.size, args.batch, rng)
    ds = ImageDataset(paths, train_transform(args.size, "resize_crop"), (3, args.size, args.size))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                         drop_last=True, persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")

    def ours_batches():
        while True:
            for rgb, ok, grey in loader:
                yield rgb

    ours_iter = ours_batches()
    weights_dev = weights.to(device)
    # warm-up both
    reference_step(model_ref, opt_ref, next(ref_iter), nbrs, weights, Q)
    ours_step(model_ours, opt_ours, next(ours_iter), enc, weights_dev, device, device.type == "cuda")
    res = {"reference": [], "crosschannel": []}
    for r in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            reference_step(model_ref, opt_ref, next(ref_iter), nbrs, weights, Q)
        res["reference"].append(args.steps * args.batch / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(args.steps):
            ours_step(model_ours, opt_ours, next(ours_iter), enc, weights_dev, device, device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.synchronize()
        res["crosschannel"].append(args.steps * args.batch / (time.perf_counter() - t))
        print(f"round {r + 1}: reference {res['reference'][-1]:.2f} img/s, crosschannel {res['crosschannel'][-1]:.2f} img/s")
    ref, ours = statistics.median(res["reference"]), statistics.median(res["crosschannel"])
    print(f"\n{args.model} {kw} {args.size}px batch {args.batch} on {device} ({torch.get_num_threads()} threads)")
    print(f"{'pipeline':<14}{'img/s (median)':>16}")
    print(f"{'reference':<14}{ref:>16.2f}")
    print(f"{'crosschannel':<14}{ours:>16.2f}")
    print(f"ratio crosschannel / reference: {ours / ref:.2f}x")


if __name__ == "__main__":
    main()
