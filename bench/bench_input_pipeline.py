"""Training input pipeline: images/s per loader worker, and training images/s with a null network.

Part 1, per worker (one process, one thread), the same files in alternating rounds (the order of the pipelines
rotates every round; medians and the spread of the per-round ratios are printed):
  decode-only     PIL decode of the whole file (``Image.open`` + ``load``): the ceiling of a PIL worker
  reference       as richzhang/colorization trains (Caffe ``Data`` layer: full decode, resize 256, random 176 crop,
                  mirror; ``BGR2LabLayer``: skimage ``rgb2lab`` on the CPU): full PIL decode, torchvision transforms,
                  skimage Lab, float32 (3, S, S)
  before          crosschannel before issue 16: full decode, torchvision transforms, float [0, 1] tensor
  crosschannel    ``TrainCrops``: crop drawn from the header, JPEG draft decoding, one crop + resize, uint8
                  (Lab is computed on the training device, batched: part 2)
Part 2: the trainer's loop with the network replaced by a null model (DataLoader -> batch_to_device -> Lab ->
null model), 0/1/2 workers, crosschannel vs before: the loader alone.

Part 1b (``--interleave N``): the same pipelines alternating file by file, CPU time summed over N passes.

    python bench/bench_input_pipeline.py --rounds 7 [--crop rrc|resize_crop] [--size 176] [--images 0]
                                         [--interleave 3] [--skip-train]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pretext.color import rgb_to_lab
from pretext.data import ImageDataset, TrainCrops, batch_to_device, list_images, train_transform
from pretext.train import ShardedSampler

REPO = Path(__file__).resolve().parents[1]


def decode_only(paths):
    def run(i):
        with Image.open(paths[i]) as im:
            im.load()
    return run


def reference(paths, size):
    from skimage.color import rgb2lab
    from torchvision.transforms import v2 as T

    tf = T.Compose([T.Resize(round(size * 256 / 176)), T.RandomCrop(size), T.RandomHorizontalFlip()])

    def run(i):
        with Image.open(paths[i]) as im:
            rgb = tf(im.convert("RGB"))
        return torch.from_numpy(rgb2lab(np.asarray(rgb)).astype(np.float32).transpose(2, 0, 1))
    return run


def before(paths, size, crop):
    ds = ImageDataset(paths, train_transform(size, crop), (3, size, size))

    def run(i):
        torch.manual_seed(i)
        return ds[i]
    return run


def crosschannel(paths, size, crop):
    ds = TrainCrops(paths, size, crop)

    def run(i):
        return ds[(i, i)]
    return run


def per_worker(args, paths) -> None:
    torch.set_num_threads(1)
    pipes = {"decode-only": decode_only(paths), "reference": reference(paths, args.size),
             "before": before(paths, args.size, args.crop), "crosschannel": crosschannel(paths, args.size, args.crop)}
    for f in pipes.values():  # warm-up: imports, first-call caches, the page cache
        for i in range(min(8, len(paths))):
            f(i)
    wall = {k: [] for k in pipes}
    cpu = {k: [] for k in pipes}
    names = list(pipes)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t, c = time.perf_counter(), time.process_time()
            for i in range(len(paths)):
                pipes[k](i)
            wall[k].append(len(paths) / (time.perf_counter() - t))
            cpu[k].append(len(paths) / (time.process_time() - c))
    print(f"\nper worker (1 process, 1 thread), {len(paths)} files, crop {args.crop} {args.size}px, "
          f"{args.rounds} alternating rounds; img/s medians (wall | CPU time); ratio to decode-only: median [min-max] "
          f"of the per-round ratios")
    for k in names:
        rw = [a / b for a, b in zip(wall[k], wall["decode-only"])]
        rc = [a / b for a, b in zip(cpu[k], cpu["decode-only"])]
        print(f"  {k:13s} {statistics.median(wall[k]):7.1f} | {statistics.median(cpu[k]):7.1f} img/s   "
              f"wall {statistics.median(rw):.2f} [{min(rw):.2f}-{max(rw):.2f}]   "
              f"CPU {statistics.median(rc):.2f} [{min(rc):.2f}-{max(rc):.2f}]")
    for k in ("reference", "before"):
        rw = [a / b for a, b in zip(wall["crosschannel"], wall[k])]
        rc = [a / b for a, b in zip(cpu["crosschannel"], cpu[k])]
        print(f"  crosschannel / {k}: wall {statistics.median(rw):.2f}x [{min(rw):.2f}-{max(rw):.2f}], "
              f"CPU {statistics.median(rc):.2f}x [{min(rc):.2f}-{max(rc):.2f}]")


def interleaved(args, paths) -> None:
    """The same comparison at the finest alternation: for every file, each pipeline in turn (order rotated per
    file and pass), CPU time summed per pipeline over ``--interleave`` passes. Paired in time within
    milliseconds, the ratios are far less exposed to the load of other jobs than those of whole rounds."""
    torch.set_num_threads(1)
    pipes = {"decode-only": decode_only(paths), "reference": reference(paths, args.size),
             "before": before(paths, args.size, args.crop), "crosschannel": crosschannel(paths, args.size, args.crop)}
    names = list(pipes)
    cpu = dict.fromkeys(names, 0.0)
    for r in range(args.interleave):
        for i in range(len(paths)):
            k0 = (i + r) % len(names)
            for k in names[k0:] + names[:k0]:
                c = time.process_time()
                pipes[k](i)
                cpu[k] += time.process_time() - c
    n = args.interleave * len(paths)
    print(f"\nper worker, interleaved file by file ({args.interleave} passes over {len(paths)} files, crop "
          f"{args.crop}): CPU ms/img and ratio of total CPU time")
    for k in names:
        print(f"  {k:13s} {cpu[k] / n * 1e3:6.3f} ms/img   {n / cpu[k]:7.1f} img/s   ratio to decode-only "
              f"{cpu['decode-only'] / cpu[k]:.3f}")
    print(f"  crosschannel / reference {cpu['reference'] / cpu['crosschannel']:.2f}x, "
          f"/ before {cpu['before'] / cpu['crosschannel']:.2f}x")


class NullModel(torch.nn.Module):
    """Stands in for the network: touches its input so that nothing is optimised away, computes nothing."""

    def forward(self, L):
        return L.mean()


def null_training(args, paths) -> None:
    """The trainer's loop with a null network: DataLoader (ShardedSampler, persistent workers, pinned memory on
    CUDA) -> device (uint8 -> float there) -> Lab -> null model; and the loader alone (no Lab)."""
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = NullModel().to(device)
    batch = args.batch

    def loader(kind, workers):
        if kind == "crosschannel":
            ds = TrainCrops(paths, args.size, args.crop)
        else:
            ds = _SeededBefore(paths, train_transform(args.size, args.crop), (3, args.size, args.size))
        smp = ShardedSampler(len(ds), batch, seed=0)
        return torch.utils.data.DataLoader(ds, batch_size=batch, sampler=smp, num_workers=workers, drop_last=True,
                                           pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def epochs(dl, lab: bool, first: int) -> int:
        n = 0
        for e in range(args.epochs):
            dl.sampler.set_epoch(first + e)
            for rgb, ok, grey in dl:
                if rgb.dtype == torch.uint8:
                    rgb, ok, grey = batch_to_device(rgb, ok, grey, device)
                else:  # before: float [0, 1] from the workers
                    rgb = rgb.to(device, non_blocking=True)
                if lab:
                    model(rgb_to_lab(rgb)[:, :1]).item()
                n += rgb.shape[0]
        return n

    configs = [(k, w, lab) for w in args.workers for lab in (False, True) for k in ("before", "crosschannel")]
    loaders = {(k, w): loader(k, w) for w in args.workers for k in ("before", "crosschannel")}
    for (k, w), dl in loaders.items():
        next(iter(dl))  # starts the persistent workers
    ips = {c: [] for c in configs}
    for r in range(args.train_rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for c in order:
            t = time.perf_counter()
            n = epochs(loaders[c[:2]], c[2], first=1 + r * args.epochs)
            ips[c].append(n / (time.perf_counter() - t))
    print(f"\ntraining loop with a null network on {device}, batch {batch}, {args.epochs} epochs of {len(paths)} "
          f"images per measurement, {args.train_rounds} alternating rounds, img/s medians [min-max]; "
          f"{os.cpu_count()} CPU cores")
    for lab in (False, True):
        print("  loader -> device (uint8 -> float there)" + (" -> Lab -> null model" if lab else ""))
        for w in args.workers:
            b, x = ips[("before", w, lab)], ips[("crosschannel", w, lab)]
            ratio = [p / q for p, q in zip(x, b)]
            print(f"    workers={w}: before {statistics.median(b):6.1f} [{min(b):.1f}-{max(b):.1f}]   crosschannel "
                  f"{statistics.median(x):6.1f} [{min(x):.1f}-{max(x):.1f}]   ratio {statistics.median(ratio):.2f}x "
                  f"[{min(ratio):.2f}-{max(ratio):.2f}]")


class _SeededBefore(ImageDataset):
    def __getitem__(self, item):
        i, seed = item
        torch.manual_seed(seed)
        return super().__getitem__(i)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "photos"))
    p.add_argument("--images", type=int, default=0, help="use the first N files (0: all)")
    p.add_argument("--size", type=int, default=176)
    p.add_argument("--crop", default="rrc", choices=("rrc", "resize_crop"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed training measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-rounds", type=int, default=3)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="also N passes alternating the pipelines file by file (a less load-sensitive ratio)")
    args = p.parse_args()
    paths = list_images(args.data)
    if args.images:
        paths = paths[: args.images]
    per_worker(args, paths)
    if args.interleave:
        interleaved(args, paths)
    if not args.skip_train:
        null_training(args, paths)


if __name__ == "__main__":
    main()
