"""Per-layer linear probes on a frozen encoder (Zhang et al. ECCV16 Sec. 3.2; protocol of Goyal et al. ICCV19).

    python -m linear_probe.train --config configs/probe/quick_gcompris.yaml --checkpoint runs/pretext/checkpoint.pth
    python -m linear_probe.train --config configs/probe/quick_gcompris.yaml --random-init alexnet_cc
    torchrun --nproc_per_node=8 -m linear_probe.train --config configs/probe/alexnet_cc_in1k_avgpool.yaml --checkpoint ...

Every tap named by the config is pooled below ``max_dims`` features (``linear_probe.heads``: by default average
pooling with kernel = stride, Zhang et al. Fig. 7) and gets a BatchNorm (no affine) + linear head; all heads train
in one pass of the frozen encoder per batch. A cross-channel AlexNet is probed in the geometry transfer uses
(BatchNorm folded, pool5 max 3/2: ``pretext.models.alexnet_cc.export_alexnet_transfer``). The encoder stays in eval
mode and is checked to be bit-identical after training. The default solver is the released linear test's
(richzhang/colorization:feature_learning_tests/linear/solver.prototxt, see PROVENANCE.md). Outputs in ``out_dir``:
``results.json`` (per tap: pooled shape and pooling), ``results.md`` (with published figures beside ours),
``accuracy_per_layer.png``, ``log.jsonl``, ``checkpoint.pth`` (heads, optimiser; ``--resume`` continues).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import warnings
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from pretext.data import UnreadableImage, eval_transform, read_image
from pretext.runtime import (
    DistInfo,
    JsonlLogger,
    UserError,
    add_config_args,
    add_resume_arg,
    all_reduce_sum,
    atomic_write_text,
    autocast_dtype,
    cleanup_distributed,
    config_to_dict,
    init_distributed,
    load_checkpoint,
    log,
    resolve_resume,
    save_checkpoint,
    save_config,
    seed_everything,
    setup_logging,
)

from .cache import ShardSampler, build_cache, cache_key, pool_features
from .encoder import (
    FrozenEncoder,
    add_encoder_args,
    build_encoder,
    check_unchanged,
    fingerprint,
    load_encoder_config,
    snapshot,
)
from .compare import plot_runs, pooling_label, reference_rows, reference_table
from .heads import ProbeHeads, probe_loss, topk_correct

FORMAT = "crosschannel/probe-v2"  # v2: pooling planned from the tap shapes (heads of v1 do not fit)
PROBE_POOLS = ("avg", "bilinear", "adaptive")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    # encoder: exactly one source (the CLI flags --checkpoint / --random-init / --supervised set these keys)
    checkpoint: str = ""  #: pretext checkpoint
    random_init: str = ""  #: registry model name, randomly initialised (the lower bound)
    supervised: str = ""  #: NAME[:WEIGHTS] (torchvision) or timm:NAME[:WEIGHTS] (the supervised ceiling)
    model_kwargs: dict = dataclasses.field(default_factory=dict)  #: for random_init (e.g. fc_dim: 64)
    label: str = ""  #: name of the run in plots (default: from the encoder)
    # data: root with train_dir/ and val_dir/ (ImageFolder each), or one ImageFolder split by val_fraction
    data: str = ""
    train_dir: str = "train"
    val_dir: str = "val"
    val_fraction: float = 0.0  #: >0: seeded stratified split of a plain ImageFolder
    split_seed: int = 0
    crop: int = 227  #: paper: 227 (random crop for training, centre crop for evaluation)
    resize: int = 256  #: shorter side before cropping
    train_aug: str = "crop"  #: crop (resize + random crop + flip, paper) | rrc | none
    workers: int = 4
    # probe
    taps: list[str] = dataclasses.field(default_factory=lambda: ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"])
    geometry: str = "transfer"  #: transfer (alexnet_cc -> standard AlexNet, pool5 max 3/2) | pretext
    pool: str = "avg"  #: avg (Fig. 7: kernel = stride, below max_dims) | bilinear (released Resize) | adaptive
    max_dims: int = 10000
    head_init: str = "zeros"  #: zeros (released prototxt: Caffe default filler) | normal (std 0.01)
    # optimisation: the released linear test (feature_learning_tests/linear/solver.prototxt): SGD lr 0.01,
    # momentum 0.9, wd 5e-4, x0.1 every 40k of 140k iterations at 4 x 64 = 256 images, i.e. 28 epochs of
    # ImageNet with steps at 8, 16, 24; biases: lr_mult 2, decay_mult 0 (train_val.prototxt)
    epochs: int = 28
    batch_size: int = 256  #: per process
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0
    bias_decay_mult: float = 0.0
    lr_steps: list[int] = dataclasses.field(default_factory=lambda: [8, 16, 24])  #: epochs at which lr *= lr_gamma
    lr_gamma: float = 0.1
    # runtime
    amp: str = "auto"  #: auto | bf16 | fp16 | none (encoder forward only; CUDA only)
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/probe"
    checkpoint_every: int = 1  #: epochs
    eval_every: int = 1  #: epochs (the last epoch is always evaluated)
    cache_features: bool = False  #: extract pooled features once (memory-mapped) and train heads from them
    cache_dir: str = ""  #: default: out_dir/cache
    tensorboard: bool = False
    progress: bool = True


# --------------------------------------------------------------------------------------------- data
def stratified_split(targets: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, a seeded random ``val_fraction`` of the samples (at least one when the class has two)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    targets = np.asarray(targets)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


def build_transforms(cfg: ProbeConfig):
    from torchvision.transforms import v2 as T

    if cfg.resize < cfg.crop:
        raise UserError(f"resize ({cfg.resize}) must be >= crop ({cfg.crop})")
    tail = [T.PILToTensor(), T.ToDtype(torch.float32, scale=True)]
    if cfg.train_aug == "crop":
        train = T.Compose([T.Resize(cfg.resize, antialias=True), T.RandomCrop(cfg.crop), T.RandomHorizontalFlip(), *tail])
    elif cfg.train_aug == "rrc":
        train = T.Compose([T.RandomResizedCrop(cfg.crop, antialias=True), T.RandomHorizontalFlip(), *tail])
    elif cfg.train_aug == "none":
        train = eval_transform(cfg.crop, cfg.resize)
    else:
        raise UserError(f"train_aug must be crop, rrc or none; got '{cfg.train_aug}'")
    return train, eval_transform(cfg.crop, cfg.resize)


class ReadableImageFolder(ImageFolder):
    """ImageFolder that never stops on a bad file: an unreadable image is skipped with a one-line warning naming it,
    and the next readable sample of the folder is used in its place (the epoch keeps its length)."""

    def __getitem__(self, i):
        for j in range(len(self)):
            try:
                return super().__getitem__((i + j) % len(self))
            except UnreadableImage as e:
                warnings.warn(f"skipped {e}")
        raise UserError(f"{self.root}: no readable image")


def get_dataset(cfg: ProbeConfig, train_tf, val_tf):
    """(train, val, class names): ``data/train_dir`` + ``data/val_dir``, or ``data`` split by ``val_fraction``."""
    if not cfg.data:
        raise UserError("no data: set 'data' to an ImageFolder root (with train/ and val/, or use val_fraction)")
    root = Path(cfg.data)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    tr, va = root / cfg.train_dir, root / cfg.val_dir
    # the evaluation transform (and 'crop'/'none' training) resizes the shorter side to cfg.resize first: JPEGs are
    # decoded at the largest draft scale that keeps it at or above cfg.resize; rrc crops anywhere, full decode
    val_load = functools.partial(read_image, min_size=cfg.resize)
    train_load = read_image if cfg.train_aug == "rrc" else val_load
    if cfg.val_fraction <= 0:
        if not (tr.is_dir() and va.is_dir()):
            raise UserError(f"{root}: no {cfg.train_dir}/ and {cfg.val_dir}/ folders; set val_fraction to split one ImageFolder")
        train, val = ReadableImageFolder(str(tr), train_tf, loader=train_load), ReadableImageFolder(str(va), val_tf, loader=val_load)
        if train.classes != val.classes:
            raise UserError(f"{root}: train and val have different classes")
        return train, val, train.classes
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    try:
        full_t, full_v = ReadableImageFolder(str(root), train_tf, loader=train_load), ReadableImageFolder(str(root), val_tf, loader=val_load)
    except FileNotFoundError as e:
        raise UserError(f"{root}: {e}") from None
    ti, vi = stratified_split(full_t.targets, cfg.val_fraction, cfg.split_seed)
    return torch.utils.data.Subset(full_t, ti), torch.utils.data.Subset(full_v, vi), full_t.classes


def _samples(ds) -> list[tuple[str, int]]:
    if isinstance(ds, torch.utils.data.Subset):
        return [ds.dataset.samples[i] for i in ds.indices]
    return list(ds.samples)


# --------------------------------------------------------------------------------------------- train / evaluate
def _batches(encoder, heads, source: Iterable, device, amp_dtype, cached: bool):
    for x, y in source:
        y = y.to(device, non_blocking=True)
        if cached:
            yield {t: v.to(device, non_blocking=True) for t, v in x.items()}, y
        else:
            yield pool_features(encoder, heads.pooler, x.to(device, non_blocking=True), amp_dtype), y


def train_one_epoch(encoder, heads, model, optimizer, source, device, amp_dtype, cached: bool, epoch: int,
                    progress: bool = False) -> dict[str, float]:
    """One epoch over ``source`` (image batches, or pooled-feature batches if ``cached``); ``model`` is ``heads``
    or its DDP wrapper. Returns the mean training loss per tap (this process)."""
    encoder.eval()  # a no-op by construction; kept explicit: BatchNorm statistics of the trunk must not move
    model.train()
    sums: dict[str, float] = {t: 0.0 for t in heads.taps}
    n = 0
    for pooled, y in tqdm(_batches(encoder, heads, source, device, amp_dtype, cached), desc=f"epoch {epoch}",
                          disable=not progress, leave=False, total=len(source) if hasattr(source, "__len__") else None):
        logits = model(pooled)
        loss, per_tap = probe_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for t, v in per_tap.items():
            sums[t] += float(v.detach())
        n += 1
    return {t: s / max(n, 1) for t, s in sums.items()}


@torch.no_grad()
def evaluate(encoder, heads, source, device, amp_dtype, cached: bool, progress: bool = False) -> dict[str, dict]:
    """Top-1 / top-5 (%) and mean loss per tap, summed over all processes."""
    heads.eval()
    taps = heads.taps
    stats = torch.zeros(len(taps), 3, dtype=torch.float64, device=device)  # top1, top5, loss sum
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for pooled, y in tqdm(_batches(encoder, heads, source, device, amp_dtype, cached), desc="eval",
                          disable=not progress, leave=False):
        logits = heads(pooled)
        for i, t in enumerate(taps):
            c1, c5 = topk_correct(logits[t], y)
            loss = torch.nn.functional.cross_entropy(logits[t], y, reduction="sum")
            stats[i] += torch.tensor([c1, c5, float(loss)], dtype=torch.float64, device=device)
        count += len(y)
    all_reduce_sum(stats)
    all_reduce_sum(count)
    n = max(float(count), 1.0)
    return {t: {"top1": 100 * float(stats[i, 0]) / n, "top5": 100 * float(stats[i, 1]) / n,
                "loss": float(stats[i, 2]) / n, "n": int(count)} for i, t in enumerate(taps)}


# --------------------------------------------------------------------------------------------- outputs
def write_results(out_dir: Path, results: dict) -> None:
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    lines = [f"# Linear probe: {results['label']}", "",
             f"{results['num_classes']} classes, {results['num_train']} train / {results['num_val']} val images, "
             f"{results['epochs']} epochs, {results.get('geometry', 'pretext')} geometry, pool {results['pool']}, "
             f"max_dims {results['max_dims']}", "",
             "| tap | activation | pooling | pooled (h x w x C) | dims | top-1 | top-5 |", "|---|---|---|---|---|---|---|"]
    for r in results["taps"]:
        c, h, w = r["pooled_shape"]
        lines.append(f"| {r['tap']} | {'x'.join(map(str, r['shape']))} | {pooling_label(r['pooling'])} | {h}x{w}x{c} "
                     f"| {r['dims']} | {r['top1']:.2f} | {r['top5']:.2f} |")
    lines += ["", reference_table(results.get("num_classes"))]
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    plot_runs([results], out_dir / "accuracy_per_layer.png", metric="top1", references=reference_rows())


def checkpoint_path(cfg: ProbeConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoint.pth"


# --------------------------------------------------------------------------------------------- main
def main(args) -> int:
    cfg = load_encoder_config(ProbeConfig, args)
    dist_info, device = init_distributed(cfg.device)
    try:
        return _run(cfg, args.resume, dist_info, device)
    finally:
        cleanup_distributed()


def _run(cfg: ProbeConfig, resume: Optional[str], dist_info: DistInfo, device: torch.device) -> int:
    out_dir = Path(cfg.out_dir)
    setup_logging(out_dir if dist_info.is_main else None, dist_info.is_main)
    resume = resolve_resume(resume, checkpoint_path(cfg))
    if cfg.pool not in PROBE_POOLS:
        raise UserError(f"pool must be one of {PROBE_POOLS}, got '{cfg.pool}'")
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
    seed_everything(cfg.seed)

    encoder, spec = build_encoder(list(cfg.taps) or None, cfg.checkpoint or None, cfg.random_init or None,
                                  cfg.supervised or None, dict(cfg.model_kwargs), cfg.seed, cfg.geometry)
    encoder.to(device)
    shapes = encoder.tap_shapes(cfg.crop)
    train_tf, val_tf = build_transforms(cfg)
    if cfg.cache_features:
        train_tf = val_tf
    train_ds, val_ds, classes = get_dataset(cfg, train_tf, val_tf)
    try:
        heads = ProbeHeads(shapes, len(classes), cfg.pool, cfg.max_dims, cfg.seed, cfg.head_init).to(device)
    except ValueError as e:
        raise UserError(str(e)) from None
    enc_fp = fingerprint(encoder)
    before = snapshot(encoder)
    log.info("encoder: %s [%s], input %s, %d classes, %d train / %d val images, device %s, world %d",
             spec.label, enc_fp, encoder.input_mode, len(classes), len(train_ds), len(val_ds), device, dist_info.world_size)
    pooling = heads.pooler.describe()
    for t in heads.taps:
        c, h, w = pooling[t]["out"]
        log.info("  tap %-8s %-14s %-22s -> %dx%dx%d = %d dims", t, "x".join(map(str, shapes[t])),
                 pooling_label(pooling[t]), h, w, c, heads.dims[t])

    optimizer = torch.optim.SGD(heads.param_groups(cfg.lr, cfg.weight_decay, cfg.bias_lr_mult, cfg.bias_decay_mult),
                                lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)
    start_epoch, history = 0, []
    if resume:
        ckpt = load_checkpoint(resume)
        if ckpt.get("format") != FORMAT:
            raise UserError(f"{resume}: not a crosschannel probe checkpoint")
        if ckpt["encoder_fingerprint"] != enc_fp:
            raise UserError(f"{resume}: was trained on a different encoder ({ckpt['encoder_fingerprint']} != {enc_fp})")
        heads.load_state_dict(ckpt["heads"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        log.info("resumed from %s at epoch %d", resume, start_epoch)
    model = heads
    if dist_info.enabled:  # DDP wraps only the heads: the encoder has no trainable parameters
        model = torch.nn.parallel.DistributedDataParallel(heads, device_ids=[device.index] if device.type == "cuda" else None)

    amp_dtype = autocast_dtype(cfg.amp, device)
    progress = cfg.progress and dist_info.is_main
    rank, world = dist_info.rank, dist_info.world_size
    train_cache = val_cache = None
    if cfg.cache_features:
        cache_dir = Path(cfg.cache_dir or out_dir / "cache")
        common = dict(encoder=enc_fp, taps=heads.taps, pooling=pooling, crop=cfg.crop, resize=cfg.resize)
        train_cache, val_cache = (
            build_cache(cache_dir / name, cache_key(samples=_samples(ds), **common), encoder, heads.pooler, ds, cfg.batch_size,
                        cfg.workers, device, amp_dtype, rank, world, progress)
            for name, ds in (("train", train_ds), ("val", val_ds)))
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size, sampler=ShardSampler(len(val_ds), rank, world),
                                             num_workers=cfg.workers, pin_memory=device.type == "cuda")

    def validate() -> dict:
        source = val_cache.batches(range(rank, len(val_cache), world), cfg.batch_size) if val_cache else val_loader
        return evaluate(encoder, heads, source, device, amp_dtype, cfg.cache_features, progress)

    logger = JsonlLogger(out_dir / "log.jsonl", enabled=dist_info.is_main)
    writer = None
    if cfg.tensorboard and dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    sampler = torch.utils.data.DistributedSampler(range(len(train_ds)), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg.seed)
    if len(sampler) < max(cfg.batch_size, 2):
        raise UserError(f"{len(train_ds)} training images is fewer than one batch of {cfg.batch_size} per process")
    metrics = history[-1]["val"] if history and "val" in history[-1] else None
    for epoch in range(start_epoch, cfg.epochs):
        # augmentation and order are functions of (seed, epoch, rank): a resumed run equals an uninterrupted one
        seed_everything(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        sampler.set_epoch(epoch)
        if cfg.cache_features:
            idx = list(sampler)
            idx = idx[: len(idx) // cfg.batch_size * cfg.batch_size]
            source = list(train_cache.batches(idx, cfg.batch_size)) if len(idx) * sum(heads.dims.values()) < 2**27 \
                else train_cache.batches(idx, cfg.batch_size)
        else:
            source = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                                 num_workers=cfg.workers, pin_memory=device.type == "cuda")
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(encoder, heads, model, optimizer, source, device, amp_dtype, cfg.cache_features,
                                     epoch, progress)
        scheduler.step()
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            metrics = validate()
            record["val"] = metrics
            log.info("epoch %d/%d lr %.2g  top-1: %s", epoch + 1, cfg.epochs, lr,
                     "  ".join(f"{t} {m['top1']:.1f}" for t, m in metrics.items()))
        history.append(record)
        logger.log(**record)
        if writer is not None:
            for t, v in train_loss.items():
                writer.add_scalar(f"train_loss/{t}", v, epoch + 1)
            for t, m in (record.get("val") or {}).items():
                writer.add_scalar(f"val_top1/{t}", m["top1"], epoch + 1)
                writer.add_scalar(f"val_top5/{t}", m["top5"], epoch + 1)
        if dist_info.is_main and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
            save_checkpoint({"format": FORMAT, "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                             "encoder": dataclasses.asdict(spec), "encoder_fingerprint": enc_fp, "classes": classes,
                             "dims": heads.dims, "config": config_to_dict(cfg)}, checkpoint_path(cfg))
    if writer is not None:
        writer.close()

    check_unchanged(encoder, before)  # MoCo's sanity check: the frozen trunk must be bit-identical
    log.info("sanity check passed: encoder parameters and buffers are bit-identical to the start")
    if metrics is None:  # resumed a finished run without evaluation records
        metrics = validate()
    if dist_info.is_main:
        results = {
            "label": cfg.label or spec.label, "encoder": dataclasses.asdict(spec), "encoder_fingerprint": enc_fp,
            "classes": classes, "num_classes": len(classes), "num_train": len(train_ds), "num_val": len(val_ds),
            "epochs": cfg.epochs, "geometry": spec.extra.get("geometry", "pretext"), "pool": cfg.pool,
            "max_dims": cfg.max_dims, "crop": cfg.crop, "cache_features": cfg.cache_features, "world_size": world,
            "taps": [{"tap": t, "shape": list(shapes[t]), "pooled_shape": pooling[t]["out"], "pooling": pooling[t],
                      "dims": heads.dims[t], "top1": metrics[t]["top1"], "top5": metrics[t]["top5"],
                      "loss": metrics[t]["loss"]} for t in heads.taps],
        }
        write_results(out_dir, results)
        log.info("results: %s", out_dir / "results.md")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("linear_probe.train", description="Per-layer linear probes on a frozen encoder.")
    add_config_args(p)
    add_encoder_args(p)
    add_resume_arg(p)
    return p


if __name__ == "__main__":
    import sys

    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
