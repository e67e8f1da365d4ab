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
import warnings
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
    barrier,
    check_resume_config,
    cleanup_distributed,
    config_changes,
    config_from_args,
    config_to_dict,
    get_rng_state,
    ignore_stop_signals,
    init_distributed,
    load_checkpoint,
    log,
    param,
    remove_stale_tmp,
    resolve_resume,
    resume_command,
    save_checkpoint,
    save_config,
    seed_everything,
    set_rng_state,
    setup_logging,
    truncate_jsonl,
    validate_config,
)

FORMAT = "crosschannel/pretext-v1"


#: the loss key -> the target it trains (rebal and ce differ in the rebalancing weights only)
LOSS_TARGETS = {"rebal": "ab313", "ce": "ab313", "l2": "l2", "hue_chroma": "hue_chroma"}
INIT_MODES = ("kmeans", "pca", "gaussian", "default")
AMP_MODES = ("auto", "bf16", "fp16", "none")
MAX_SIZE = 4096  #: the largest training crop accepted (a 4096 px crop of batch 40 is already ~8 GB of uint8 input)
#: the smallest crop: every registered network keeps a non-empty deepest feature map (vgg16_hypercolumn's five
#: 2x2 max-pools need 32 px; below it zhang_vgg and alexnet_cc see 1x1 maps and a target grid of 1-4 cells)
MIN_SIZE = 32
#: a model -> the multiple its crop must be, and why
SIZE_MULTIPLE = {"zhang_vgg": (8, "its three stride-2 convs and the 2x upsampling give logits of size/4 on the "
                                  "stride-4 target grid only for a multiple of 8 (else the logits would be resized)")}


