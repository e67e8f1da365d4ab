"""Seconds and peak memory (RSS) per Fast R-CNN training iteration on the CPU, at the default scales.

    python bench/bench_det_iter.py [--voc ../shared/data/voc_sample/bbox_detection] [--scales 480 1200] [--iters 2]
                                   [--rounds 2]

One iteration is the trainer's own step (``transfer.detection``): two VOC images (decoded, resized so that the
shorter side is the training scale, at most 2000 px long, flipped or not) through the full-size AlexNet detector
(conv1..conv5, RPN with py-faster-rcnn's 12000 / 2000 proposals, 128 RoIs pooled 6x6, fc6 / fc7 4096 wide, 21-way
predictor), losses, backward and the SGD step. The baseline, measured in the same run and alternated with it so that
load changes on a shared machine hit both alike, is the backbone alone (conv1..conv5 forward and backward on the
same padded batch): the ratio is the cost of the detector on top of its trunk. Each measurement runs in a fresh
process, so that its peak RSS (``ru_maxrss``) is its own; test-time seconds per image at the test scale (600) are
measured too. Prints medians over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(kind: str, scale: int, voc: str, iters: int) -> dict:
    import torch

    from pretext.runtime import build_config
    from transfer.backbone import build_backbone
    from transfer.detection import (DetConfig, DetDataset, _to_device, build_detector, build_optimizer, collate,
                                    load_records, peak_rss_mb, set_train_mode)
    from transfer.voc import find_voc_root

    torch.manual_seed(0)
    cfg = build_config(DetConfig, dict(voc=voc, rows=["random"], fallback_split="all", train_scales=[scale],
                                       test_scale=scale))
    root = find_voc_root(voc)
    recs, _ = load_records(root, cfg.train_split, cfg, train=kind != "test")
    net = build_backbone(random_init="gaussian", fc="linear")
    model = build_detector(net, cfg)
    opt = build_optimizer(model, cfg)
    ds = DetDataset(recs, cfg, train=kind != "test")
    rss0 = peak_rss_mb()
    times = []
    for k in range(iters + 1):  # the first one warms up
        t0 = time.perf_counter()
        if kind == "test":
            model.eval()
            images, _, props = _to_device(collate([ds[(k % len(recs), 0)]]), torch.device("cpu"))
            with torch.no_grad():
                model(images, None, props)
        else:
            batch = collate([ds[((2 * k + j) % len(ds), k * 2 + j)] for j in range(cfg.images_per_batch)])
            images, targets, props = _to_device(batch, torch.device("cpu"))
            set_train_mode(model)
            if kind == "det":
                loss = sum(model(images, targets, props).values())
            else:  # the trunk alone, on the same padded batch
                loss = model.backbone(model.transform(images)[0].tensors).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if k:
            times.append(time.perf_counter() - t0)
    return {"kind": kind, "scale": scale, "sec_per_iter": statistics.median(times), "peak_rss_mb": peak_rss_mb(),
            "rss_after_build_mb": rss0, "threads": torch.get_num_threads()}


def measure(kind: str, scale: int, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(scale), "--voc", args.voc, "--iters",
                          str(args.iters)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voc", default=str(ROOT.parent / "shared" / "data" / "voc_sample" / "bbox_detection"))
    p.add_argument("--scales", type=int, nargs="+", default=[480, 1200])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("KIND", "SCALE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.voc, args.iters)))
        return
    rows = []
    for scale in args.scales:
        det, trunk = [], []
        for _ in range(args.rounds):
            det.append(measure("det", scale, args))
            trunk.append(measure("trunk", scale, args))
        d = statistics.median(r["sec_per_iter"] for r in det)
        t = statistics.median(r["sec_per_iter"] for r in trunk)
        ratio = statistics.median(a["sec_per_iter"] / b["sec_per_iter"] for a, b in zip(det, trunk))
        rows.append(f"| train, shorter side {scale} | {d:.2f} s/iter, peak RSS {max(r['peak_rss_mb'] for r in det):.0f} MB"
                    f" | trunk alone {t:.2f} s/iter, {max(r['peak_rss_mb'] for r in trunk):.0f} MB | {ratio:.2f}x |")
    test = [measure("test", 600, args) for _ in range(args.rounds)]
    rows.append(f"| test, shorter side 600, 1 image | {statistics.median(r['sec_per_iter'] for r in test):.2f} s/image, "
                f"peak RSS {max(r['peak_rss_mb'] for r in test):.0f} MB | - | - |")
    print(f"torch threads: {det[0]['threads']}; {args.rounds} rounds x {args.iters} timed iterations (medians)\n")
    print("| step | detector | baseline (same run) | ratio |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
