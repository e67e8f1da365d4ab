"""Fine-tune on PASCAL VOC2007 multi-label classification: Zhang et al. ECCV16 Table 2, classification columns.

    python -m transfer.classification -c configs/transfer/voc07_cls_alexnet_cc_gray.yaml \
        --set voc=/data/VOCdevkit/VOC2007 --set checkpoint=runs/alexnet_cc/checkpoint.pth
    torchrun --nproc_per_node=4 -m transfer.classification -c ... [--resume]

The protocol is philkr/voc-classification ``src/train_cls.py`` (as richzhang/colorization's
``feature_learning_tests/run_classification_test_*.sh`` run it; see PROVENANCE.md): freeze levels ``fc8`` (train
only the new classifier on drop7), ``fc6-8`` (train from pool5) and ``all`` (train from conv1); SGD momentum 0.9,
lr 1e-3 (biases x2), x0.5 every 10k iterations, 80k iterations of batch 16, weight decay 1e-6, gradient-norm clip
10; random square crops of side 227*s, s ~ U(0.5, min(2, H/227, W/227)), resized to 227, random flips; sigmoid
cross-entropy summed over the labels that are not difficult, divided by the batch size. Evaluation: 10 passes of
that same random transform over the test set, logits summed, scikit-learn AP per class on the non-difficult labels,
mAP over the 20 classes; the VOC07 11-point AP beside it.

One command gives Table 2's rows: ``rows`` (colorization, random, supervised) x ``freeze`` (fc8, fc6-8, all), each
in ``out_dir/<row>_<freeze>/`` with its checkpoint, logs, ``results.json``, ``scores.csv`` (image id, 20 summed
logits) and ``ap_per_class.png``; ``out_dir/results.{json,md}`` and ``out_dir/ap_per_class.png`` put all runs and
the published numbers side by side. ``--resume`` skips finished runs and continues the others exactly.

Every setting is checked before the run folder is created (each key's limits, the data, each row's backbone against
the crop). The folder is locked while a run writes it. SIGTERM, SIGINT and SIGUSR1 (SLURM ``--signal=USR1@90``)
finish the step, write a checkpoint and exit with 128 + signal, printing the command that continues with
``--resume``. A resume refuses another run's checkpoint (``--force``) and a changed recipe (:data:`GUARDED`,
``--allow-config-change``, then recorded in ``config_history.jsonl``), and drops the log records after the checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pretext.data import UnreadableImage, pil_to_tensor, read_image
from pretext.runtime import (
    open_run_dir,
    held_logs,
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
    save_checkpoint,
    save_config,
    set_rng_state,
    setup_logging,
    truncate_jsonl,
    validate_config,
)

from .backbone import INPUT_MODES, RANDOM_INITS, TransferNet, build_backbone, describe
from .sampling import EvalSampler, IterationSampler, seed_of
from .voc import LABEL_SOURCES, VOC_CLASSES, load_voc_split, sklearn_ap, voc07_11pt_ap

FORMAT = "crosschannel/transfer-cls-v1"
FREEZE_LEVELS = {"fc8": None, "fc6-8": "fc6", "all": ""}  #: level -> first trained stage (None: only fc8; "": all)
ROWS = ("colorization", "random", "supervised")
PUBLISHED_METHOD = {"colorization": "zhang_alexnet_cc", "supervised": "imagenet_supervised", "random": "gaussian"}


#: keys that make a resumed run another experiment (refused unless --allow-config-change): the data, the backbone,
#: the crops, the batch and the solver. Evaluation and runtime keys (test_split, eval_*, max_iter, workers, ...) may
#: change; every change that goes ahead is recorded in the run's config_history.jsonl.
GUARDED = ("voc", "train_split", "labels", "fallback_split", "checkpoint", "random_init", "supervised", "input",
           "rescale", "init_images", "dropout", "crop", "min_scale", "max_scale", "flip", "batch_size", "lr",
           "bias_lr_mult", "momentum", "weight_decay", "lr_step", "lr_gamma", "grad_clip", "fc8_std", "fc8_bias", "seed")


@dataclasses.dataclass(frozen=True)
class ClsConfig:
    # data
    voc: str = ""  #: VOCdevkit/ or VOCdevkit/VOC2007/
    train_split: str = "trainval"
    test_split: str = "test"
    labels: str = param("imagesets", choices=LABEL_SOURCES)  #: imagesets (<class>_<split>.txt, as philkr) | xml | auto
    fallback_split: str = param("error", choices=("error", "all", "random"))  #: without ImageSets/Main/<split>.txt
    # what is fine-tuned (Table 2 rows x columns)
    checkpoint: str = ""  #: pretext checkpoint (row 'colorization')
    random_init: str = param("gaussian", choices=RANDOM_INITS)  #: row 'random'
    supervised: str = ""  #: row 'supervised': alexnet:WEIGHTS | vgg16:WEIGHTS (torchvision state dict)
    rows: list[str] = param(default_factory=lambda: ["colorization"], choices=ROWS)
    freeze: list[str] = param(default_factory=lambda: ["fc8", "fc6-8", "all"], choices=tuple(FREEZE_LEVELS))
    input: str = param("gray", choices=INPUT_MODES)  #: gray (L) | color (Lab; conv1's ab weights start at zero)
    rescale: bool = True  #: the release's magic_init rescaling of the checkpoint before fine-tuning
    init_images: int = param(80, ge=0, le=10_000)  #: training images (random crops) for the rescaling / data-dependent init
    dropout: float = param(0.5, ge=0, lt=1)  #: drop6 / drop7
    # protocol (philkr/voc-classification src/train_cls.py)
    crop: int = param(227, ge=32, le=1024)  #: AlexNet / VGG with fc6: 227 (checked against the backbone up front)
    min_scale: float = param(0.5, gt=0, le=16)
    max_scale: float = param(2.0, gt=0, le=16)
    flip: bool = True
    batch_size: int = param(16, ge=1, le=4096)  #: global, split over the processes
    max_iter: int = param(80_000, ge=1, le=100_000_000)
    lr: float = param(1e-3, gt=0, le=10)
    bias_lr_mult: float = param(2.0, ge=0, le=100)
    momentum: float = param(0.9, ge=0, lt=1)
    weight_decay: float = param(1e-6, ge=0, le=1)  #: on weights and biases (train_cls.py: setDecay(t, 1, 1))
    lr_step: int = param(10_000, ge=1)
    lr_gamma: float = param(0.5, gt=0, le=1)
    grad_clip: float = param(10.0, ge=0)  #: 0: off
    fc8_std: float = param(0.01, ge=0, le=10)
    fc8_bias: float = param(0.1, ge=-100, le=100)
    # evaluation
    eval_crop: str = param("random", choices=("random", "center"))  #: random (passes of the training transform) | center
    eval_passes: int = param(10, ge=1, le=1000)
    eval_every: int = param(0, ge=0)  #: also evaluate every N iterations (0: only at the end)
    # runtime
    out_dir: str = "runs/transfer_cls"
    workers: int = param(4, ge=0, le=256)
    amp: str = param("auto", choices=("auto", "bf16", "fp16", "none"))  #: CUDA only
    channels_last: bool = True  #: CUDA only
    checkpoint_every: int = param(1000, ge=1)
    log_every: int = param(20, ge=1)
    tensorboard: bool = True
    seed: int = param(0, ge=0, lt=2**63)
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        """Combinations of keys (each key's own limits are declared above); run by ``load_config``."""
        if not self.voc:
            raise UserError("no VOC data: --voc VOCdevkit/VOC2007 (or --set voc=...)")
        for k in ("train_split", "test_split", "out_dir"):
            if not getattr(self, k).strip():
                raise UserError(f"config key '{k}': must not be empty")
        if not self.rows or not self.freeze:
            raise UserError(f"rows must be among {ROWS} and freeze among {tuple(FREEZE_LEVELS)} (got none)")
        if self.min_scale > self.max_scale:
            raise UserError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if "colorization" in self.rows and not self.checkpoint:
            raise UserError("row 'colorization' needs a pretext checkpoint: --checkpoint PATH (or --set checkpoint=...)")
        if "supervised" in self.rows and not self.supervised:
            raise UserError("row 'supervised' needs torchvision weights: --set supervised=alexnet:/path/alexnet.pth")
        if self.rescale and self.init_images == 0 and "colorization" in self.rows:
            raise UserError("rescale needs init_images > 0 (or --set rescale=false)")
        if self.device not in ("auto", ""):
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise UserError(f"config key 'device': not a device name: {self.device!r} (auto, cpu, cuda, cuda:1, mps)"
                                ) from None


def check_config(cfg: ClsConfig, world: int = 1) -> None:
    """Refuse bad settings before any folder is created or memory allocated: every key's declared limits and the
    combinations (:meth:`ClsConfig.validate`), then what depends on the number of processes."""
    validate_config(cfg)
    if cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} (global) is not divisible by the {world} processes")