@dataclasses.dataclass(frozen=True)
class PretextConfig:
    """Defaults: Zhang et al.'s VGG net as released (richzhang/colorization: models/colorization_train_val_v2.prototxt,
    train/solver.prototxt, resources/caffe_traininglayers.py); PROVENANCE.md names the source of each. Every value
    has declared limits (``param``) and :meth:`validate` checks the combinations: both run before anything is
    created (``pretext.runtime.validate_config``)."""
    # data
    data: list[str] = dataclasses.field(default_factory=list)  #: folders / list files / globs of training images
    val_data: list[str] = dataclasses.field(default_factory=list)  #: held-out images for the sample grids
    size: int = param(176, ge=MIN_SIZE, le=MAX_SIZE)  #: training crop (released: 176 for the VGG net, 180 for the AlexNet)
    crop: str = param("resize_crop", choices=("resize_crop", "rrc"))  #: resize_crop (resize then random crop, as released) | rrc (RandomResizedCrop)
    crop_scale_min: float = param(0.25, gt=0, le=1)  #: rrc only: smallest crop area, as a fraction of the image
    workers: int = param(4, ge=0, le=256)
    decode: str = param("cpu", choices=("cpu", "gpu"))  #: cpu (loader workers, JPEG draft decoding) | gpu (nvjpeg on the device; else cpu, warned)
    max_images: int = param(0, ge=0)  #: use at most this many training images (0: all)
    # model and target
    model: str = "zhang_vgg"  #: zhang_vgg | alexnet_cc | vgg16_hypercolumn | timm:<name>
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    loss: str = param("rebal", choices=tuple(LOSS_TARGETS))  #: rebal (classification, class-rebalanced) | ce (no rebalancing) | l2 (regression) | hue_chroma
    loss_norm: str = param("batch", choices=("batch", "pixel"))  #: batch (sum over pixels / images, as released) | pixel (mean over counted pixels)
    prior: str = ""  #: prior.npz from `crosschannel prior` (needed for rebal)
    lam: float = param(0.5, ge=0, le=1)  #: rebalancing: weight of the uniform distribution
    rebalance_mode: str = param("reference", choices=("reference", "paper"))  #: reference (the released PriorFactor) | paper (uniform over all Q bins)
    k: int = param(10, ge=1, le=313)  #: soft-encoding neighbours (released NNEncLayer: 10; the paper's text: 5); <= the bins
    sigma: float = param(5.0, gt=0, le=1000)
    target_sampling: str = param("point", choices=("point", "area"))  #: point (every target_stride-th pixel, as released) | area (cell averages)
    grey_thresh: float = param(5.0, ge=0, le=128)  #: an image counts if some target |a| or |b| exceeds this (NonGrayMaskLayer)
    points_per_image: int = param(0, ge=0)  #: >0: train on P random pixels per image (Larsson's sparse hypercolumns)
    points_margin: int = param(0, ge=0)  #: points are drawn from the central window [margin, size - margin) (Larsson: 96 of 352)
    temperature: float = param(0.38, gt=0, le=100)  #: annealed mean for logged predictions
    init: str = param("kmeans", choices=INIT_MODES)  #: kmeans | pca | gaussian | default (data-dependent init at step 0; default: PyTorch's)
    init_images: int = param(0, ge=0)  #: images in the initialisation batch (0: batch_size)
    # optimisation (train/solver.prototxt: Adam 0.9/0.99, wd 1e-3, lr 3.16e-5 x0.316 every 215k, 500k iterations)
    optimizer: str = param("adam", choices=("adam", "adamw", "sgd"))  #: adam | adamw | sgd
    lr: float = param(3.16e-5, gt=0, le=10)
    betas: tuple[float, float] = param((0.9, 0.99), ge=0, lt=1)  #: Adam's (beta1, beta2), each in [0, 1)
    momentum: float = param(0.9, ge=0, lt=1)
    weight_decay: float = param(1e-3, ge=0, le=1)
    bias_lr_mult: float = param(1.0, ge=0, le=1000)  #: Caffe lr_mult of conv / linear biases (1 unless the prototxt says otherwise)
    bias_decay_mult: float = param(1.0, ge=0, le=1000)  #: Caffe decay_mult of conv / linear biases
    lr_steps: list[int] = param(default_factory=lambda: [215_000, 430_000], ge=1)
    lr_gamma: float = param(0.316, gt=0, le=1)
    lr_values: list[float] = param(default_factory=list, ge=0, le=10)  #: lr of each segment (overrides lr_gamma)
    warmup_steps: int = param(0, ge=0)
    batch_size: int = param(40, ge=1, le=65536)  #: per process; global batch = batch_size * world_size * accum_steps
    accum_steps: int = param(1, ge=1, le=65536)
    max_steps: int = param(500_000, ge=1)
    time_limit_min: float = param(0.0, ge=0)  #: stop (with a checkpoint) after this many minutes (0: no limit)
    grad_clip: float = param(0.0, ge=0)
    amp: str = param("auto", choices=AMP_MODES)  #: auto | bf16 | fp16 | none (CUDA only)
    channels_last: bool = True  #: CUDA only
    sync_bn: bool = False  #: SyncBatchNorm under DDP (CUDA only)
    # bookkeeping
    out_dir: str = "runs/pretext"
    checkpoint_every: int = param(1000, ge=1)
    log_every: int = param(20, ge=1)
    image_every: int = param(1000, ge=0)  #: 0: no sample grids
    num_grid_images: int = param(8, ge=1, le=256)
    tensorboard: bool = True
    seed: int = param(0, ge=0, le=2**32 - 1)
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        """Combinations of keys (``validate_config`` has checked each key's limits). Cheap: no file is read."""
        if not str(self.out_dir).strip():
            raise UserError("config key 'out_dir' is empty")
        if len(self.betas) != 2:
            raise UserError(f"config key 'betas': expected a pair [beta1, beta2], got {list(self.betas)}")
        if not (self.model in models.list_models() or (self.model.startswith("timm:") and len(self.model) > 5)):
            raise UserError(f"unknown model '{self.model}'; available: {', '.join(models.list_models())} or "
                            "timm:<name>")
        mult, why = SIZE_MULTIPLE.get(self.model, (1, ""))
        if self.size % mult:
            lo = self.size // mult * mult
            raise UserError(f"config key 'size': {self.model} needs a multiple of {mult} ({why}); got {self.size}, "
                            f"use {max(lo, MIN_SIZE)} or {lo + mult}")
        if not 0 <= 2 * self.points_margin < self.size:
            raise UserError(f"config key 'points_margin' must leave a window inside the {self.size}px crop "
                            f"(0 <= 2 x margin < size); got {self.points_margin}")
        if self.loss == "rebal" and not self.prior:
            raise UserError("loss 'rebal' needs a prior: run `crosschannel prior DATA -o prior.npz` and set "
                            "prior=prior.npz (or loss=ce for no rebalancing)")
        if list(self.lr_steps) != sorted(set(self.lr_steps)):
            raise UserError(f"config key 'lr_steps' must be strictly increasing, got {list(self.lr_steps)}")
        if self.lr_values and (len(self.lr_values) != len(self.lr_steps) + 1 or self.lr_values[0] != self.lr):
            raise UserError(f"lr_values needs one lr per segment of lr_steps ({len(self.lr_steps) + 1}), the first "
                            f"equal to lr ({self.lr}); got {list(self.lr_values)}")
        if self.device not in ("auto", ""):
            try:
                torch.device(self.device)
            except RuntimeError:
                raise UserError(f"config key 'device': expected auto, cpu, cuda, cuda:N or mps; got "
                                f"'{self.device}'") from None


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
                    grid_rgb, t_start: float, stop: Optional[GracefulStop] = None) -> bool:
    """Run until the epoch ends or the run is over; returns True when the run is over. A stop signal
    (``stop.requested`` on any process) ends the run after the current step, with a checkpoint, and sets
    ``state["stopped"]``."""
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
        state["skipped"] = max(state["skipped"], loader.dataset.num_unreadable())  # distinct files, not events
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
        # every rank stops together: one agreement per step for the three reasons to stop early
        nonfinite, timed_out, stopping = any_process(
            [not math.isfinite(res.loss.item()),
             cfg.time_limit_min > 0 and time.time() - t_start > cfg.time_limit_min * 60,
             stop is not None and stop.requested], device)
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
        done = step >= cfg.max_steps or timed_out or stopping
        if stopping:
            state["stopped"] = True
        if step % cfg.checkpoint_every == 0 or done:
            # every rank's RNG state goes into the checkpoint, so that a resumed DDP run continues exactly
            rng = all_gather_objects({"rng": get_rng_state(), "points_rng": points_gen.get_state(),
                                      "unreadable": loader.dataset.unreadable()})
            # the unreadable files any rank met (each rank's loader sees its own shard): counted once, kept on resume
            state["unreadable"] = sorted(set().union(*(r.pop("unreadable") for r in rng)))
            state["skipped"] = len(state["unreadable"])
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
    return {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "skipped", "grey", "unreadable")}


