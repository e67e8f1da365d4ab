"""Pretrain a backbone by colorization (Zhang et al. 2016; Larsson et al. 2016).

    python -m pretext.train --config configs/pretext/zhang_vgg_rebal_in1k_176px.yaml [--set key=value ...]
    torchrun --nproc_per_node=8 -m pretext.train --config ... [--resume]

The network sees L only; Lab conversion and soft-encoding run on the training device, batched. What the network
predicts and how it is scored is its target (``pretext.targets``); ``train_one_epoch`` calls ``train_step`` (forward
and backward of one batch) and steps the optimiser. The defaults are Zhang et al.'s released VGG recipe; every value
and its source is listed in PROVENANCE.md. Checkpoints are written atomically every ``checkpoint_every`` steps and
``--resume`` continues exactly (same weights as an uninterrupted run): data order and augmentation are functions of
(seed, epoch, position), and every RNG is saved.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import models
from .color import gray_rgb, rgb_to_lab
from .data import (ImageDataset, TrainCrops, batch_to_device, eval_transform, first_usable, list_images,
                   resolve_decode)
from .encoding import subsample_ab
from .predict import colorize_rgb
from .targets import TARGETS, Target
from .runtime import (
    DistInfo,
    JsonlLogger,
    UserError,
    add_config_args,
    add_resume_arg,
    all_gather_objects,
    all_reduce_sum,
    any_process,
    autocast_dtype,
    barrier,
    cleanup_distributed,
    config_from_args,
    get_rng_state,
    init_distributed,
    load_checkpoint,
    log,
    resolve_resume,
    save_checkpoint,
    save_config,
    seed_everything,
    set_rng_state,
    setup_logging,
)

FORMAT = "crosschannel/pretext-v1"


@dataclasses.dataclass(frozen=True)
class PretextConfig:
    """Defaults: Zhang et al.'s VGG net as released (richzhang/colorization: models/colorization_train_val_v2.prototxt,
    train/solver.prototxt, resources/caffe_traininglayers.py); PROVENANCE.md names the source of each."""
    # data
    data: list[str] = dataclasses.field(default_factory=list)  #: folders / list files / globs of training images
    val_data: list[str] = dataclasses.field(default_factory=list)  #: held-out images for the sample grids
    size: int = 176  #: training crop (released: 176 for the VGG net, 180 for the AlexNet)
    crop: str = "resize_crop"  #: resize_crop (resize then random crop, as released) | rrc (RandomResizedCrop)
    crop_scale_min: float = 0.25  #: rrc only
    workers: int = 4
    decode: str = "cpu"  #: cpu (loader workers, JPEG draft decoding) | gpu (nvjpeg on the device; else cpu, warned)
    max_images: int = 0  #: use at most this many training images (0: all)
    # model and target
    model: str = "zhang_vgg"  #: zhang_vgg | alexnet_cc | vgg16_hypercolumn | timm:<name>
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    loss: str = "rebal"  #: rebal (classification, class-rebalanced) | ce (no rebalancing) | l2 (regression) | hue_chroma
    loss_norm: str = "batch"  #: batch (sum over pixels / images, as released) | pixel (mean over counted pixels)
    prior: str = ""  #: prior.npz from `crosschannel prior` (needed for rebal)
    lam: float = 0.5  #: rebalancing: weight of the uniform distribution
    rebalance_mode: str = "reference"  #: reference (the released PriorFactor) | paper (uniform over all Q bins)
    k: int = 10  #: soft-encoding neighbours (released NNEncLayer: 10; the paper's text: 5)
    sigma: float = 5.0
    target_sampling: str = "point"  #: point (every target_stride-th pixel, as released) | area (cell averages)
    grey_thresh: float = 5.0  #: an image counts if some target |a| or |b| exceeds this (NonGrayMaskLayer)
    points_per_image: int = 0  #: >0: train on P random pixels per image (Larsson's sparse hypercolumns)
    points_margin: int = 0  #: points are drawn from the central window [margin, size - margin) (Larsson: 96 of 352)
    temperature: float = 0.38  #: annealed mean for logged predictions
    init: str = "kmeans"  #: kmeans | pca | gaussian | default (data-dependent init at step 0; default: PyTorch's)
    init_images: int = 0  #: images in the initialisation batch (0: batch_size)
    # optimisation (train/solver.prototxt: Adam 0.9/0.99, wd 1e-3, lr 3.16e-5 x0.316 every 215k, 500k iterations)
    optimizer: str = "adam"  #: adam | adamw | sgd
    lr: float = 3.16e-5
    betas: tuple[float, float] = (0.9, 0.99)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    bias_lr_mult: float = 1.0  #: Caffe lr_mult of conv / linear biases (1 unless the prototxt says otherwise)
    bias_decay_mult: float = 1.0  #: Caffe decay_mult of conv / linear biases
    lr_steps: list[int] = dataclasses.field(default_factory=lambda: [215_000, 430_000])
    lr_gamma: float = 0.316
    lr_values: list[float] = dataclasses.field(default_factory=list)  #: lr of each segment (overrides lr_gamma)
    warmup_steps: int = 0
    batch_size: int = 40  #: per process; global batch = batch_size * world_size * accum_steps
    accum_steps: int = 1
    max_steps: int = 500_000
    time_limit_min: float = 0.0  #: stop (with a checkpoint) after this many minutes (0: no limit)
    grad_clip: float = 0.0
    amp: str = "auto"  #: auto | bf16 | fp16 | none (CUDA only)
    channels_last: bool = True  #: CUDA only
    sync_bn: bool = False  #: SyncBatchNorm under DDP (CUDA only)
    # bookkeeping
    out_dir: str = "runs/pretext"
    checkpoint_every: int = 1000
    log_every: int = 20
    image_every: int = 1000
    num_grid_images: int = 8
    tensorboard: bool = True
    seed: int = 0
    device: str = "auto"
    progress: bool = True


# --------------------------------------------------------------------------------------------- data
class ShardedSampler(torch.utils.data.Sampler):
    """Deterministic, resumable sampler for (distributed) training.

    Epoch ``e`` permutes the dataset with ``seed + e``; global batch ``i`` is permutation[G*i : G*(i+1)] with
    G = batch * world_size, and rank r takes its r-th slice. So the union of the ranks' batches is exactly the
    batch a single process with batch G would draw. Yields ``(index, sample_seed)``: augmentation is seeded per
    sample, so a resumed run sees the same crops as an uninterrupted one. ``start`` skips batches on resume.
    """

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0, multiple_of: int = 1):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.multiple_of = multiple_of  # gradient accumulation: an epoch never ends inside an optimiser step
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch * self.world) // self.multiple_of * self.multiple_of

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        G = self.batch * self.world
        for i in range(self.start, self.batches_per_epoch):
            lo = G * i + self.rank * self.batch
            for j in range(lo, lo + self.batch):
                yield perm[j], (self.seed * 7_919 + self.epoch * 1_000_003 + j) % (2**63 - 1)


def get_dataset(cfg: PretextConfig, device: Optional[torch.device] = None) -> TrainCrops:
    """Training crops as uint8, seeded per sample by the sampler's ``(index, seed)`` items. Refused (before any run
    folder exists) when no listed image decodes with colour: files are tried in order until one does."""
    if not cfg.data:
        raise UserError("no training data: set 'data' in the config or --set data=/path/to/images")
    paths = list_images(cfg.data)
    if cfg.max_images:
        paths = paths[: cfg.max_images]
    if not paths:
        raise UserError(f"no images found in {', '.join(cfg.data)}")
    usable, counts = first_usable(paths)
    if usable is None:
        example = f"; e.g. {counts['example']}" if counts["example"] else ""
        raise UserError(f"no usable training image in {', '.join(cfg.data)}: {counts['unreadable']} unreadable, "
                        f"{counts['grey']} grey of {len(paths)}{example}")
    decode = resolve_decode(cfg.decode, device if device is not None else torch.device("cpu"))
    return TrainCrops(paths, cfg.size, cfg.crop, cfg.crop_scale_min, decode=decode)


def grid_batch(cfg: PretextConfig, n: int) -> Optional[torch.Tensor]:
    """A fixed batch of held-out (or first training) images for the sample grids."""
    try:
        paths = list_images(cfg.val_data or cfg.data)[:n]
    except UserError:
        return None
    ds = ImageDataset(paths, eval_transform(cfg.size, cfg.size), (3, cfg.size, cfg.size))
    imgs = [ds[i] for i in range(len(ds))]
    imgs = [x for x, ok, grey in imgs if ok]
    return torch.stack(imgs) if imgs else None


# --------------------------------------------------------------------------------------------- model + target
#: the loss key -> the target it trains (rebal and ce differ in the rebalancing weights only)
LOSS_TARGETS = {"rebal": "ab313", "ce": "ab313", "l2": "l2", "hue_chroma": "hue_chroma"}
INIT_MODES = ("kmeans", "pca", "gaussian", "default")


def build_target(cfg: PretextConfig, prior: Optional[dict]) -> Target:
    if cfg.loss not in LOSS_TARGETS:
        raise UserError(f"loss must be one of {', '.join(LOSS_TARGETS)}; got '{cfg.loss}'")
    return TARGETS[LOSS_TARGETS[cfg.loss]].from_config(cfg, prior)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def sample_points(b: int, p: int, size: tuple[int, int], margin: int, generator: torch.Generator | None) -> torch.Tensor:
    """``p`` pixels per image drawn uniformly from the integer pixels of the window [margin, size - margin), as the
    grid coordinates of their centres (align_corners=False), (B, P, 2) in (x, y) order. Larsson et al.'s release
    draws 128 per image in [96, 256) of its 352 crop (``sampler_float`` + ``StripDecimals``)."""
    h, w = size
    iy = torch.randint(margin, h - margin, (b, p), generator=generator)
    ix = torch.randint(margin, w - margin, (b, p), generator=generator)
    return torch.stack([(2 * ix + 1) / w - 1, (2 * iy + 1) / h - 1], dim=-1).float()


def output_and_targets(model, x: torch.Tensor, ab: torch.Tensor, cfg: PretextConfig,
                       points_gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the network on ``x``; return its output (fp32) and the targets it is scored against, at the same
    positions: ``ab`` is the target's per-pixel tensor (``Target.dense_targets``: ab, or more channels, ab first).

    Models that sample points (``points_per_image``) are scored at the points (``sample_points``: pixel centres in the
    central window). Otherwise ab is subsampled every
    ``model.target_stride`` pixels (default: input size / output size), as the release does, or averaged over the
    grid's cells (``target_sampling='area'``). Where the output's grid differs from the targets' (the released
    AlexNet: 12x12 logits, 23x23 targets at 180 px), the output is resized bilinearly with aligned corners, as the
    release's ``Resize`` layer does (``train_alexnet/train_val.prototxt``, ``fc8_upsample``).
    """
    P = cfg.points_per_image
    if P > 0 and getattr(_unwrap(model), "supports_points", False):
        pts = sample_points(x.shape[0], P, tuple(x.shape[-2:]), cfg.points_margin, points_gen).to(x.device)
        out = model(x, points=pts).float()  # (B, C, P, 1)
        return out, F.grid_sample(ab, pts.unsqueeze(2), mode="nearest", align_corners=False)  # (B, C, P, 1)
    out = model(x).float()
    stride = getattr(_unwrap(model), "target_stride", None) or max(1, round(x.shape[-2] / out.shape[-2]))
    ab_t = subsample_ab(ab, stride, cfg.target_sampling)
    if out.shape[-2:] != ab_t.shape[-2:]:
        out = F.interpolate(out, size=tuple(ab_t.shape[-2:]), mode="bilinear", align_corners=True)
    return out, ab_t