# --------------------------------------------------------------------------------------------- data
def crop_params(h: int, w: int, crop: int, min_scale: float, max_scale: float, flip: bool,
                g: torch.Generator | None, center: bool = False) -> tuple[float, float, float, bool]:
    """(side, centre x, centre y, flip) of philkr's random square crop (Caffe TransformationLayer, philkr/caffe
    ``future``): s ~ U(min(min_scale, s_max), s_max) with s_max = min(max_scale, H/crop, W/crop), side crop*s,
    centred at the image centre plus a uniform offset that keeps it inside. ``center``: the mean scale, centred,
    not flipped."""
    smax = min(max_scale, h / crop, w / crop)
    smin = min(min_scale, smax)
    u = torch.rand(4, generator=g).tolist() if not center else [0.5, 0.5, 0.5, 1.0]
    s = smin + (smax - smin) * u[0]
    side = crop * s
    ox, oy = (w - min(side, w)) / 2, (h - min(side, h)) / 2
    return side, w / 2 + (2 * u[1] - 1) * ox, h / 2 + (2 * u[2] - 1) * oy, flip and not center and u[3] < 0.5


def square_crop(img: torch.Tensor, side: float, cx: float, cy: float, flip: bool, crop: int) -> torch.Tensor:
    """Resample the square (side, centre) of ``img`` (C, H, W) to (C, crop, crop) bilinearly, output pixel x reading
    input cx + (side/crop) * (x - crop/2) (mirrored for ``flip``), pixel centres at integer positions and the last
    pixel repeated at the border, as the Caffe layer does."""
    _, h, w = img.shape
    s = side / crop
    t = torch.arange(crop, dtype=torch.float32) - crop / 2
    xs = cx + s * (-t if flip else t)
    ys = cy + s * t
    gx = xs / max(w - 1, 1) * 2 - 1
    gy = ys / max(h - 1, 1) * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).unsqueeze(0)
    return F.grid_sample(img.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


class VOCClassification(torch.utils.data.Dataset):
    """VOC images with their 20 labels; items are ``(rgb crop (3, crop, crop) in [0, 1], labels int8 (20,), index,
    ok)``. Indexed by ``(index, seed)``: the crop is drawn from ``seed``, so every run sees the same crops."""

    def __init__(self, paths, labels: np.ndarray, cfg: ClsConfig, center: bool = False):
        self.paths, self.labels, self.cfg, self.center = list(paths), torch.from_numpy(labels), cfg, center

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        i, seed = item
        c = self.cfg
        try:
            img = pil_to_tensor(read_image(self.paths[i]))
        except UnreadableImage:
            return torch.zeros(3, c.crop, c.crop), self.labels[i], i, False
        g = torch.Generator().manual_seed(int(seed))
        side, cx, cy, flip = crop_params(img.shape[1], img.shape[2], c.crop, c.min_scale, c.max_scale, c.flip, g,
                                         self.center)
        return square_crop(img, side, cx, cy, flip, c.crop), self.labels[i], i, True


# --------------------------------------------------------------------------------------------- model, loss
class Classifier(nn.Module):
    """Backbone + new fc8 (N(0, std), bias ``bias``): fc7 (drop7) -> 20 logits; encoders without fc6/fc7 (zhang_vgg,
    timm) are average-pooled. Frozen stages keep BatchNorm in eval mode (statistics would drift otherwise); dropout
    stays active in training as in Caffe, whatever the learning rate."""

    def __init__(self, backbone: TransferNet, num_classes: int = 20, std: float = 0.01, bias: float = 0.1,
                 dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        for m in backbone.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
        self.fc8 = nn.Linear(backbone.num_features, num_classes)
        with torch.no_grad():
            self.fc8.weight.normal_(0, std)
            self.fc8.bias.fill_(bias)
        self.frozen_stages: list[str] = []  #: set by :func:`freeze`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        if f.dim() == 4:
            if self.backbone.has_fc and f.shape[-2:] != (1, 1):
                raise UserError(f"a {x.shape[-1]} px crop gives a {f.shape[-2]}x{f.shape[-1]} fc7 map; "
                                f"{self.backbone.arch}'s fc6 needs 227 px (crop: 227)")
            f = f.flatten(1) if self.backbone.has_fc else f.mean((2, 3))
        return self.fc8(f)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        for stage in self.frozen_stages:
            for m in getattr(self.backbone, stage).modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def freeze(model: Classifier, level: str) -> list[str]:
    """Set ``requires_grad`` for a Table 2 freeze level; returns the names of the trained parameters."""
    net = model.backbone
    first = FREEZE_LEVELS[level]
    if first == "fc6" and not net.has_fc:
        raise UserError(f"freeze level 'fc6-8' needs fc6/fc7; {net.arch} has none (use fc8 or all)")
    trained = set(net.stage_names if first == "" else net.stages_from(first) if first else [])
    for n, p in net.named_parameters():
        p.requires_grad_(n.split(".")[0] in trained)
    model.frozen_stages = [s for s in net.stage_names if s not in trained]
    return [n for n, p in model.named_parameters() if p.requires_grad]


def sigmoid_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """philkr's ``SigmoidCrossEntropyLoss`` layer: binary cross-entropy with logits summed over the labels that are
    not difficult (``labels`` int (B, C): 1 present, -1 absent, 0 difficult = ignored), divided by the batch size B.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, also under autocast
    mask = (labels != 0).to(logits.dtype)
    target = (labels > 0).to(logits.dtype)
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per * mask).sum() / logits.shape[0]


def build_optimizer(model: nn.Module, cfg: ClsConfig) -> torch.optim.SGD:
    """SGD with Caffe's multipliers: weights lr x1, biases lr x ``bias_lr_mult``; decay x1 on both (train_cls.py)."""
    weights, biases = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (biases if n.endswith("bias") else weights).append(p)
    groups = [{"params": weights, "lr_mult": 1.0}, {"params": biases, "lr_mult": cfg.bias_lr_mult}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_at(cfg: ClsConfig, it: int) -> float:
    """Caffe's ``step`` policy: lr * gamma ^ floor(it / stepsize)."""
    return cfg.lr * cfg.lr_gamma ** (it // cfg.lr_step)


def fingerprints(model: nn.Module, names: list[str]) -> dict[str, str]:
    """SHA-256 of the bytes of each named parameter (bit-identity checks without a copy of the weights)."""
    params = dict(model.named_parameters())
    return {n: hashlib.sha256(params[n].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            .hexdigest() for n in names}


# --------------------------------------------------------------------------------------------- train / evaluate
def train_one_epoch(model, optimizer, scaler, loader, cfg: ClsConfig, state: dict, device, amp_dtype,
                    logger: JsonlLogger, writer, bar, world: int, stop: GracefulStop | None = None) -> bool:
    """Run the iterations the loader's sampler holds (one pass over the training images, or what is left of it);
    returns True when a stop signal ended them (after the step, all ranks agreeing, with a checkpoint written)."""
    model.train()
    net = _unwrap(model).backbone
    window_t, window_n = time.time(), 0
    fault = int(os.environ.get("CROSSCHANNEL_FAULT_AT_STEP", "0"))  # crash injection for the resume test
    for rgb, labels, _, ok in loader:
        it = state["iter"]
        rgb, labels = rgb.to(device, non_blocking=True), labels.to(device)
        labels = labels * ok.to(device).view(-1, 1).to(labels.dtype)  # an unreadable image contributes nothing
        state["skipped"] += int((~ok).sum())
        x = net.prepare(rgb)
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = sigmoid_cross_entropy(logits, labels)
        lr = lr_at(cfg, it)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip) \
            if cfg.grad_clip > 0 else torch.zeros(())
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state["iter"] = it = it + 1
        window_n += rgb.shape[0] * world
        if bar is not None:
            bar.update(1)
        nonfinite, stopping = any_process([not math.isfinite(loss.item()), stop is not None and stop.requested],
                                          device)
        if nonfinite:
            raise UserError(f"loss is not finite at iteration {it}; lower lr or check the data")
        if it % cfg.log_every == 0 or it == cfg.max_iter:
            loss_avg = all_reduce_sum(loss.detach().float().clone()).item() / world
            ips = window_n / max(time.time() - window_t, 1e-9)
            window_t, window_n = time.time(), 0
            rec = dict(kind="train", iter=it, loss=loss_avg, lr=lr, grad_norm=float(gnorm), img_per_s=ips,
                       skipped=state["skipped"])
            logger.log(**rec)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_avg:.3f}", img_s=f"{ips:.1f}")
            if writer is not None:
                for k in ("loss", "lr", "grad_norm", "img_per_s"):
                    writer.add_scalar(f"train/{k}", rec[k], it)
        if it % cfg.checkpoint_every == 0 or it == cfg.max_iter or stopping:
            state["save"](it)
        if fault and it == fault:
            os.kill(os.getpid(), signal.SIGKILL)
        if stopping:
            return True
    return False


@torch.no_grad()
def evaluate(model, dataset: VOCClassification, cfg: ClsConfig, device, amp_dtype, rank: int, world: int,
             progress: bool = False) -> tuple[np.ndarray, list[int]]:
    """Summed logits (N, 20) over ``eval_passes`` passes of the random training transform (or one centre crop)."""
    model.eval()
    net = _unwrap(model).backbone
    passes = cfg.eval_passes if cfg.eval_crop == "random" else 1
    sampler = EvalSampler(len(dataset), passes, rank, world, cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(1, cfg.batch_size // world), sampler=sampler,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator())  # leaves the global RNG (dropout) alone
    scores = np.zeros((len(dataset), len(VOC_CLASSES)), np.float64)
    bad = []
    for rgb, _, idx, ok in tqdm(loader, desc="evaluate", disable=not progress, leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(net.prepare(rgb.to(device)))
        np.add.at(scores, idx.numpy(), logits.float().cpu().numpy())
        bad += idx[~ok].tolist()
    parts = all_gather_objects((scores, bad))
    return sum(p[0] for p in parts), sorted({i for p in parts for i in p[1]})


def ap_table(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Per-class AP (scikit-learn, philkr's tie-break; and VOC07 11-point) and their means over the classes."""
    ap, ap11 = {}, {}
    for c, name in enumerate(VOC_CLASSES):
        has_pos = (labels[:, c] > 0).any()
        ap[name] = sklearn_ap(scores[:, c], labels[:, c]) if has_pos else None
        ap11[name] = voc07_11pt_ap(scores[:, c], labels[:, c]) if has_pos else None
    mean = lambda d: float(np.mean([v for v in d.values() if v is not None])) if any(v is not None for v in d.values()) else None  # noqa: E731
    return {"mAP": mean(ap), "mAP_voc07_11pt": mean(ap11), "ap": ap, "ap_voc07_11pt": ap11,
            "num_classes_evaluated": sum(v is not None for v in ap.values())}


# --------------------------------------------------------------------------------------------- one run
def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _init_batch(dataset: VOCClassification, n: int, seed: int) -> torch.Tensor | None:
    """``n`` training crops (the first images of a seeded permutation) for the rescaling / data-dependent init."""
    if n == 0:
        return None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    crops = [dataset[(order[k % len(dataset)], seed_of(seed, "init", k))] for k in range(n)]
    return torch.stack([c[0] for c in crops if c[3]])


def run_one(cfg: ClsConfig, row: str, level: str, run_dir: Path, resume: str | None, data, dist_info, device,
            stop: GracefulStop | None = None) -> dict | None:
    """Fine-tune one (row, freeze level) and evaluate it; returns its results (also written to ``run_dir``), or None
    when a stop signal ended the training (a checkpoint is written)."""
    train_ds, test_ds = data
    rank, world, main = dist_info.rank, dist_info.world_size, dist_info.is_main
    torch.manual_seed(cfg.seed)
    src = dict(checkpoint=cfg.checkpoint if row == "colorization" else None,
               supervised=cfg.supervised if row == "supervised" else None,
               random_init=(cfg.random_init if not resume else "gaussian") if row == "random" else None)
    needs_images = not resume and ((row == "colorization" and cfg.rescale) or (row == "random" and cfg.random_init != "gaussian"))
    images = _init_batch(train_ds, cfg.init_images, cfg.seed) if needs_images else None
    backbone = build_backbone(**src, input=cfg.input, images=images, rescale=cfg.rescale and not resume,
                              seed=cfg.seed, device=device)
    model = Classifier(backbone, len(VOC_CLASSES), cfg.fc8_std, cfg.fc8_bias, cfg.dropout).to(device)
    trained = freeze(model, level)
    torch.manual_seed(seed_of(cfg.seed, "dropout", rank))  # the same model on every rank, its own dropout masks
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state = dict(iter=0, skipped=0)
    info = dict(backbone.info)
    if resume:
        ckpt = load_checkpoint(resume)  # its kind and config were checked by check_resumable
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{resume}: does not fit this run's network ({str(e).splitlines()[0][:200]})") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng_per_rank"]) == world:
            set_rng_state(ckpt["rng_per_rank"][rank])
        else:
            log.warning("checkpoint written by %d processes, resuming with %d: random streams restart",
                        len(ckpt["rng_per_rank"]), world)
        state.update(iter=ckpt["iter"], skipped=ckpt["skipped"])
        info = ckpt["backbone_info"]
        if main:  # the steps after the checkpoint are redone: their records go (and a torn last line)
            truncate_jsonl(run_dir / "log.jsonl", state["iter"], key="iter")
        log.info("%s: resumed from %s at iteration %d", run_dir.name, resume, state["iter"])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    before = fingerprints(model, frozen)
    raw = model
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    log.info("%s: %s; trains %d of %d tensors (%s)", run_dir.name, describe(backbone), len(trained),
             len(trained) + len(frozen), level)

    def save(it: int) -> None:
        rng = all_gather_objects(get_rng_state())
        if main:
            save_checkpoint({"format": FORMAT, "row": row, "freeze": level, "input": cfg.input, "iter": it,
                             "skipped": state["skipped"], "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else None, "rng_per_rank": rng,
                             "backbone_info": info, "config": config_to_dict(cfg)}, run_dir / "checkpoint.pth")
        barrier()

    state["save"] = save
    logger = JsonlLogger(run_dir / "log.jsonl", enabled=main)
    writer = None
    if cfg.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    b = cfg.batch_size // world
    sampler = IterationSampler(len(train_ds), b, rank, world, cfg.seed)
    # crops are seeded by the sampler; the loader's own generator keeps the global RNG (dropout) a function of the
    # iteration alone, so a resumed run draws the same masks as an uninterrupted one
    loader = torch.utils.data.DataLoader(train_ds, batch_size=b, sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                                         worker_init_fn=ignore_stop_signals, generator=torch.Generator())
    per_epoch = max(1, math.ceil(len(train_ds) / cfg.batch_size))
    bar = tqdm(total=cfg.max_iter, initial=state["iter"], desc=run_dir.name, unit="it", dynamic_ncols=True,
               disable=not (main and cfg.progress))
    t0, it0 = time.time(), state["iter"]
    stopped = False
    while state["iter"] < cfg.max_iter and not stopped:
        start = state["iter"]
        end = min(cfg.max_iter, (start // per_epoch + 1) * per_epoch)
        if cfg.eval_every:
            end = min(end, (start // cfg.eval_every + 1) * cfg.eval_every)
        sampler.set_range(start, end)
        stopped = train_one_epoch(model, optimizer, scaler, loader, cfg, state, device, amp_dtype, logger, writer,
                                  bar, world, stop)
        if stopped:
            break
        if cfg.eval_every and state["iter"] % cfg.eval_every == 0 and state["iter"] < cfg.max_iter:
            s, _ = evaluate(model, test_ds, cfg, device, amp_dtype, rank, world)
            m = ap_table(s, test_ds.labels.numpy())["mAP"]
            logger.log(kind="eval", iter=state["iter"], mAP=m)
            if writer is not None and m is not None:
                writer.add_scalar("test/mAP", m, state["iter"])
    bar.close()
    sec_per_iter = (time.time() - t0) / max(1, state["iter"] - it0)
    changed = [n for n, h in fingerprints(raw, frozen).items() if h != before[n]]
    if changed:
        raise RuntimeError(f"{run_dir.name}: frozen parameters changed during training ({changed[:5]}): results invalid")
    if stopped:
        if writer is not None:
            writer.close()
        return None
    scores, bad = evaluate(model, test_ds, cfg, device, amp_dtype, rank, world, progress=main and cfg.progress)
    if bad:
        raise UserError(f"{test_ds.paths[bad[0]]}: unreadable test image ({len(bad)} in all): the VOC test set must be "
                        "complete for a comparable AP")
    labels = test_ds.labels.numpy()
    res = {"row": row, "freeze": level, "input": cfg.input, "iterations": state["iter"], **ap_table(scores, labels),
           "num_train": len(train_ds), "num_test": len(test_ds), "skipped_train_samples": state["skipped"],
           "eval": f"{cfg.eval_passes if cfg.eval_crop == 'random' else 1} x {cfg.eval_crop} crop, logits summed",
           "frozen_check": f"{len(frozen)} frozen tensors bit-identical after training",
           "seconds_per_iter": round(sec_per_iter, 4), "published_mAP": _published(row, level, cfg.input),
           "backbone": info}
    if main:
        write_run_outputs(run_dir, res, scores, test_ds)
        if writer is not None:
            if res["mAP"] is not None:
                writer.add_scalar("test/mAP", res["mAP"], state["iter"])
            writer.close()
    barrier()
    return res


# --------------------------------------------------------------------------------------------- outputs
def _published(row: str, level: str, inp: str) -> float | None:
    from pretext.published import published

    rows = published("voc07_cls", method=PUBLISHED_METHOD[row], setting=f"{level}/{inp}", metric="mAP")
    return rows[0]["value"] if rows else None


def write_run_outputs(run_dir: Path, res: dict, scores: np.ndarray, test_ds: VOCClassification) -> None:
    atomic_write_text(run_dir / "results.json", json.dumps(res, indent=2))
    lines = ["image_id," + ",".join(VOC_CLASSES)]
    lines += [p.stem + "," + ",".join(f"{v:.6g}" for v in s) for p, s in zip(test_ds.paths, scores)]
    atomic_write_text(run_dir / "scores.csv", "\n".join(lines) + "\n")
    plot_ap({run_dir.name: res}, run_dir / "ap_per_class.png")


def plot_ap(results: dict[str, dict], png: Path) -> None:
    """Grouped bars: AP per class (%) for each run, mAP in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    k = len(results)
    x = np.arange(len(VOC_CLASSES))
    for j, (name, r) in enumerate(results.items()):
        vals = [100 * v if v is not None else 0 for v in r["ap"].values()]
        m = f"{100 * r['mAP']:.1f}" if r["mAP"] is not None else "n/a"
        ax.bar(x + (j - (k - 1) / 2) * 0.8 / k, vals, 0.8 / k, label=f"{name} (mAP {m})")
    ax.set_xticks(x, VOC_CLASSES, rotation=45, ha="right")
    ax.set(ylabel="AP (%)", ylim=(0, 100), title="VOC classification: AP per class")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_summary(out_dir: Path, results: dict[str, dict], cfg: ClsConfig) -> None:
    """``results.json`` / ``results.md`` / ``ap_per_class.png`` over all runs, published numbers beside ours."""
    pct = lambda v: f"{100 * v:.1f}" if v is not None else "n/a"  # noqa: E731
    rows = []
    for name, r in results.items():
        pub = r.get("published_mAP")
        rows.append(f"| {r['row']} | {r['freeze']} | {r['input']} | {pct(r['mAP'])} | {pct(r['mAP_voc07_11pt'])} | "
                    f"{f'{pub:.1f}' if pub is not None else '-'} | {r['iterations']} |")
    md = ["# VOC classification fine-tuning (Zhang et al. Table 2, classification)", "",
          f"Data: `{cfg.voc}` ({cfg.train_split} -> {cfg.test_split}); input {cfg.input}; evaluation: "
          f"{next(iter(results.values()))['eval']}. mAP: scikit-learn AP per class (philkr/voc-classification), "
          "mean over the classes with positives; VOC07 11-point beside it. Published: Zhang et al. ECCV16 Table 2 "
          "(see pretext/data/published.tsv).", "",
          "| row | freeze | input | mAP (%) | VOC07 11-pt mAP (%) | published mAP (%) | iterations |",
          "|---|---|---|---|---|---|---|", *rows, "", "## AP per class (%)", "",
          "| class | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for c in VOC_CLASSES:
        md.append(f"| {c} | " + " | ".join(pct(r["ap"][c]) for r in results.values()) + " |")
    atomic_write_text(out_dir / "results.md", "\n".join(md) + "\n")
    atomic_write_text(out_dir / "results.json", json.dumps({"config": config_to_dict(cfg), "runs": results}, indent=2))
    plot_ap(results, out_dir / "ap_per_class.png")


# --------------------------------------------------------------------------------------------- entry point
def get_dataset(cfg: ClsConfig) -> tuple[VOCClassification, VOCClassification]:
    kw = dict(fallback=cfg.fallback_split, labels=cfg.labels, box_check="ignore", seed=cfg.seed)
    tr_paths, tr_labels, tr_note = load_voc_split(cfg.voc, cfg.train_split, **kw)
    te_paths, te_labels, te_note = load_voc_split(cfg.voc, cfg.test_split, **kw)
    log.info("VOC %s: %d images (%s); %s: %d images (%s)", cfg.train_split, len(tr_paths), tr_note, cfg.test_split,
             len(te_paths), te_note)
    return (VOCClassification(tr_paths, tr_labels, cfg),
            VOCClassification(te_paths, te_labels, cfg, center=cfg.eval_crop == "center"))


def check_geometry(cfg: ClsConfig) -> None:
    """Before anything is created: each row's backbone (weights files read, no rescaling) takes a ``crop`` px crop
    to what fc8 reads (a 1x1 fc7 map for nets with fc6/fc7). Refuses a crop that is too small or too large for it,
    and a checkpoint or weights file that cannot be read, in one line."""
    for row in cfg.rows:
        src = dict(checkpoint=cfg.checkpoint if row == "colorization" else None,
                   supervised=cfg.supervised if row == "supervised" else None,
                   random_init="gaussian" if row == "random" else None)
        with held_logs():  # what building says is said again when the run builds it
            net = build_backbone(**src, input=cfg.input, rescale=False, seed=cfg.seed, fc_dim=1)  # fc_dim: random row
        net.eval()
        try:
            with torch.no_grad():
                f = net(net.prepare(torch.zeros(1, 3, cfg.crop, cfg.crop)))
        except RuntimeError as e:
            raise UserError(f"crop {cfg.crop} px is too small for {net.arch} (row '{row}'): "
                            f"{str(e).splitlines()[0][:160]}") from None
        if f.dim() == 4 and net.has_fc and f.shape[-2:] != (1, 1):
            raise UserError(f"crop {cfg.crop} px gives a {f.shape[-2]}x{f.shape[-1]} fc7 map in {net.arch} (row '{row}'); "
                            "its fc6 needs 227 px (crop: 227)")


def check_resumable(path: str, row: str, level: str, cfg: ClsConfig, run_dir: Path, allow_change: bool, dist_info,
                    device, config: bool = True) -> None:
    """``path`` is a classification checkpoint of (``row``, ``level``) and, with ``config``, the config keeps its
    recipe (:data:`GUARDED`; other changes are recorded in ``config_history.jsonl`` by the main process). All ranks
    agree."""
    error = None
    if dist_info.is_main:
        try:
            ckpt = load_checkpoint(path)
            if ckpt.get("format") != FORMAT:
                what = ckpt.get("format") or ("a pretext checkpoint" if "model_name" in ckpt else "no format")
                raise UserError(f"{path}: not a VOC classification checkpoint ({what}); --resume takes a checkpoint "
                                "that this command wrote (give a pretext checkpoint with --checkpoint)")
            if (ckpt.get("row"), ckpt.get("freeze")) != (row, level):
                raise UserError(f"{path}: a checkpoint of run {ckpt.get('row')}_{ckpt.get('freeze')}, not {row}_{level}")
            if config:
                check_resume_config(ckpt.get("config") or {}, config_to_dict(cfg), GUARDED, allow_change, run_dir,
                                    ckpt.get("iter", 0))
        except UserError as e:
            error = e
    if any_process([error is not None], device)[0]:
        raise error or UserError(f"{path}: refused by the main process (see its error)")


def resume_command() -> str:
    """This process's command line with ``--resume`` (for the line printed after a stop signal)."""
    argv0 = sys.argv[0].replace(os.sep, "/")
    modules = {"pretext/cli.py": "pretext.cli", "transfer/cli.py": "transfer.cli",
               "transfer/classification.py": "transfer.classification"}
    prog = next((f"python -m {m}" for tail, m in modules.items() if argv0.endswith(tail)), Path(argv0).name)
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            if not a.startswith("-"):  # --resume PATH: the run folder's own checkpoint is the one to continue now
                continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        args.append(a)
    return shlex.join([*prog.split(), *args, "--resume"])


def main(args) -> int:
    extra = [f"{k}={getattr(args, k)}" for k in ("voc", "checkpoint") if getattr(args, k, None)]
    args.overrides = list(getattr(args, "overrides", None) or []) + extra
    cfg = config_from_args(ClsConfig, args)
    return run(cfg, getattr(args, "resume", None), getattr(args, "force", False),
               getattr(args, "allow_config_change", False))


def run(cfg: ClsConfig, resume: str | None = None, force: bool = False, allow_change: bool = False) -> int:
    """Every run of the plan (rows x freeze levels) in turn. Everything that can be checked is checked before the
    run folder is created; then the folder is locked (one process at a time), leftovers of killed writes are removed,
    and SIGTERM / SIGINT / SIGUSR1 end the training at a checkpoint with exit code 128 + signal."""
    check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    runs = [(r, f) for r in cfg.rows for f in cfg.freeze]
    if resume not in (None, "auto") and len(runs) > 1:
        raise UserError("--resume CHECKPOINT needs a single run (one row, one freeze level); use --resume")
    dist_info, device = init_distributed(cfg.device)
    lock = None
    try:
        out_dir = Path(cfg.out_dir)
        if dist_info.is_main and out_dir.is_dir():  # a folder in use: refused at once, in one line
            lock = RunLock(out_dir).acquire()
        setup_logging(None, dist_info.is_main)
        with held_logs() as held:
            data = get_dataset(cfg)  # a bad VOC folder is refused before the run folder is created
            check_geometry(cfg)  # so are a crop the backbone cannot take and an unreadable checkpoint
            if resume not in (None, "auto"):  # and a --resume file of another kind
                check_resumable(resume, runs[0][0], runs[0][1], cfg, out_dir, allow_change, dist_info, device,
                                config=False)
        if dist_info.is_main:
            lock = open_run_dir(out_dir, held, lock)
        barrier()
        plan = []
        for row, level in runs:
            run_dir = out_dir / f"{row}_{level}"
            latest = run_dir / "checkpoint.pth"
            own = resume == "auto" or (resume is not None and Path(resume).resolve() == latest.resolve())
            done = (run_dir / "results.json").is_file() and own  # finished: kept (another checkpoint: see resolve_resume)
            plan.append((row, level, run_dir, None if done else resolve_resume(resume, latest, force), done))
        for row, level, run_dir, ckpt, _ in plan:
            if ckpt:
                check_resumable(ckpt, row, level, cfg, run_dir, allow_change, dist_info, device)
        if dist_info.is_main:
            save_config(cfg, out_dir)
        results = {}
        with GracefulStop() as stop:
            for row, level, run_dir, ckpt, done in plan:
                if done:
                    log.info("%s: finished earlier, results kept", run_dir.name)
                    results[run_dir.name] = json.loads((run_dir / "results.json").read_text())
                    continue
                if any_process([stop.requested], device)[0]:  # a signal during the last evaluation
                    log.warning("%s received: stopped before run %s; continue with: %s", stop.name or "stop signal",
                                run_dir.name, resume_command())
                    return stop.exit_code
                if dist_info.is_main:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    remove_stale_tmp(run_dir)
                    (run_dir / "results.json").unlink(missing_ok=True)  # of a run that --force replaces
                r = run_one(cfg, row, level, run_dir, ckpt, data, dist_info, device, stop)
                if r is None:
                    log.warning("%s received: stopped run %s at a checkpoint (%s); continue with: %s",
                                stop.name or "stop signal", run_dir.name, run_dir / "checkpoint.pth", resume_command())
                    return stop.exit_code  # 0 on a rank that only followed the others
                results[run_dir.name] = r
                log.info("%s: mAP %s (VOC07 11-pt %s) over %d classes", run_dir.name,
                         f"{100 * r['mAP']:.2f}" if r["mAP"] is not None else "n/a",
                         f"{100 * r['mAP_voc07_11pt']:.2f}" if r["mAP_voc07_11pt"] is not None else "n/a",
                         r["num_classes_evaluated"])
        if dist_info.is_main:
            write_summary(out_dir, results, cfg)
            log.info("results: %s", out_dir / "results.md")
        return 0
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("transfer.classification", description="Fine-tune on PASCAL VOC classification "
                                "(Zhang et al. Table 2): rows x freeze levels, published numbers beside.")
    add_config_args(p)
    add_resume_arg(p)
    p.add_argument("--voc", help="VOCdevkit/ or VOCdevkit/VOC2007/ (same as --set voc=...)")
    p.add_argument("--checkpoint", help="pretext checkpoint to fine-tune (same as --set checkpoint=...)")
    return p


if __name__ == "__main__":
    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