def save_grid(model, rgb, target: Target, cfg, step, writer) -> None:
    import torchvision

    grid = sample_grid(_unwrap(model), rgb, target, cfg.temperature)
    path = Path(cfg.out_dir) / "images" / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, path)
    if writer is not None:
        writer.add_image("samples/grey_pred_true", grid, step)


#: what makes a resumed run another experiment: changed on resume, refused unless --allow-config-change (and then
#: recorded in config_history.jsonl). Not guarded (recorded only): max_steps (extending a run is normal),
#: time_limit_min, val_data, workers, decode, amp, channels_last, sync_bn, device (a requeued job may land on other
#: hardware), init / init_images (step 0 only), out_dir and the bookkeeping intervals.
GUARDED = ("data", "max_images", "size", "crop", "crop_scale_min", "model", "model_kwargs", "loss", "loss_norm",
           "prior", "lam", "rebalance_mode", "k", "sigma", "target_sampling", "grey_thresh", "points_per_image",
           "points_margin", "optimizer", "lr", "betas", "momentum", "weight_decay", "bias_lr_mult", "bias_decay_mult",
           "lr_steps", "lr_gamma", "lr_values", "warmup_steps", "batch_size", "accum_steps", "grad_clip", "seed")


def main(args) -> int:
    return run(config_from_args(PretextConfig, args), resume=args.resume, force=getattr(args, "force", False),
               allow_change=getattr(args, "allow_config_change", False))


