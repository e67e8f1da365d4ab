"""Colorize throughput at 256x256: the reference eccv16 network run plainly vs crosschannel's inference path.

reference-plain: what the released demo does per photo: eager fp32, batch 1, contiguous NCHW, no inference mode
    (autograd records the graph), softmax-mean decoding, Lab -> RGB with clipping.
ours: ``pretext.colorize``'s path: batches, channels_last weights and inputs, ``torch.inference_mode``, annealed
    mean, chroma-reduction gamut fit; optionally bf16 autocast of the network (decoding stays fp32).

The two alternate over several rounds (so that load from other processes hits both alike) and the median
images/s of each is reported, with the mean |ab| difference of bf16 vs fp32 on the same images.

    python bench/bench_colorize.py --images 6 --rounds 3 --batch-size 6 [--bf16] [--checkpoint CKPT]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretext.color import lab_to_rgb, rgb_to_l
from pretext.data import list_images, pil_to_tensor, read_image
from pretext.encoding import load_bins
from pretext.predict import compose_rgb, predict_ab_lowres, prepare_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def load_images(n: int, size: int) -> list[torch.Tensor]:
    paths = list_images(DATA)
    step = max(1, len(paths) // n)
    return [pil_to_tensor(read_image(p).resize((size, size), 3)) for p in paths[::step][:n]]


def reference_plain(model, images, bins) -> list[torch.Tensor]:
    """Per image, as the demo: model(L) with autograd on, softmax-mean decode, upsample, lab2rgb (clipped)."""
    out = []
    for rgb in images:
        L = rgb_to_l(rgb)[None]
        logits = model(L)
        ab = torch.einsum("bqhw,qc->bchw", torch.softmax(logits, dim=1), bins)  # model_out of the release
        ab = F.interpolate(ab, size=L.shape[-2:], mode="bilinear", align_corners=False)
        out.append(lab_to_rgb(torch.cat([L, ab], dim=1)).detach())
    return out


def ours(model, images, bins, batch_size: int, dtype=None, T: float = 0.38):
    """Batched, channels_last, inference mode; returns (rgb list, ab list at full size)."""
    rgbs, abs_ = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            rgb = torch.stack(images[i:i + batch_size])
            L = rgb_to_l(rgb)
            ab = predict_ab_lowres(model, L, "ab313", bins, T, dtype, channels_last=True)
            ab = F.interpolate(ab, size=L.shape[-2:], mode="bilinear", align_corners=False)
            rgbs.extend(compose_rgb(L, ab).unbind(0))
            abs_.extend(ab.unbind(0))
    return rgbs, abs_


def timed(fn, n_images: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast and report its ab difference")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--checkpoint", default=None, help="crosschannel checkpoint / ECCV16 weights (default: random zhang_vgg)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        from pretext.colorize import load_colorizer

        base = load_colorizer(args.checkpoint, "cpu", channels_last=False).model
    else:
        from pretext.models import create_model

        base = create_model("zhang_vgg")
    base = base.eval()
    ref_model = copy.deepcopy(base)  # contiguous fp32, autograd on
    fast = prepare_model(copy.deepcopy(base), "cpu", channels_last=True)
    bins = load_bins()
    images = load_images(args.images, args.size)
    n = len(images)
    print(f"{n} photos at {args.size}x{args.size}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}")
    # warm-up (allocator, oneDNN primitive caches)
    reference_plain(ref_model, images[:1], bins)
    ours(fast, images[:args.batch_size], bins, args.batch_size)
    if args.bf16:
        ours(fast, images[:args.batch_size], bins, args.batch_size, torch.bfloat16)
    rates = {"reference-plain": [], "ours-fp32": []}
    if args.bf16:
        rates["ours-bf16"] = []
    for r in range(args.rounds):
        rates["reference-plain"].append(timed(lambda: reference_plain(ref_model, images, bins), n))
        rates["ours-fp32"].append(timed(lambda: ours(fast, images, bins, args.batch_size), n))
        if args.bf16:
            rates["ours-bf16"].append(timed(lambda: ours(fast, images, bins, args.batch_size, torch.bfloat16), n))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} img/s" for k, v in rates.items()), flush=True)
    ref = statistics.median(rates["reference-plain"])
    print("\nmedian images/s:")
    for k, v in rates.items():
        print(f"  {k:<16} {statistics.median(v):7.3f}  ({statistics.median(v) / ref:.2f}x reference)")
    if args.bf16:
        _, ab32 = ours(fast, images, bins, args.batch_size)
        _, ab16 = ours(fast, images, bins, args.batch_size, torch.bfloat16)
        d = torch.stack([(a - b).abs().mean() for a, b in zip(ab32, ab16)])
        print(f"bf16 vs fp32: mean |ab| difference {float(d.mean()):.3f} (max over images {float(d.max()):.3f}) ab units")


if __name__ == "__main__":
    main()
