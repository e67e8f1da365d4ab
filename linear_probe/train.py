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

Robustness (issue 11): every config value has declared limits, checked with the data, encoder and heads before
``out_dir`` is created; one run per ``out_dir`` (``pretext.runtime.RunLock``: a second run gets one line naming the
holder); SIGTERM, SIGINT and SIGUSR1 finish the current step, all ranks agree, a checkpoint is written (mid-epoch:
the step is stored, and augmentation is seeded per (seed, epoch, sample), so the resumed run equals an uninterrupted
one) and the process exits 128 + signal with a line giving the command that continues; ``--resume OTHER.pth`` into a
folder with its own checkpoint needs ``--force``; config changes on resume (data, model, taps, pooling, batch, solver)
need ``--allow-config-change`` and are recorded in ``config_history.jsonl``; on resume ``log.jsonl`` is cut back to
the checkpoint's epoch (a torn last line goes too) and stale ``.*.tmp`` files are removed. An unreadable validation
image is left out and counted (``num_val`` is the number evaluated; ``skipped_unreadable_val`` names the others).
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import json
import shlex
import sys
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
    GracefulStop,
    JsonlLogger,
    RunLock,
    UserError,
    add_config_args,
    add_resume_arg,
    all_gather_objects,
    all_reduce_sum,
    any_process,
    atomic_write_text,
    autocast_dtype,
    check_resume_config,
    cleanup_distributed,
    config_to_dict,
    ignore_stop_signals,
    init_distributed,
    load_checkpoint,
    log,
    param,
    remove_stale_tmp,
    resolve_resume,
    save_checkpoint,
    save_config,
    seed_everything,
    setup_logging,
    truncate_jsonl,
)

from .cache import Indexed, ShardSampler, build_cache, cache_key, pool_features
from .encoder import (
    GEOMETRIES,
    FrozenEncoder,
    check_encoder_source,
    add_encoder_args,
    build_encoder,
    check_unchanged,
    fingerprint,
    load_encoder_config,
    snapshot,
)
from .compare import plot_runs, pooling_label, reference_rows, reference_table
from .heads import HEAD_INITS, ProbeHeads, probe_loss, topk_correct

FORMAT = "crosschannel/probe-v2"  # v2: pooling planned from the tap shapes (heads of v1 do not fit)
PROBE_POOLS = ("avg", "bilinear", "adaptive")