def run(cfg: PretextConfig, resume: Optional[str] = None, force: bool = False, allow_change: bool = False) -> int:
    """Train with ``cfg``; ``resume`` is None, 'auto' (out_dir/checkpoint.pth if present) or a checkpoint path
    (``force``: even into an out_dir holding another run's checkpoint). Returns 0, or 128 + signal after a stop
    signal (the checkpoint of the last step written).

    Everything that can be refused is refused before the run folder exists and before the network is allocated:
    the config's limits, the data, the prior, the network at the configured size (built on the meta device), an
    explicit checkpoint and its config. Then the main process locks ``out_dir`` (:class:`RunLock`)."""
    check_config(cfg)  # also for configs built in Python
    dist_info, device = init_distributed(cfg.device)
    lock = None
    try:
        setup_logging(None, dist_info.is_main)
        out_dir = Path(cfg.out_dir)

        def prepare():
            dataset = get_dataset(cfg, device)
            prior, target = load_target(cfg)
            check_model(cfg, target)
            ckpt = None
            if resume not in (None, "auto"):
                ckpt = load_checkpoint(resume)
                check_resumable(ckpt, resume, cfg, target, allow_change)
            return dataset, prior, target, ckpt

        dataset, prior, target, ckpt = _agree(prepare, device)

        def take_lock():
            nonlocal lock
            if dist_info.is_main:
                lock = RunLock(out_dir).acquire()
                remove_stale_tmp(out_dir)
                setup_logging(out_dir, True)

        _agree(take_lock, device)

        def resume_from():
            path = resolve_resume(resume, checkpoint_path(cfg), force)
            ck = ckpt
            if path is not None and ck is None:
                ck = load_checkpoint(path)
                check_resumable(ck, path, cfg, target, allow_change)
            if ck is not None and dist_info.is_main:
                record_resume(ck, path, cfg, allow_change)
            elif dist_info.is_main and truncate_jsonl(out_dir / "log.jsonl", 0):  # an attempt killed before its
                log.info("log.jsonl: dropped the records of an earlier attempt that wrote no checkpoint")  # 1st ckpt
            return path, ck

        resume, ckpt = _agree(resume_from, device)
        with GracefulStop() as stop:
            return _run(cfg, resume, ckpt, dataset, prior, target, dist_info, device, stop)
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed()


def check_config(cfg: PretextConfig) -> PretextConfig:
    """Every key's declared limits and the combinations (:meth:`PretextConfig.validate`); one-line errors."""
    return validate_config(cfg)


def _agree(fn, device):
    """``fn()`` on every process; a :class:`UserError` on any of them stops all of them (no rank is left waiting in
    a collective)."""
    error, out = None, None
    try:
        out = fn()
    except UserError as e:
        error = e
    if any_process([error is not None], device)[0]:
        raise error or UserError("refused by another process (see its error)")
    return out


def load_target(cfg: PretextConfig) -> tuple[Optional[dict], Target]:
    """The prior (if set) and the training target, with one-line errors (k above the number of bins, ...)."""
    from .prior import load_prior

    prior = load_prior(cfg.prior) if cfg.prior else None
    if prior is not None and cfg.k > prior["bins"].shape[0]:
        raise UserError(f"config key 'k': {cfg.k} neighbours, but the prior {cfg.prior} has "
                        f"{prior['bins'].shape[0]} bins")
    try:
        return prior, build_target(cfg, prior)
    except ValueError as e:
        raise UserError(f"target of loss '{cfg.loss}': {e}") from None


