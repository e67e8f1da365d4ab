"""Speed-up of training all linear-probe heads in one pass of the frozen encoder over one run per layer.

    python bench/bench_probe_single_pass.py [--data ../shared/data/labeled_gcompris] [--crop 163] [--rounds 3]

One "run" is one training epoch of the probe over the same images with the real pipeline (JPEG decoding, resize +
random crop + flip, L conversion, frozen encoder, pooling, BatchNorm + linear heads, SGD step). Measured, in
alternating rounds so that load changes on a shared machine hit both sides alike:

* single:   one epoch training the heads of all taps at once;
* separate: one epoch per tap, each training one head (the encoder stops at that tap: the fair baseline);
* naive:    one epoch per tap where every run computes the whole trunk (``forward_features`` to the end,
            as a per-layer script built on ``extract_taps`` does).

Prints the median time of each and the median over rounds of the per-round ratios separate/single, naive/single.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from linear_probe import train
from linear_probe.encoder import build_encoder
from linear_probe.heads import ProbeHeads
from pretext.runtime import load_config

ROOT = Path(__file__).resolve().parents[1]


def one_run(cfg, encoder, taps, device, early_stop=True) -> float:
    """Seconds for one training epoch of the heads of ``taps``."""
    encoder.early_stop = early_stop
    train_tf, val_tf = train.build_transforms(cfg)
    ds, _, classes = train.get_dataset(cfg, train_tf, val_tf)
    all_shapes = encoder.tap_shapes(cfg.crop)
    shapes = {t: all_shapes[t] for t in taps}
    heads = ProbeHeads(shapes, len(classes), cfg.pool, cfg.max_dims, cfg.seed).to(device)
    opt = torch.optim.SGD(heads.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.workers)
    enc_taps = encoder.tap_modules
    encoder.tap_modules = {t: enc_taps[t] for t in taps}  # this run's taps only
    try:
        t0 = time.perf_counter()
        train.train_one_epoch(encoder, heads, heads, opt, loader, device, None, False, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        encoder.tap_modules = enc_taps
        encoder.early_stop = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "labeled_gcompris"))
    p.add_argument("--model", default="alexnet_cc")
    p.add_argument("--fc-dim", type=int, default=256, help="fc6/fc7 width of alexnet_cc (the quickstart's)")
    p.add_argument("--taps", default="conv1,conv2,conv3,conv4,conv5")
    p.add_argument("--crop", type=int, default=163)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    taps = args.taps.split(",")
    cfg = load_config(train.ProbeConfig, None, [f"data={args.data}", "val_fraction=0.3", f"crop={args.crop}",
                                                      f"resize={int(args.crop * 256 / 227)}", f"workers={args.workers}",
                                                      f"batch_size={args.batch_size}"])
    kw = {"fc_dim": args.fc_dim} if args.model == "alexnet_cc" else {}
    from pretext.runtime import select_device

    device = select_device(args.device)
    encoder, spec = build_encoder(taps, random_init=args.model, model_kwargs=kw)
    encoder.to(device)
    one_run(cfg, encoder, taps, device)  # warm-up (allocator, file cache)
    times = {"single": [], "separate": [], "naive": []}
    for r in range(args.rounds):
        times["single"].append(one_run(cfg, encoder, taps, device))
        times["separate"].append(sum(one_run(cfg, encoder, [t], device) for t in taps))
        times["naive"].append(sum(one_run(cfg, encoder, [t], device, early_stop=False) for t in taps))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
              + f"  (ratios {times['separate'][-1] / times['single'][-1]:.2f}x, {times['naive'][-1] / times['single'][-1]:.2f}x)",
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["single"])) for k in ("separate", "naive")}
    print(f"\n{spec.label} on {device}, taps {taps}, crop {args.crop}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.workers} workers, "
          f"median of {args.rounds} rounds (one epoch over {len(train.get_dataset(cfg, None, None)[0])} images):")
    print(f"  single pass (all {len(taps)} heads):     {med['single']:.2f} s")
    print(f"  one run per tap (encoder stops early): {med['separate']:.2f} s  -> speed-up {ratio['separate']:.2f}x")
    print(f"  one run per tap (whole trunk):         {med['naive']:.2f} s  -> speed-up {ratio['naive']:.2f}x")
    print("  (speed-up: median over rounds of the per-round ratio; rounds alternate, so load changes hit both sides)")


if __name__ == "__main__":
    main()