AMP_MODES = ("auto", "bf16", "bfloat16", "fp16", "float16", "none", "off", "fp32")
# keys whose change on resume makes it another experiment (refused without --allow-config-change)
GUARDED = ("checkpoint", "random_init", "supervised", "model_kwargs", "data", "train_dir", "val_dir", "val_fraction",
           "split_seed", "crop", "resize", "train_aug", "taps", "geometry", "pool", "max_dims", "head_init",
           "batch_size", "lr", "momentum", "nesterov", "weight_decay", "bias_lr_mult", "bias_decay_mult", "lr_steps",
           "lr_gamma", "seed", "cache_features")


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
    val_fraction: float = param(0.0, ge=0, lt=1)  #: >0: seeded stratified split of a plain ImageFolder
    split_seed: int = param(0, ge=0, lt=2**32)
    crop: int = param(227, ge=16, le=2048)  #: paper: 227 (random crop for training, centre crop for evaluation)
    resize: int = param(256, ge=16, le=4096)  #: shorter side before cropping
    train_aug: str = param("crop", choices=("crop", "rrc", "none"))  #: crop (resize + random crop + flip, paper) | rrc | none
    workers: int = param(4, ge=0, le=256)
    # probe
    taps: list[str] = dataclasses.field(default_factory=lambda: ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"])
    geometry: str = param("transfer", choices=GEOMETRIES)  #: transfer (alexnet_cc -> standard AlexNet, pool5 max 3/2) | pretext
    pool: str = param("avg", choices=PROBE_POOLS)  #: avg (Fig. 7: kernel = stride, below max_dims) | bilinear (released Resize) | adaptive
    max_dims: int = param(10000, ge=1, le=1_000_000)
    head_init: str = param("zeros", choices=HEAD_INITS)  #: zeros (released prototxt: Caffe default filler) | normal (std 0.01)
    # optimisation: the released linear test (feature_learning_tests/linear/solver.prototxt): SGD lr 0.01,
    # momentum 0.9, wd 5e-4, x0.1 every 40k of 140k iterations at 4 x 64 = 256 images, i.e. 28 epochs of
    # ImageNet with steps at 8, 16, 24; biases: lr_mult 2, decay_mult 0 (train_val.prototxt)
    epochs: int = param(28, ge=1, le=100_000)
    batch_size: int = param(256, ge=2, le=65536)  #: per process (BatchNorm heads need two samples)
    lr: float = param(0.01, gt=0, le=1000)
    momentum: float = param(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = param(5e-4, ge=0, le=1)
    bias_lr_mult: float = param(2.0, ge=0, le=1000)
    bias_decay_mult: float = param(0.0, ge=0, le=1000)
    lr_steps: list[int] = param(default_factory=lambda: [8, 16, 24], ge=1)  #: epochs at which lr *= lr_gamma
    lr_gamma: float = param(0.1, gt=0, le=1)
    # runtime
    amp: str = param("auto", choices=AMP_MODES)  #: auto | bf16 | fp16 | none (encoder forward only; CUDA only)
    device: str = "auto"  #: auto | cpu | mps | cuda | cuda:N
    seed: int = param(0, ge=0, lt=2**32)
    out_dir: str = "runs/probe"
    checkpoint_every: int = param(1, ge=1)  #: epochs (a stop signal also writes one, mid-epoch)
    eval_every: int = param(1, ge=1)  #: epochs (the last epoch is always evaluated)
    cache_features: bool = False  #: extract pooled features once (memory-mapped) and train heads from them
    cache_dir: str = ""  #: default: out_dir/cache
    tensorboard: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Combinations and free-form values, checked before anything is created or allocated."""
        check_encoder_source(self)
        if self.resize < self.crop:
            raise UserError(f"config keys 'resize' ({self.resize}) and 'crop' ({self.crop}): resize must be >= crop")
        if not self.out_dir:
            raise UserError("config key 'out_dir': give a folder")
        if len(set(self.taps)) != len(self.taps):
            raise UserError(f"config key 'taps': a tap is named twice in {list(self.taps)}")
        if list(self.lr_steps) != sorted(set(self.lr_steps)):
            raise UserError(f"config key 'lr_steps': epochs in increasing order, got {list(self.lr_steps)}")


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
    """ImageFolder that never stops on a bad file: an unreadable image is skipped with a one-line warning naming it.

    Training (``skip_shape`` None): the next readable sample of the folder (of ``split``, the training indices,
    when one folder is split) is used in its place (the epoch keeps its length). Evaluation (``skip_shape`` = the transformed image's shape): a zero image with label -1 comes back,
    which :func:`evaluate` leaves out of every count, so the reported number of validation images is the true one.
    A class folder without any image is one line naming it (torchvision raises a FileNotFoundError)."""

    def __init__(self, root: str, transform, loader, skip_shape: tuple[int, ...] | None = None,
                 split: list[int] | None = None):
        try:
            super().__init__(root, transform, loader=loader)
        except FileNotFoundError as e:
            msg = str(e).split(". Supported")[0]
            hint = " (every class folder needs at least one image: remove the empty one)" if "no valid file" in msg else ""
            raise UserError(f"{root}: {msg}{hint}") from None
        self.skip_shape = skip_shape
        self.split = sorted(split) if split is not None else None  # replacements come from this split only

    def __getitem__(self, i):
        if self.skip_shape is not None:
            try:
                return super().__getitem__(i)
            except UnreadableImage as e:
                warnings.warn(f"skipped {e}")
                return torch.zeros(self.skip_shape), -1
        pool = self.split if self.split is not None else range(len(self))
        start = bisect.bisect_left(pool, i)
        for j in range(len(pool)):
            try:
                return super().__getitem__(pool[(start + j) % len(pool)])
            except UnreadableImage as e:
                warnings.warn(f"skipped {e}")
        raise UserError(f"{self.root}: no readable image")


class SeededSamples(torch.utils.data.Dataset):
    """The training split with augmentation seeded per (seed, epoch, sample): the crops and flips of a sample do not
    depend on the loader workers nor on where the epoch started, so a run resumed mid-epoch equals an uninterrupted
    one."""

    def __init__(self, ds, seed: int, epoch: int = 0):
        self.ds, self.seed, self.epoch = ds, seed, epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)) % 2**63)
        return self.ds[i]


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
    skip = (3, cfg.crop, cfg.crop)
    if cfg.val_fraction <= 0:
        if not (tr.is_dir() and va.is_dir()):
            raise UserError(f"{root}: no {cfg.train_dir}/ and {cfg.val_dir}/ folders; set val_fraction to split one ImageFolder")
        train = ReadableImageFolder(str(tr), train_tf, loader=train_load)
        val = ReadableImageFolder(str(va), val_tf, loader=val_load, skip_shape=skip)
        if train.classes != val.classes:
            raise UserError(f"{root}: train and val have different classes")
        return train, val, train.classes
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    full_t = ReadableImageFolder(str(root), train_tf, loader=train_load)
    full_v = ReadableImageFolder(str(root), val_tf, loader=val_load, skip_shape=skip)
    ti, vi = stratified_split(full_t.targets, cfg.val_fraction, cfg.split_seed)
    full_t.split = ti  # an unreadable training image is replaced by another training image, never a validation one
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
                    progress: bool = False, stop: GracefulStop | None = None, partial: dict | None = None
                    ) -> tuple[dict[str, float], dict | None]:
    """One epoch over ``source`` (image batches, or pooled-feature batches if ``cached``); ``model`` is ``heads``
    or its DDP wrapper. Returns the mean training loss per tap (this process) and None, or, when a stop signal
    arrived (all ranks agree, after the step), the partial state to checkpoint: ``{"steps", "sums"}``.
    ``partial``: such a state to continue from (``source`` then holds only the remaining batches)."""
    encoder.eval()  # a no-op by construction; kept explicit: BatchNorm statistics of the trunk must not move
    model.train()
    sums: dict[str, float] = {t: 0.0 for t in heads.taps}
    n = 0
    if partial:
        sums.update(partial["sums"])
        n = partial["steps"]
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
        if stop is not None and any_process([stop.requested], device)[0]:
            return {t: s / max(n, 1) for t, s in sums.items()}, {"steps": n, "sums": sums}
    return {t: s / max(n, 1) for t, s in sums.items()}, None


@torch.no_grad()
def evaluate(encoder, heads, source, device, amp_dtype, cached: bool, progress: bool = False
             ) -> tuple[dict[str, dict], list[int]]:
    """Top-1 / top-5 (%) and mean loss per tap, summed over all processes, and the dataset indices of the samples
    left out (label -1: unreadable images, see :class:`ReadableImageFolder`; known when the source gives (x, y,
    index) batches). Every tap's ``n`` is the number of images evaluated."""
    heads.eval()
    taps = heads.taps
    stats = torch.zeros(len(taps), 3, dtype=torch.float64, device=device)  # top1, top5, loss sum
    count = torch.zeros(1, dtype=torch.float64, device=device)
    skipped: list[int] = []
    for batch in tqdm(source, desc="eval", disable=not progress, leave=False):
        x, y = batch[0], batch[1]
        keep = y >= 0
        if not bool(keep.all()):
            if len(batch) > 2:
                skipped += batch[2][~keep].tolist()
            if not bool(keep.any()):
                continue
            x = {t: v[keep] for t, v in x.items()} if cached else x[keep]
            y = y[keep]
        (pooled, y), = _batches(encoder, heads, [(x, y)], device, amp_dtype, cached)
        logits = heads(pooled)
        for i, t in enumerate(taps):
            c1, c5 = topk_correct(logits[t], y)
            loss = torch.nn.functional.cross_entropy(logits[t], y, reduction="sum")
            stats[i] += torch.tensor([c1, c5, float(loss)], dtype=torch.float64, device=device)
        count += len(y)
    all_reduce_sum(stats)
    all_reduce_sum(count)
    skipped = sorted(i for part in all_gather_objects(skipped) for i in part)
    n = max(float(count), 1.0)
    return {t: {"top1": 100 * float(stats[i, 0]) / n, "top5": 100 * float(stats[i, 1]) / n,
                "loss": float(stats[i, 2]) / n, "n": int(count)} for i, t in enumerate(taps)}, skipped


# --------------------------------------------------------------------------------------------- outputs
def write_results(out_dir: Path, results: dict) -> None:
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    bad = results.get("skipped_unreadable_val") or []
    skipped = f" ({len(bad)} unreadable val image(s) skipped: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})" \
        if bad else ""
    lines = [f"# Linear probe: {results['label']}", "",
             f"{results['num_classes']} classes, {results['num_train']} train / {results['num_val']} val images{skipped}, "
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


def load_probe_checkpoint(path: str | Path, enc_fp: str) -> dict:
    """A probe checkpoint of this encoder, or one line saying what the file is instead."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != FORMAT:
        what = ckpt.get("format") or ("a pretext checkpoint" if "model_name" in ckpt else "another kind of file")
        raise UserError(f"{path}: not a linear probe checkpoint ({what}); --resume takes a probe run's checkpoint.pth")
    if ckpt.get("encoder_fingerprint") != enc_fp:
        raise UserError(f"{path}: was trained on a different encoder ({ckpt.get('encoder_fingerprint')} != {enc_fp})")
    return ckpt


def resume_command(argv: list[str] | None = None) -> str:
    """The command that continues this run: the same arguments, ``--resume`` (out_dir's own checkpoint)."""
    argv = list(sys.argv if argv is None else argv)
    args, i = [], 1
    while i < len(argv):
        a = argv[i]
        if a == "--resume":
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if not (a.startswith("--resume=") or a == "--force"):
            args.append(a)
        i += 1
    prog = "crosschannel" if Path(argv[0]).name in ("cli.py", "crosschannel", "__main__.py") else "python -m linear_probe.train"
    return f"{prog} {shlex.join(args)} --resume"


def main(args) -> int:
    cfg = load_encoder_config(ProbeConfig, args)
    dist_info, device = init_distributed(cfg.device)
    try:
        return _run(cfg, args.resume, dist_info, device, getattr(args, "force", False),
                    getattr(args, "allow_config_change", False))
    finally:
        cleanup_distributed()


def _open_run(cfg: ProbeConfig, resume: Optional[str], force: bool, allow_change: bool, enc_fp: str,
              dist_info: DistInfo, device: torch.device) -> tuple[RunLock | None, dict | None, str | None]:
    """Take the run folder (main process: lock, stale temporary files removed, log file), resolve ``--resume`` and
    check its checkpoint (a probe checkpoint of this encoder, config unchanged or ``--allow-config-change``:
    recorded in config_history.jsonl), and cut log.jsonl back to the checkpoint. All ranks agree on a refusal."""
    out_dir = Path(cfg.out_dir)
    lock = ckpt = path = error = None
    try:
        if resume not in (None, "auto"):  # a wrong file is refused before the run folder is created
            load_probe_checkpoint(resume, enc_fp)
        if dist_info.is_main:
            lock = RunLock(out_dir).acquire()
            remove_stale_tmp(out_dir)
            setup_logging(out_dir, True)
        path = resolve_resume(resume, checkpoint_path(cfg), force)
        if path:
            ckpt = load_probe_checkpoint(path, enc_fp)
            if dist_info.is_main:
                check_resume_config(ckpt["config"], config_to_dict(cfg), GUARDED, allow_change, out_dir, ckpt["epoch"])
    except UserError as e:
        error = e
    if any_process([error is not None], device)[0]:
        if lock is not None:
            lock.release()
        raise error or UserError(f"{out_dir}: refused by the main process (see its error)")
    if dist_info.is_main:
        # records of epochs after the checkpoint are redone (a fresh start: all of them); a torn last line goes too
        dropped = truncate_jsonl(out_dir / "log.jsonl", ckpt["epoch"] if ckpt else 0, key="epoch")
        if dropped:
            log.info("log.jsonl: dropped %d record(s) after the checkpoint's epoch", dropped)
    return lock, ckpt, path


def _run(cfg: ProbeConfig, resume: Optional[str], dist_info: DistInfo, device: torch.device, force: bool = False,
         allow_change: bool = False) -> int:
    out_dir = Path(cfg.out_dir)
    setup_logging(None, dist_info.is_main)
    seed_everything(cfg.seed)
    # everything that can be refused is checked before the run folder is created
    encoder, spec = build_encoder(list(cfg.taps) or None, cfg.checkpoint or None, cfg.random_init or None,
                                  cfg.supervised or None, dict(cfg.model_kwargs), cfg.seed, cfg.geometry)
    try:
        shapes = encoder.tap_shapes(cfg.crop)
    except RuntimeError as e:
        raise UserError(f"crop {cfg.crop} is too small for the taps of {spec.name} ({str(e).splitlines()[0][:160]})") from None
    encoder.to(device)
    train_tf, val_tf = build_transforms(cfg)
    if cfg.cache_features:
        train_tf = val_tf
    train_ds, val_ds, classes = get_dataset(cfg, train_tf, val_tf)
    try:
        heads = ProbeHeads(shapes, len(classes), cfg.pool, cfg.max_dims, cfg.seed, cfg.head_init).to(device)
    except ValueError as e:
        raise UserError(str(e)) from None
    world = dist_info.world_size
    if len(train_ds) // world < max(cfg.batch_size, 2):
        raise UserError(f"{len(train_ds)} training images is fewer than one batch of {cfg.batch_size} per process")
    enc_fp = fingerprint(encoder)
    lock, ckpt, resume = _open_run(cfg, resume, force, allow_change, enc_fp, dist_info, device)
    try:
        return _train(cfg, ckpt, resume, dist_info, device, encoder, spec, shapes, heads, enc_fp,
                      train_ds, val_ds, classes)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: ProbeConfig, ckpt: dict | None, resume: str | None, dist_info: DistInfo, device: torch.device,
           encoder: FrozenEncoder, spec, shapes: dict, heads: ProbeHeads, enc_fp: str, train_ds, val_ds,
           classes: list[str]) -> int:
    out_dir = Path(cfg.out_dir)
    if dist_info.is_main:
        save_config(cfg, out_dir)
    before = snapshot(encoder)
    log.info("encoder: %s [%s], input %s, %d classes, %d train / %d val images listed, device %s, world %d",
             spec.label, enc_fp, encoder.input_mode, len(classes), len(train_ds), len(val_ds), device, dist_info.world_size)
    pooling = heads.pooler.describe()
    for t in heads.taps:
        c, h, w = pooling[t]["out"]
        log.info("  tap %-8s %-14s %-22s -> %dx%dx%d = %d dims", t, "x".join(map(str, shapes[t])),
                 pooling_label(pooling[t]), h, w, c, heads.dims[t])

    optimizer = torch.optim.SGD(heads.param_groups(cfg.lr, cfg.weight_decay, cfg.bias_lr_mult, cfg.bias_decay_mult),
                                lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)
    start_epoch, history, partial = 0, [], None
    if ckpt is not None:
        heads.load_state_dict(ckpt["heads"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, partial = ckpt["epoch"], ckpt["history"], ckpt.get("partial")
        where = f"epoch {start_epoch}" + (f" + {partial['steps']} step(s)" if partial else "")
        log.info("resumed from %s at %s", resume, where)
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
    val_loader = torch.utils.data.DataLoader(Indexed(val_ds), batch_size=cfg.batch_size,
                                             sampler=ShardSampler(len(val_ds), rank, world), num_workers=cfg.workers,
                                             pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    val_names = [p for p, _ in _samples(val_ds)]

    def validate() -> tuple[dict, list[str]]:
        source = val_cache.batches(range(rank, len(val_cache), world), cfg.batch_size) if val_cache else val_loader
        metrics, bad = evaluate(encoder, heads, source, device, amp_dtype, cfg.cache_features, progress)
        if val_cache is not None:  # a cached unreadable image has label -1
            bad = np.flatnonzero(np.asarray(val_cache.labels) < 0).tolist()
        bad = [val_names[i] for i in bad]
        if bad:
            log.warning("validation: %d of %d images unreadable, left out of every count: %s", len(bad), len(val_names),
                        ", ".join(bad[:20]) + (", ..." if len(bad) > 20 else ""))
        return metrics, bad

    logger = JsonlLogger(out_dir / "log.jsonl", enabled=dist_info.is_main)
    writer = None
    if cfg.tensorboard and dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    sampler = torch.utils.data.DistributedSampler(range(len(train_ds)), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg.seed)
    seeded = SeededSamples(train_ds, cfg.seed)
    metrics = history[-1]["val"] if history and "val" in history[-1] else None
    bad_val: list[str] | None = None

    def save(epoch_done: int, part: dict | None = None) -> None:
        if dist_info.is_main:
            save_checkpoint({"format": FORMAT, "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch_done, "partial": part,
                             "history": history, "encoder": dataclasses.asdict(spec), "encoder_fingerprint": enc_fp,
                             "classes": classes, "dims": heads.dims, "config": config_to_dict(cfg)}, checkpoint_path(cfg))

    def stopped(stop: GracefulStop, where: str) -> int:
        if dist_info.is_main:
            cmd = resume_command()
            if dist_info.enabled:
                cmd = cmd.replace("python -m", f"torchrun --nproc_per_node={world} -m", 1)
            log.warning("%s received: stopped %s, checkpoint %s; continue with: %s",
                        stop.name or "a stop signal (on another process)", where, checkpoint_path(cfg), cmd)
        if writer is not None:
            writer.close()
        return stop.exit_code  # 0 on a rank that only followed the others

    with GracefulStop() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            # order: a function of (seed, epoch, rank); augmentation: of (seed, epoch, sample) (SeededSamples), so
            # a run resumed at an epoch boundary or mid-epoch (stop signal) equals an uninterrupted one
            seed_everything(cfg.seed * 1_000_003 + epoch * 1009 + rank)
            sampler.set_epoch(epoch)
            seeded.epoch = epoch
            idx = list(sampler)
            done = partial["steps"] if partial and partial.get("epoch") == epoch else 0
            idx = idx[done * cfg.batch_size:]
            if cfg.cache_features:
                idx = idx[: len(idx) // cfg.batch_size * cfg.batch_size]
                source = list(train_cache.batches(idx, cfg.batch_size)) if len(idx) * sum(heads.dims.values()) < 2**27 \
                    else train_cache.batches(idx, cfg.batch_size)
            else:
                source = torch.utils.data.DataLoader(seeded, batch_size=cfg.batch_size, sampler=idx, drop_last=True,
                                                     num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                                     worker_init_fn=ignore_stop_signals)
            lr = optimizer.param_groups[0]["lr"]
            train_loss, part = train_one_epoch(encoder, heads, model, optimizer, source, device, amp_dtype,
                                               cfg.cache_features, epoch, progress, stop, partial if done else None)
            partial = None
            if part is not None:
                save(epoch, dict(part, epoch=epoch))
                return stopped(stop, f"in epoch {epoch + 1} after step {part['steps']}")
            scheduler.step()
            record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics, bad_val = validate()
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
            stopping = any_process([stop.requested], device)[0] and epoch + 1 < cfg.epochs
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or stopping:
                save(epoch + 1)
            if stopping:
                return stopped(stop, f"after epoch {epoch + 1}")
    if writer is not None:
        writer.close()

    check_unchanged(encoder, before)  # MoCo's sanity check: the frozen trunk must be bit-identical
    log.info("sanity check passed: encoder parameters and buffers are bit-identical to the start")
    if metrics is None or bad_val is None:  # resumed a finished run, or the last evaluation was before the resume
        metrics, bad_val = validate()
    if dist_info.is_main:
        num_val = next(iter(metrics.values()))["n"]
        results = {
            "label": cfg.label or spec.label, "encoder": dataclasses.asdict(spec), "encoder_fingerprint": enc_fp,
            "classes": classes, "num_classes": len(classes), "num_train": len(train_ds), "num_val": num_val,
            "skipped_unreadable_val": bad_val,
            "epochs": cfg.epochs, "geometry": spec.extra.get("geometry", "pretext"), "pool": cfg.pool,
            "max_dims": cfg.max_dims, "crop": cfg.crop, "cache_features": cfg.cache_features, "world_size": world,
            "taps": [{"tap": t, "shape": list(shapes[t]), "pooled_shape": pooling[t]["out"], "pooling": pooling[t],
                      "dims": heads.dims[t], "top1": metrics[t]["top1"], "top5": metrics[t]["top5"],
                      "loss": metrics[t]["loss"]} for t in heads.taps],
        }
        write_results(out_dir, results)
        log.info("results: %s (%d val images evaluated%s)", out_dir / "results.md", num_val,
                 f", {len(bad_val)} unreadable skipped" if bad_val else "")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("linear_probe.train", description="Per-layer linear probes on a frozen encoder.")
    add_config_args(p)
    add_encoder_args(p)
    add_resume_arg(p)
    return p


if __name__ == "__main__":
    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