def check_model(cfg: PretextConfig, target: Target) -> None:
    """Build the network on the meta device (shapes only, no memory) and run one training forward at the configured
    size: unknown or impossible ``model_kwargs`` (a negative width), a crop the network cannot take (a timm ViT of
    another size) or sampled points for a network without them are refused before anything is allocated."""
    kwargs = model_kwargs(cfg, target)
    pretrained = kwargs.get("pretrained")
    if pretrained and not Path(str(pretrained)).is_file():
        raise UserError(f"model_kwargs.pretrained {pretrained}: file not found")
    meta_kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    what = f"model '{cfg.model}' with {kwargs}"
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Initializing zero-element tensors is a no-op": the error says it
            net = models.create_model(cfg.model, **meta_kwargs).train()
            empty = [n for n, p in net.named_parameters() if p.numel() == 0]
            if empty:
                raise UserError(f"{what}: layer '{empty[0]}' has no weights (a width of 0?)")
            if cfg.points_per_image > 0 and not getattr(net, "supports_points", False):
                raise UserError(f"points_per_image: {cfg.model} does not train on sampled points "
                                "(vgg16_hypercolumn does); set points_per_image=0")
            x = torch.zeros(2, 1, cfg.size, cfg.size)
            out, ab_t = output_and_targets(net, x, torch.zeros(2, 2, cfg.size, cfg.size), cfg, None)
    except UserError:
        raise
    except NotImplementedError as e:  # an operator without a meta kernel: the real build will tell
        log.debug("meta-device check of %s skipped: %s", what, e)
        return
    except Exception as e:  # noqa: BLE001 - whatever a builder raises for the user's model settings
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if "meta" in msg.lower():  # the network reads tensor values (e.g. .item()) while built: check skipped
            log.debug("meta-device check of %s skipped: %s", what, msg)
            return
        raise UserError(f"{what} at size {cfg.size}: {msg}") from None
    if out.shape[1] != target.out_channels:
        raise UserError(f"{what}: {out.shape[1]} output channels, the target {target.name} needs "
                        f"{target.out_channels}")


def check_resumable(ckpt: dict, path, cfg: PretextConfig, target: Target, allow_change: bool) -> None:
    """``ckpt`` is a pretext checkpoint of this network, and the config keeps its recipe (:data:`GUARDED`)."""
    if ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a crosschannel pretext checkpoint (format {ckpt.get('format')!r}, expected "
                        f"{FORMAT!r})")
    have = (ckpt.get("model_name"), ckpt.get("model_kwargs"))
    want = (cfg.model, model_kwargs(cfg, target))
    if have != want:
        raise UserError(f"{path} holds a {have[0]} network {have[1]}; this config builds {want[0]} {want[1]}: its "
                        "weights cannot be loaded (resume with the checkpoint's config, or start a new run)")
    if ckpt.get("config") is not None:
        changes = config_changes(ckpt["config"], config_to_dict(cfg))
        guarded = [k for k in changes if k in GUARDED]
        if guarded and not allow_change:
            what = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in guarded)
            raise UserError(f"resuming {path} with a changed config ({what}); pass --allow-config-change to continue "
                            "anyway (recorded in config_history.jsonl)")


def record_resume(ckpt: dict, path: str, cfg: PretextConfig, allow_change: bool) -> None:
    """Main process, run folder locked: record config changes (``config_history.jsonl``; ``config.yaml`` is rewritten
    only then, saying so), and keep the log of the steps up to the checkpoint's (the steps redone are dropped, and a
    torn last line). A checkpoint from elsewhere (``--force``) puts the folder's old log aside."""
    out_dir = Path(cfg.out_dir)
    step = int(ckpt["step"])
    changes = check_resume_config(ckpt.get("config") or config_to_dict(cfg), config_to_dict(cfg), GUARDED,
                                  allow_change, out_dir, step)
    if changes or not (out_dir / "config.yaml").is_file():
        save_config(cfg, out_dir)
        if changes:
            text = (out_dir / "config.yaml").read_text()
            atomic_write_text(out_dir / "config.yaml", f"# resumed at step {step} with changes to "
                              f"{', '.join(changes)}; the values before: config_history.jsonl\n{text}")
    logf = out_dir / "log.jsonl"
    if Path(path).resolve() != checkpoint_path(cfg).resolve() and logf.is_file():
        aside = out_dir / f"log.replaced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        logf.rename(aside)
        log.warning("resuming from %s: the log of the run this folder held is now %s", path, aside.name)
    dropped = truncate_jsonl(logf, step)
    if dropped:
        log.info("log.jsonl: dropped %d record(s) of steps after the checkpoint's step %d (they are redone)",
                 dropped, step)