@dataclasses.dataclass
class StepOutput:
    loss: torch.Tensor  #: the loss that was backpropagated (before division by accum_steps)
    logs: dict  #: scalars to log (tensors), from the target's loss
    out: torch.Tensor  #: the network output at the targets' positions
    ab_t: torch.Tensor  #: ab at those positions
    valid: torch.Tensor  #: (B,) bool: images that counted


def train_step(model, rgb: torch.Tensor, ok: torch.Tensor, target: Target, cfg: PretextConfig, amp_dtype,
               scaler, points_gen: torch.Generator | None) -> StepOutput:
    """Forward and backward of one (micro-)batch: RGB -> Lab -> model input -> output and targets -> loss -> grads."""
    lab = rgb_to_lab(rgb)
    x = target.model_input(rgb, lab)
    with torch.autocast(rgb.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out, t = output_and_targets(model, x, target.dense_targets(rgb, lab), cfg, points_gen)
    ab_t = t[:, :2]
    valid = ok & target.valid(ab_t)
    loss, logs = target.loss(out, target.encode(t), valid)
    scaled = loss / cfg.accum_steps
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return StepOutput(loss, logs, out, ab_t, valid)


def build_optimizer(cfg: PretextConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Two parameter groups mirroring Caffe's per-blob ``lr_mult`` / ``decay_mult``: conv and linear biases
    (``bias_lr_mult``, ``bias_decay_mult``) and every other parameter (1, 1). Decay is Caffe's (and torch's Adam):
    L2 added to the gradient."""
    layers = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    bias_ids = {id(m.bias) for m in model.modules() if isinstance(m, layers) and m.bias is not None}
    weights, biases = [], []
    for p in model.parameters():
        if p.requires_grad:
            (biases if id(p) in bias_ids else weights).append(p)
    groups = [{"params": weights, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
              {"params": biases, "weight_decay": cfg.weight_decay * cfg.bias_decay_mult, "lr_mult": cfg.bias_lr_mult}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise UserError(f"optimizer must be adam, adamw or sgd; got '{cfg.optimizer}'")


def lr_at(cfg: PretextConfig, step: int) -> float:
    """Step schedule (``lr_values[n]``, or ``lr * lr_gamma ** n`` after n of ``lr_steps``) with optional linear warm-up
    (computed, not stored: resuming needs only the step). Caffe's ``step`` policy with ``stepsize`` s is
    ``lr_steps = [s, 2s, ...]``; its ``fixed`` solvers chained by snapshots are ``lr_values``."""
    n = sum(step >= s for s in cfg.lr_steps)
    lr = cfg.lr_values[n] if cfg.lr_values else cfg.lr * cfg.lr_gamma ** n
    if cfg.warmup_steps and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def optimizer_step(model, optimizer, scaler, cfg: PretextConfig, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------- logging helpers
def saturation_stats(out: torch.Tensor, ab_t: torch.Tensor, target: Target, T: float,
                     mask: torch.Tensor) -> tuple[float, float]:
    """Mean chroma |ab| of the prediction (annealed mean) and of the ground truth, over colour images: a
    prediction far less saturated than the truth is the well-known collapse to sepia."""
    with torch.no_grad():
        pred = target.decode(out, T)
        m = mask.view(-1, 1, 1).float().expand(-1, *pred.shape[-2:])
        denom = m.sum().clamp(min=1)
        return float((pred.norm(dim=1) * m).sum() / denom), float((ab_t.norm(dim=1) * m).sum() / denom)


@torch.no_grad()
def sample_grid(model, rgb: torch.Tensor, target: Target, T: float) -> torch.Tensor:
    """Rows of grey input / prediction / ground truth, as one (3, H, W) image."""
    import torchvision

    was_training = model.training
    model.eval()
    pred = colorize_rgb(model, rgb, target, target.bins, size=None, T=T)
    grey = gray_rgb(rgb)
    model.train(was_training)
    return torchvision.utils.make_grid(torch.cat([grey, pred, rgb.clamp(0, 1)]), nrow=rgb.shape[0], padding=2)


def plot_loss_curve(jsonl_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runtime import read_jsonl

    recs = [r for r in read_jsonl(jsonl_path) if r.get("kind") == "train"]
    if not recs:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax[0].set(xlabel="step", ylabel="loss", title="training loss")
    ax[1].plot([r["step"] for r in recs], [r["sat_pred"] for r in recs], label="predicted")
    ax[1].plot([r["step"] for r in recs], [r["sat_true"] for r in recs], label="ground truth")
    ax[1].set(xlabel="step", ylabel="mean |ab|", title="saturation")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- checkpoints
def model_kwargs(cfg: PretextConfig, target: Target) -> dict:
    return {**target.model_kwargs(cfg.model), **cfg.model_kwargs}


def make_checkpoint(cfg, model, optimizer, scaler, target: Target, prior: Optional[dict], state: dict,
                    rng_per_rank: list) -> dict:
    m = _unwrap(model)
    return {
        "format": FORMAT,
        "model_name": cfg.model,
        "model_kwargs": model_kwargs(cfg, target),
        "model": m.state_dict(),
        "target": target.name,
        "bins": target.bins.cpu() if target.bins is not None else None,
        "prior": prior["probs"].float().cpu() if prior is not None else None,
        "input_size": cfg.size,
        "config": dataclasses.asdict(cfg),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_per_rank": rng_per_rank,
        **state,
    }


def checkpoint_path(cfg: PretextConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoint.pth"


# --------------------------------------------------------------------------------------------- training
def train_one_epoch(model, optimizer, scaler, loader, target: Target, prior: Optional[dict], cfg: PretextConfig,
                    state: dict, dist_info: DistInfo, device, amp_dtype, points_gen, logger: JsonlLogger, writer, bar,
                    grid_rgb, t_start: float) -> bool:
    """Run until the epoch ends or the run is over; returns True when the run is over."""
    model.train()
    micro = 0
    window_t, window_imgs = time.time(), 0
    for rgb, ok, grey in loader:
        rgb, ok, grey = batch_to_device(rgb, ok, grey, device)  # uint8 -> [0, 1] on the device (decode: gpu there)
        ok = ok.to(device)
        if cfg.channels_last and device.type == "cuda":
            rgb = rgb.contiguous(memory_format=torch.channels_last)
        last_micro = micro == cfg.accum_steps - 1
        sync_ctx = model.no_sync() if (dist_info.enabled and not last_micro) else contextlib.nullcontext()
        with sync_ctx:
            res = train_step(model, rgb, ok, target, cfg, amp_dtype, scaler, points_gen)
        for path, reason in loader.dataset.report_unreadable():  # each file once, replaced by the next readable one
            log.warning("unreadable training image %s (%s): replaced by the next readable file", path, reason)
        state["skipped"] = loader.dataset.num_unreadable()  # distinct files, not events
        state["grey"] += int((ok & ~res.valid).sum())  # readable, but no target cell has colour
        state["batch_in_epoch"] += 1
        window_imgs += rgb.shape[0] * dist_info.world_size
        micro += 1
        if micro < cfg.accum_steps:
            continue
        micro = 0
        lr = lr_at(cfg, state["step"])
        optimizer_step(model, optimizer, scaler, cfg, lr)
        state["step"] += 1
        step = state["step"]
        if bar is not None:
            bar.update(1)
        # every rank stops together: one agreement per step for both reasons to stop early
        nonfinite, timed_out = any_process(
            [not math.isfinite(res.loss.item()),
             cfg.time_limit_min > 0 and time.time() - t_start > cfg.time_limit_min * 60], device)
        if nonfinite:
            raise UserError(f"loss is not finite at step {step}; lower lr or check the data")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            names = list(res.logs)
            vals = all_reduce_sum(torch.stack([res.logs[k].detach().float() for k in names])) / dist_info.world_size
            sat_p, sat_t = saturation_stats(res.out, res.ab_t, target, cfg.temperature, res.valid)
            ips = window_imgs / max(time.time() - window_t, 1e-9)
            window_t, window_imgs = time.time(), 0
            rec = dict(kind="train", step=step, epoch=state["epoch"], **dict(zip(names, vals.tolist())), lr=lr,
                       img_per_s=ips, sat_pred=sat_p, sat_true=sat_t, skipped=state["skipped"], grey=state["grey"])
            logger.log(**rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=f"{ips:.1f}", sat=f"{sat_p:.1f}/{sat_t:.1f}")
            if writer is not None:
                for k in (*names, "lr", "img_per_s", "sat_pred", "sat_true"):
                    writer.add_scalar(f"train/{k}", rec[k], step)
        grid_due = cfg.image_every > 0 and (step % cfg.image_every == 0 or step == cfg.max_steps)
        if dist_info.is_main and grid_rgb is not None and grid_due:
            save_grid(model, grid_rgb.to(device), target, cfg, step, writer)
        done = step >= cfg.max_steps or timed_out
        if step % cfg.checkpoint_every == 0 or done:
            # every rank's RNG state goes into the checkpoint, so that a resumed DDP run continues exactly
            rng = all_gather_objects({"rng": get_rng_state(), "points_rng": points_gen.get_state()})
            if dist_info.is_main:
                save_checkpoint(make_checkpoint(cfg, model, optimizer, scaler, target, prior, state_for_ckpt(state),
                                                rng), checkpoint_path(cfg))
            barrier()
        if done:
            if timed_out:
                log.info("time limit of %.1f min reached at step %d", cfg.time_limit_min, step)
            return True
    return False


def state_for_ckpt(state: dict) -> dict:
    return {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "skipped", "grey")}


def save_grid(model, rgb, target: Target, cfg, step, writer) -> None:
    import torchvision

    grid = sample_grid(_unwrap(model), rgb, target, cfg.temperature)
    path = Path(cfg.out_dir) / "images" / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, path)
    if writer is not None:
        writer.add_image("samples/grey_pred_true", grid, step)


def main(args) -> int:
    return run(config_from_args(PretextConfig, args), resume=args.resume)


def run(cfg: PretextConfig, resume: Optional[str] = None) -> int:
    """Train with ``cfg``; ``resume`` is None, 'auto' (out_dir/checkpoint.pth if present) or a checkpoint path."""
    dist_info, device = init_distributed(cfg.device)
    try:
        return _run(cfg, resume, dist_info, device)
    finally:
        cleanup_distributed()


def check_config(cfg: PretextConfig) -> None:
    for key in ("batch_size", "accum_steps", "max_steps", "checkpoint_every", "log_every", "size", "k"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"config key '{key}' must be > 0, got {getattr(cfg, key)}")
    if not 0 <= 2 * cfg.points_margin < cfg.size:
        raise UserError(f"points_margin must be >= 0 and leave a window inside the {cfg.size}px crop; "
                        f"got {cfg.points_margin}")
    if cfg.image_every < 0 or cfg.workers < 0 or cfg.points_per_image < 0 or cfg.init_images < 0:
        raise UserError("image_every, workers, points_per_image and init_images must be >= 0 "
                        "(image_every 0: no sample grids; init_images 0: one batch)")
    for key, allowed in (("target_sampling", ("point", "area")), ("loss_norm", ("batch", "pixel")),
                         ("init", INIT_MODES)):
        if getattr(cfg, key) not in allowed:
            raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{getattr(cfg, key)}'")
    if list(cfg.lr_steps) != sorted(cfg.lr_steps):
        raise UserError(f"lr_steps must be increasing, got {list(cfg.lr_steps)}")
    if cfg.lr_values and (len(cfg.lr_values) != len(cfg.lr_steps) + 1 or cfg.lr_values[0] != cfg.lr):
        raise UserError(f"lr_values needs one lr per segment of lr_steps ({len(cfg.lr_steps) + 1}), the first equal "
                        f"to lr ({cfg.lr}); got {list(cfg.lr_values)}")


def init_batch(cfg: PretextConfig, dataset, target: Target, device: torch.device) -> torch.Tensor:
    """The model input of the data-dependent initialisation: ``init_images`` (default: one batch) readable, coloured
    training images, the same on every process and for every world size (a seeded draw, the crops of epoch 0)."""
    n = min(cfg.init_images or cfg.batch_size, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    items = [(i, (cfg.seed * 7_919 + j) % (2**63 - 1)) for j, i in enumerate(order[:n])]
    loader = torch.utils.data.DataLoader(dataset, batch_size=n, sampler=items, num_workers=cfg.workers,
                                         collate_fn=dataset.collate_fn)
    rgb, ok, grey = next(iter(loader))
    rgb, ok, _ = batch_to_device(rgb, ok, grey, device)
    lab = rgb_to_lab(rgb)
    keep = ok.to(device) & target.valid(lab[:, 1:])
    if not bool(keep.any()):
        raise UserError(f"data-dependent init ({cfg.init}): none of the {n} initialisation images is readable and "
                        "coloured")
    return target.model_input(rgb, lab)[keep]


def initialise(cfg: PretextConfig, model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Data-dependent initialisation (Kraehenbuehl et al., ICLR 2016; ``pretext.init``) of a fresh, unwrapped model
    on ``x``, seeded by ``cfg.seed`` (so every process computes the same). Models trained on sampled points run on
    a fixed draw of points, as in training."""
    from .init import data_dependent_init

    forward = None
    if cfg.points_per_image > 0 and getattr(model, "supports_points", False):
        pts = sample_points(x.shape[0], cfg.points_per_image, tuple(x.shape[-2:]), cfg.points_margin,
                            torch.Generator().manual_seed(cfg.seed)).to(x.device)
        forward = lambda m, inp: m(inp, points=pts)  # noqa: E731
    t0 = time.time()
    report = data_dependent_init(model, x, mode=cfg.init, forward=forward, seed=cfg.seed)
    log.info("data-dependent init (%s) of %d layers on %d images in %.1fs: %d rescaling rounds%s", cfg.init,
             len(report["layers"]), x.shape[0], time.time() - t0, report["rounds"],
             "" if report["converged"] in (None, True) else " (ratios not within tolerance)")
    return report


def _run(cfg: PretextConfig, resume: Optional[str], dist_info: DistInfo, device: torch.device) -> int:
    check_config(cfg)
    out_dir = Path(cfg.out_dir)
    setup_logging(out_dir if dist_info.is_main else None, dist_info.is_main)
    resume = resolve_resume(resume, checkpoint_path(cfg))
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
    seed_everything(cfg.seed + dist_info.rank)

    from .prior import load_prior

    prior = load_prior(cfg.prior) if cfg.prior else None
    target = build_target(cfg, prior)
    kwargs = model_kwargs(cfg, target)
    try:
        model = models.create_model(cfg.model, **kwargs).to(device)
    except (ValueError, TypeError) as e:
        raise UserError(f"model '{cfg.model}' with {kwargs}: {e}") from None
    dataset = get_dataset(cfg, device)
    if not resume and cfg.init != "default":  # step 0 only: a resumed run loads its weights
        initialise(cfg, model, init_batch(cfg, dataset, target, device))
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    points_gen = torch.Generator().manual_seed(cfg.seed * 31 + dist_info.rank)
    state = dict(step=0, epoch=0, batch_in_epoch=0, skipped=0, grey=0)
    if resume:
        ckpt = load_checkpoint(resume)
        if ckpt.get("format") != FORMAT:
            raise UserError(f"{resume}: not a crosschannel pretext checkpoint")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        states = ckpt["rng_per_rank"]
        if len(states) == dist_info.world_size:
            set_rng_state(states[dist_info.rank]["rng"])
            points_gen.set_state(states[dist_info.rank]["points_rng"])
        else:
            log.warning("checkpoint written by %d processes, resuming with %d: RNG streams restart from the seed",
                        len(states), dist_info.world_size)
        state.update({k: ckpt[k] for k in state})
        log.info("resumed from %s at step %d", resume, state["step"])
    if dist_info.enabled:
        if cfg.sync_bn and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = ShardedSampler(len(dataset), cfg.batch_size, dist_info.rank, dist_info.world_size, cfg.seed,
                             multiple_of=cfg.accum_steps)
    if sampler.batches_per_epoch == 0:
        raise UserError(f"{len(dataset)} images is fewer than one global batch "
                        f"({cfg.batch_size} x {dist_info.world_size} processes x {cfg.accum_steps} accumulation steps)")
    log.info("%d images, %d batches/epoch, model %s (%.1fM params), target %s, loss %s, device %s, world %d",
             len(dataset), sampler.batches_per_epoch, cfg.model, sum(p.numel() for p in model.parameters()) / 1e6,
             target.name, cfg.loss, device, dist_info.world_size)
    logger = JsonlLogger(out_dir / "log.jsonl", enabled=dist_info.is_main)
    writer = None
    if cfg.tensorboard and dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    grid_rgb = grid_batch(cfg, cfg.num_grid_images) if dist_info.is_main and cfg.image_every > 0 else None
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not (dist_info.is_main and cfg.progress))
    t_start = time.time()
    done = state["step"] >= cfg.max_steps
    # the sampler runs in the main process, so workers can persist across epochs (set_epoch still applies)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=cfg.workers > 0, collate_fn=dataset.collate_fn)
    while not done:
        start_batch = state["batch_in_epoch"]
        if start_batch >= sampler.batches_per_epoch:
            state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
            start_batch = 0
        sampler.set_epoch(state["epoch"], start_batch)
        done = train_one_epoch(model, optimizer, scaler, loader, target, prior, cfg, state, dist_info, device,
                               amp_dtype, points_gen, logger, writer, bar, grid_rgb, t_start)
        if not done:
            state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
    bar.close()
    if dist_info.is_main:
        plot_loss_curve(out_dir / "log.jsonl", out_dir / "loss.png")
        if writer is not None:
            writer.close()
        if state["skipped"]:
            log.warning("%d unreadable image files were replaced by readable ones (listed above and in log.txt)",
                        state["skipped"])
        log.info("done: step %d, checkpoint %s", state["step"], checkpoint_path(cfg))
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("pretext.train", description="Pretrain a backbone by colorization.")
    add_config_args(p)
    add_resume_arg(p)
    return p


if __name__ == "__main__":
    import sys

    from .runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