def init_batch(cfg: PretextConfig, dataset, target: Target, device: torch.device) -> torch.Tensor:
    """The model input of the data-dependent initialisation: ``init_images`` (default: one batch) readable, coloured
    training images, the same on every process and for every world size (a seeded draw, the crops of epoch 0)."""
    n = min(cfg.init_images or cfg.batch_size, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    items = [(i, (cfg.seed * 7_919 + j) % (2**63 - 1)) for j, i in enumerate(order[:n])]
    loader = torch.utils.data.DataLoader(dataset, batch_size=n, sampler=items, num_workers=cfg.workers,
                                         collate_fn=dataset.collate_fn, worker_init_fn=ignore_stop_signals)
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


def _run(cfg: PretextConfig, resume: Optional[str], ckpt: Optional[dict], dataset, prior: Optional[dict],
         target: Target, dist_info: DistInfo, device: torch.device, stop: GracefulStop) -> int:
    out_dir = Path(cfg.out_dir)
    if dist_info.is_main and ckpt is None:
        save_config(cfg, out_dir)
    seed_everything(cfg.seed + dist_info.rank)
    kwargs = model_kwargs(cfg, target)
    try:
        model = models.create_model(cfg.model, **kwargs).to(device)
    except (ValueError, TypeError) as e:
        raise UserError(f"model '{cfg.model}' with {kwargs}: {e}") from None
    if ckpt is None and cfg.init != "default":  # step 0 only: a resumed run loads its weights
        initialise(cfg, model, init_batch(cfg, dataset, target, device))
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    points_gen = torch.Generator().manual_seed(cfg.seed * 31 + dist_info.rank)
    state = dict(step=0, epoch=0, batch_in_epoch=0, skipped=0, grey=0, unreadable=[])
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{resume}: its weights do not fit this network "
                            f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        states = ckpt["rng_per_rank"]
        if len(states) == dist_info.world_size:
            set_rng_state(states[dist_info.rank]["rng"])
            points_gen.set_state(states[dist_info.rank]["points_rng"])
        else:
            log.warning("checkpoint written by %d processes, resuming with %d: RNG streams restart from the seed",
                        len(states), dist_info.world_size)
        state.update({k: ckpt[k] for k in state if k in ckpt})
        dataset.restore_unreadable(state["unreadable"])  # already logged by the earlier run; still counted
        state["skipped"] = max(state["skipped"], dataset.num_unreadable())
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

        # events of the steps after the checkpoint's (redone now) are purged, as in log.jsonl
        purge = state["step"] + 1 if (out_dir / "tensorboard").is_dir() else None
        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
    grid_rgb = grid_batch(cfg, cfg.num_grid_images) if dist_info.is_main and cfg.image_every > 0 else None
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not (dist_info.is_main and cfg.progress))
    t_start = time.time()
    done = state["step"] >= cfg.max_steps
    # the sampler runs in the main process, so workers can persist across epochs (set_epoch still applies); workers
    # ignore stop signals: the main process finishes its step, writes the checkpoint and shuts them down
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=cfg.workers > 0, collate_fn=dataset.collate_fn,
                                         worker_init_fn=ignore_stop_signals)
    while not done:
        start_batch = state["batch_in_epoch"]
        if start_batch >= sampler.batches_per_epoch:
            state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
            start_batch = 0
        sampler.set_epoch(state["epoch"], start_batch)
        done = train_one_epoch(model, optimizer, scaler, loader, target, prior, cfg, state, dist_info, device,
                               amp_dtype, points_gen, logger, writer, bar, grid_rgb, t_start, stop)
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
    if state.get("stopped"):
        if dist_info.is_main:
            log.warning("stopped by %s at step %d (checkpoint %s); resume with: %s",
                        stop.name or "a signal to another process", state["step"], checkpoint_path(cfg),
                        resume_command())
        return stop.exit_code  # 0 on a process that only followed the others
    if dist_info.is_main:
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
