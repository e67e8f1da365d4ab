"""Fine-tune on PASCAL VOC semantic segmentation with FCN-32s: Zhang et al. ECCV16 Table 2, segmentation column.

    python -m transfer.segmentation -c configs/transfer/seg_fcn32s_alexnet_cc_gray_sbd.yaml \
        --set sbd=/data/benchmark_RELEASE/dataset --set voc=/data/VOCdevkit/VOC2011 --set checkpoint=CKPT
    torchrun --nproc_per_node=4 -m transfer.segmentation -c ... [--resume]
    crosschannel transfer seg -c ... --set engine=mmseg          # the same run through mmsegmentation

The protocol is shelhamer/fcn.berkeleyvision.org ``voc-fcn-alexnet`` as richzhang/colorization
``feature_learning_tests/segmentation`` runs it (PROVENANCE.md, "Transfer: VOC segmentation"):

* FCN-32s on the transfer backbone: conv1 padded by 100, fc6 a 6x6 (VGG 7x7) and fc7 a 1x1 convolution, dropout 0.5,
  a 1x1 21-way ``score`` layer initialised at zero, x32 upsampling by a transposed convolution initialised bilinear
  and frozen (kernel 63 for AlexNet as voc-fcn-alexnet, 2 x stride otherwise), cropped to the input at the offset of
  the release's crop layer (18 for AlexNet, 19 for VGG-16; derived here for any trunk by ``transfer.fcn.coord_offset``;
  the model is ``transfer.fcn``, the data ``transfer.seg_data``).
  ``zhang_vgg`` (stride 8) and ``timm:<name>`` encoders go through the same builder with their own strides.
* Data: SBD ``train`` (``benchmark_RELEASE/dataset``: ``img/*.jpg``, ``cls/*.mat`` read as torchvision's
  ``SBDataset`` reads them) for training; VOC2011 ``SegmentationClass`` over the shipped ``seg11valid`` list (736
  images of VOC2011 val outside SBD train) for evaluation; any split file, VOC ``train_aug`` / ``val`` as options.
* Whole images, batch 1, gradients accumulated over ``iter_size`` 20 images (split over the processes), SGD lr 1e-4
  fixed, momentum 0.9, weight decay 5e-4, biases lr x2 without decay, 100k iterations; images drawn at random with
  replacement as the release's data layer does. Softmax loss ignoring 255, normalised by the valid pixels.
* Evaluation: one confusion matrix over the split (``transfer.seg_eval``): per-class IoU, mean IoU (nanmean), pixel
  accuracy, mean accuracy, fwIoU, every ``eval_every`` iterations and at the end.

One command gives Table 2's rows: ``rows`` (colorization, random, supervised), each in ``out_dir/<row>/`` with its
checkpoint, ``log.jsonl``, TensorBoard logs, ``results.json``, ``predictions/`` (PNG per image),
``predictions.png`` (image / ground truth / prediction) and ``iou_per_class.png``; ``out_dir/results.{json,md}`` put
the rows and the published numbers side by side. SIGTERM / SIGINT / SIGUSR1 finish the update, write a checkpoint and
exit with 128 + the signal; ``--resume`` continues exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

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
    resolve_resume,
    resume_command,
    save_checkpoint,
    save_config,
    set_rng_state,
    setup_logging,
    truncate_jsonl,
)

from .backbone import INPUT_MODES, RANDOM_INITS, check_sources, describe
from .export import backbone_spec
from .fcn import FCN, fcn_backbone, seg_loss
from .seg_data import DrawSampler, SegmentationData, init_batch, sbd_samples, voc_samples
from .seg_eval import confusion, plot_iou, plot_predictions, published_mIoU, save_prediction, scores, write_report
from .voc import NUM_SEG_CLASSES

FORMAT = "crosschannel/transfer-seg-v1"
ENGINES = ("native", "mmseg")
ROWS = ("colorization", "random", "supervised")
PUBLISHED_METHOD = {"colorization": "zhang_alexnet_cc", "supervised": "imagenet_supervised", "random": "gaussian"}
SAMPLING = ("random", "epoch")
# what makes a resumed run another experiment (check_resume_config refuses changes without --allow-config-change)
GUARDED = ("engine", "sbd", "voc", "train_data", "train_split", "val_split", "train_masks", "checkpoint", "random_init",
           "supervised", "input", "rescale", "init_images", "fc_dim", "conv1_padding", "upsample_kernel", "crop_offset",
           "dropout", "iter_size", "lr", "momentum", "weight_decay", "bias_lr_mult", "bias_decay", "lr_milestones",
           "lr_gamma", "sampling", "seed")


@dataclasses.dataclass(frozen=True)
class SegConfig:
    engine: str = param("native", choices=ENGINES)  #: native (this module) | mmseg (transfer.mmseg_backbone)
    # data
    sbd: str = ""  #: benchmark_RELEASE/dataset (img/, cls/, train.txt); needed for train_data=sbd
    voc: str = ""  #: VOCdevkit/VOC2011 (or VOC2012): SegmentationClass masks for evaluation (and train_data=voc)
    train_data: str = param("sbd", choices=("sbd", "voc"))
    train_split: str = "train"  #: SBD <split>.txt, VOC ImageSets/Segmentation/<split>.txt (train_aug...), a file, all
    train_masks: str = "auto"  #: VOC training masks folder; auto: SegmentationClassAug for *aug* splits
    val_split: str = "seg11valid"  #: a file, ImageSets/Segmentation/<name>.txt, the shipped seg11valid, or all
    # what is fine-tuned (Table 2 rows)
    checkpoint: str = ""  #: pretext checkpoint (row 'colorization')
    random_init: str = param("gaussian", choices=RANDOM_INITS)  #: row 'random'
    supervised: str = ""  #: row 'supervised': alexnet:WEIGHTS | vgg16:WEIGHTS (torchvision state dict)
    rows: list[str] = param(default_factory=lambda: ["colorization"], choices=ROWS)
    input: str = param("gray", choices=INPUT_MODES)  #: gray (L) | color (Lab; conv1's ab weights start at zero)
    rescale: bool = True  #: the release's magic_init rescaling of the checkpoint (on the unpadded net) first
    init_images: int = param(80, ge=0, le=100_000)  #: training images (227 px centre crops) for rescaling / init
    fc_dim: int = param(4096, ge=1, le=65536)  #: fc6/fc7 width of the random row (checkpoints bring their own)
    conv1_padding: int = param(-1, ge=-1, le=1024)  #: -1: 100 for nets with fc6/fc7 (AlexNet, VGG), none otherwise
    upsample_kernel: int = param(0, ge=0, le=1024)  #: 0: 63 for AlexNet (voc-fcn-alexnet), 2 x stride otherwise
    crop_offset: int = param(-1, ge=-1, le=4096)  #: -1: derived from the trunk's geometry (AlexNet 18, VGG-16 19)
    dropout: float = param(0.5, ge=0.0, lt=1.0)  #: drop6 / drop7
    # protocol (voc-fcn-alexnet/solver.prototxt; richzhang feature_learning_tests/segmentation/solver0.prototxt)
    max_iter: int = param(100_000, ge=1, le=100_000_000)  #: updates (of iter_size images each)
    iter_size: int = param(20, ge=1, le=100_000)  #: images per update (batch 1 each), over all processes
    lr: float = param(1e-4, gt=0.0, le=10.0)
    momentum: float = param(0.9, ge=0.0, lt=1.0)
    weight_decay: float = param(5e-4, ge=0.0, le=1.0)
    bias_lr_mult: float = param(2.0, ge=0.0, le=100.0)  #: richzhang train_val.prototxt: every bias lr_mult 2 ...
    bias_decay: bool = False  #: ... decay_mult 0
    lr_milestones: list[int] = param(default_factory=list, ge=1)  #: lr x lr_gamma at these iterations ('fixed': none)
    lr_gamma: float = param(0.1, gt=0.0, le=1.0)
    sampling: str = param("random", choices=SAMPLING)  #: random with replacement (voc_layers.py) | epoch (shuffled)
    # evaluation
    eval_every: int = param(4000, ge=0)  #: solve.py scores every 4000 iterations; 0: at the end only
    save_predictions: bool = True  #: predictions/<id>.png of the final evaluation (seg-eval re-scores them)
    vis_images: int = param(4, ge=0, le=64)  #: images in predictions.png
    # runtime
    out_dir: str = "runs/transfer_seg"
    workers: int = param(4, ge=0, le=256)
    amp: str = param("auto", choices=("auto", "bf16", "fp16", "none"))  #: CUDA only
    channels_last: bool = True  #: CUDA only
    checkpoint_every: int = param(4000, ge=1)  #: solver.prototxt snapshot: 4000
    log_every: int = param(20, ge=1)  #: solver.prototxt display: 20
    tensorboard: bool = True
    seed: int = param(0, ge=0)
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        if not self.voc:
            raise UserError("no VOC data: --set voc=/path/to/VOCdevkit/VOC2011 (SegmentationClass for evaluation)")
        if self.train_data == "sbd" and not self.sbd:
            raise UserError("train_data=sbd needs --set sbd=/path/to/benchmark_RELEASE/dataset (or train_data=voc)")
        if not self.rows:
            raise UserError(f"rows: give at least one of {ROWS}")
        if "colorization" in self.rows and not self.checkpoint:
            raise UserError("row 'colorization' needs a pretext checkpoint: --set checkpoint=PATH")
        if "supervised" in self.rows and not self.supervised:
            raise UserError("row 'supervised' needs torchvision weights: --set supervised=alexnet:/path/alexnet.pth")
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)):
            raise UserError(f"lr_milestones must be increasing, got {list(self.lr_milestones)}")
        if self.upsample_kernel and self.upsample_kernel < 2:
            raise UserError("upsample_kernel must be 0 (auto) or >= 2")
        if self.device not in ("auto", ""):  # torch.device('tpu7') is a RuntimeError (a traceback) otherwise
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise UserError(f"config key 'device': not a device name: {self.device!r}") from None


# --------------------------------------------------------------------------------------------- data
def train_masks_dir(cfg: SegConfig) -> str:
    if cfg.train_masks != "auto":
        return cfg.train_masks
    return "SegmentationClassAug" if "aug" in Path(cfg.train_split).stem else "SegmentationClass"


def get_datasets(cfg: SegConfig) -> tuple[SegmentationData, SegmentationData, dict]:
    if cfg.train_data == "sbd":
        train, tnote = sbd_samples(cfg.sbd, cfg.train_split), f"SBD {cfg.train_split}"
    else:
        train, tnote = voc_samples(cfg.voc, cfg.train_split, train_masks_dir(cfg))
    val, vnote = voc_samples(cfg.voc, cfg.val_split)
    overlap = len({p.stem for p, _ in train} & {p.stem for p, _ in val})
    if overlap:
        log.warning("%d of the %d evaluation images are also training images (seg11valid exists to avoid this)",
                    overlap, len(val))
    log.info("train: %d images (%s); evaluation: %d images (%s)", len(train), tnote, len(val), vnote)
    return SegmentationData(train), SegmentationData(val), {"train": tnote, "val": vnote, "overlap": overlap}


# --------------------------------------------------------------------------------------------- model, optimiser
def build_model(cfg: SegConfig, row: str, images: torch.Tensor | None, resume: bool) -> FCN:
    """The row's FCN (no rescaling or data-dependent init when resuming: the checkpoint brings the weights)."""
    src = dict(checkpoint=cfg.checkpoint if row == "colorization" else None,
               supervised=cfg.supervised if row == "supervised" else None,
               random_init=(cfg.random_init if not resume else "gaussian") if row == "random" else None)
    backbone = fcn_backbone(**src, input=cfg.input, images=images, rescale=cfg.rescale and not resume, seed=cfg.seed,
                            fc_dim=cfg.fc_dim, conv1_padding=cfg.conv1_padding, dropout=cfg.dropout)
    return FCN(backbone, NUM_SEG_CLASSES, cfg.upsample_kernel, cfg.crop_offset)


def build_optimizer(model: nn.Module, cfg: SegConfig) -> torch.optim.SGD:
    """SGD with Caffe's multipliers (richzhang train_val.prototxt): weights lr x1 decay x1; biases lr x bias_lr_mult,
    decay x0 unless ``bias_decay``. Frozen parameters (the upsampling) are left out."""
    weights, biases = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (biases if n.endswith("bias") else weights).append(p)
    groups = [{"params": weights, "lr_mult": 1.0, "weight_decay": cfg.weight_decay},
              {"params": biases, "lr_mult": cfg.bias_lr_mult,
               "weight_decay": cfg.weight_decay if cfg.bias_decay else 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum)


def lr_at(cfg: SegConfig, it: int) -> float:
    """``fixed`` by default; ``multistep`` (x lr_gamma at each milestone passed) when milestones are given."""
    return cfg.lr * cfg.lr_gamma ** sum(it >= m for m in cfg.lr_milestones)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# --------------------------------------------------------------------------------------------- train / evaluate
def train_one_epoch(model, optimizer, scaler, loader, cfg: SegConfig, state: dict, ctx: dict) -> bool:
    """Run the updates of the loader's range (``iter_size / world`` images each on this process). Returns False when
    a stop signal ended it early (after a whole update, all processes agreeing)."""
    device, amp_dtype, world, stop = ctx["device"], ctx["amp"], ctx["world"], ctx["stop"]
    model.train()
    net = _unwrap(model).backbone
    local = cfg.iter_size // world
    window_t, window_n = time.time(), 0
    stream = iter(loader)
    while state["iter"] < ctx["stop_at"]:
        it = state["iter"]
        lr = lr_at(cfg, it)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        optimizer.zero_grad(set_to_none=True)
        loss_sum, error = 0.0, ""
        for j in range(local):
            rgb, mask, _, err = next(stream)
            err = err[0]
            if err.startswith("mask: "):
                error = error or err[len("mask: "):]
            if err:  # a stand-in (all void: zero loss, zero gradient) keeps every process's backward in step
                state["skipped"] += 1
            x = net.prepare(rgb.to(device, non_blocking=True))
            if cfg.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            last = j == local - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if last else model.no_sync():  # DDP all-reduces on the last image only
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(x)
                loss = seg_loss(logits, mask.to(device))
                # / local: DDP averages the processes' gradients, so the update is the mean over all iter_size images
                (scaler.scale(loss / local) if scaler is not None else loss / local).backward()
            loss_sum += loss.item()
        nonfinite = not math.isfinite(loss_sum)
        stop_req, bad, nonfinite = any_process([stop.requested, bool(error), nonfinite], device)
        if bad:
            raise UserError(error or "a training mask is invalid on another process (see its log)")
        if nonfinite:
            raise UserError(f"loss is not finite at iteration {it}; lower lr or check the data")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state["iter"] = it = it + 1
        window_n += cfg.iter_size
        if ctx["bar"] is not None:
            ctx["bar"].update(1)
        if it % cfg.log_every == 0 or it == cfg.max_iter:
            loss_avg = all_reduce_sum(torch.tensor(loss_sum / max(1, local), device=device)).item() / world
            ips = window_n / max(time.time() - window_t, 1e-9)
            window_t, window_n = time.time(), 0
            rec = dict(kind="train", iter=it, loss=loss_avg, lr=lr, img_per_s=ips, skipped=state["skipped"])
            ctx["logger"].log(**rec)
            if ctx["bar"] is not None:
                ctx["bar"].set_postfix(loss=f"{loss_avg:.3f}", img_s=f"{ips:.1f}")
            if ctx["writer"] is not None:
                for k in ("loss", "lr", "img_per_s"):
                    ctx["writer"].add_scalar(f"train/{k}", rec[k], it)
        if stop_req:
            return False
        if it % cfg.checkpoint_every == 0 or it == cfg.max_iter:
            state["save"](it)
    return True


@torch.no_grad()
def evaluate(model, dataset: SegmentationData, cfg: SegConfig, ctx: dict, pred_dir: Path | None = None,
             vis: int = 0) -> tuple[np.ndarray, float, list]:
    """Confusion matrix (summed over all processes), mean normalised loss per image (score.py reports it) and up to
    ``vis`` (id, rgb, gt, pred) samples of the first images. Process r scores images r, r + world, ..."""
    device, amp_dtype, rank, world = ctx["device"], ctx["amp"], ctx["rank"], ctx["world"]
    model.eval()
    net = _unwrap(model).backbone
    idx = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=1, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator())  # leaves the global RNG (dropout) alone
    hist = torch.zeros(NUM_SEG_CLASSES, NUM_SEG_CLASSES, dtype=torch.int64, device=device)
    loss_sum, samples, error = 0.0, [], ""
    ids = dataset.ids()
    bar = tqdm(loader, desc="evaluate", disable=not (ctx["main"] and cfg.progress), leave=False, dynamic_ncols=True)
    for rgb, mask, i, err in bar:
        if err[0]:
            error = error or f"evaluation image: {err[0]}"
            continue
        mask = mask.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(net.prepare(rgb.to(device)))
        loss_sum += seg_loss(logits, mask).item()
        pred = logits.argmax(1)
        hist += confusion(mask, pred)
        k = int(i[0])
        if pred_dir is not None:
            save_prediction(pred[0].cpu().numpy(), pred_dir / f"{ids[k]}.png")
        if k < vis:
            samples.append((ids[k], (rgb[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                            mask[0].cpu().numpy().astype(np.uint8), pred[0].cpu().numpy().astype(np.uint8)))
    if any_process([bool(error)], device)[0]:
        raise UserError(error or "an evaluation image is unreadable on another process (see its log)")
    all_reduce_sum(hist)
    loss = all_reduce_sum(torch.tensor(loss_sum, device=device, dtype=torch.float64)).item() / max(1, len(dataset))
    samples = sorted((s for part in all_gather_objects(samples) for s in part), key=lambda s: ids.index(s[0]))
    return hist.cpu().numpy(), loss, samples


# --------------------------------------------------------------------------------------------- one run
def run_one(cfg: SegConfig, row: str, run_dir: Path, resume: str | None, data, dist_info, device,
            stop: GracefulStop, allow_change: bool) -> dict | int:
    """Fine-tune and evaluate one row; returns its results, or the exit code after a stop signal."""
    train_ds, val_ds, notes = data
    rank, world, main = dist_info.rank, dist_info.world_size, dist_info.is_main
    ckpt = load_resumable(resume, row) if resume else None
    if ckpt is not None:
        check_resume_config(ckpt["config"], config_to_dict(cfg), GUARDED, allow_change, run_dir, ckpt["iter"])
    torch.manual_seed(cfg.seed)
    needs_images = ckpt is None and ((row == "colorization" and cfg.rescale) or
                                     (row == "random" and cfg.random_init != "gaussian"))
    images = init_batch(train_ds, cfg.init_images, cfg.seed) if needs_images else None
    model = build_model(cfg, row, images, resume=ckpt is not None).to(device)
    backbone = model.backbone
    optimizer = build_optimizer(model, cfg)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state = dict(iter=0, skipped=0)
    info = dict(backbone.info)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng_per_rank"]) == world:
            set_rng_state(ckpt["rng_per_rank"][rank])
        else:
            log.warning("resuming on %d processes from a checkpoint of %d: dropout masks will differ", world,
                        len(ckpt["rng_per_rank"]))
        state.update(iter=ckpt["iter"], skipped=ckpt["skipped"])
        info = ckpt["backbone_info"]
        if main:
            truncate_jsonl(run_dir / "log.jsonl", state["iter"], key="iter")
        log.info("%s: resumed at iteration %d", run_dir.name, state["iter"])
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # the same model on every rank, its own dropout masks
    up = model.upscore.weight.detach().clone()
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    raw = model
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    log.info("%s: %s; FCN upsampling x%d (kernel %d, crop offset %d)", run_dir.name, describe(backbone),
             raw.upscore.stride, raw.upscore.kernel, raw.upscore.offset)

    def save(it: int) -> None:
        rng = all_gather_objects(get_rng_state())
        if main:
            save_checkpoint({"format": FORMAT, "row": row, "input": cfg.input, "iter": it, "skipped": state["skipped"],
                             "spec": backbone_spec(backbone),
                             "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else None, "rng_per_rank": rng,
                             "backbone_info": info, "config": config_to_dict(cfg)}, run_dir / "checkpoint.pth")
        barrier()

    state["save"] = save
    logger = JsonlLogger(run_dir / "log.jsonl", enabled=main)
    writer = None
    if cfg.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    sampler = DrawSampler(len(train_ds), cfg.iter_size, rank, world, cfg.seed, cfg.sampling)
    # images are drawn by the sampler; the loader's own generator leaves the global RNG (dropout) alone, so a resumed
    # run draws the same masks as an uninterrupted one
    loader = torch.utils.data.DataLoader(train_ds, batch_size=1, sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator())
    bar = tqdm(total=cfg.max_iter, initial=state["iter"], desc=run_dir.name, unit="it", dynamic_ncols=True,
               disable=not (main and cfg.progress))
    ctx = dict(device=device, amp=amp_dtype, rank=rank, world=world, main=main, stop=stop, logger=logger,
               writer=writer, bar=bar)
    t0, it0 = time.time(), state["iter"]
    while state["iter"] < cfg.max_iter:
        start = state["iter"]
        ctx["stop_at"] = min(cfg.max_iter, (start // cfg.eval_every + 1) * cfg.eval_every) if cfg.eval_every \
            else cfg.max_iter
        sampler.set_range(start, ctx["stop_at"])
        if not train_one_epoch(model, optimizer, scaler, loader, cfg, state, ctx):
            save(state["iter"])
            bar.close()
            if writer is not None:
                writer.close()
            return stop.exit_code
        if cfg.eval_every and state["iter"] % cfg.eval_every == 0 and state["iter"] < cfg.max_iter:
            hist, vloss, _ = evaluate(model, val_ds, cfg, ctx)
            m = scores(hist)["mIoU"]
            logger.log(kind="eval", iter=state["iter"], mIoU=m, loss=vloss)
            log.info("%s: iteration %d, mean IoU %.2f", run_dir.name, state["iter"], 100 * m)
            if writer is not None:
                writer.add_scalar("val/mIoU", m, state["iter"])
    bar.close()
    sec_per_iter = (time.time() - t0) / max(1, state["iter"] - it0)
    if not torch.equal(raw.upscore.weight.detach(), up):
        raise RuntimeError(f"{run_dir.name}: the frozen upsampling changed during training: results invalid")
    pred_dir = run_dir / "predictions" if cfg.save_predictions else None  # each process writes its own images
    hist, vloss, samples = evaluate(model, val_ds, cfg, ctx, pred_dir, cfg.vis_images)
    res = {"row": row, "input": cfg.input, "engine": "native", "iterations": state["iter"], **scores(hist),
           "loss": vloss, "images": len(val_ds), "num_train": len(train_ds), "data": notes,
           "skipped_train_images": state["skipped"], "seconds_per_iter": round(sec_per_iter, 4),
           "upsampling": {"stride": raw.upscore.stride, "kernel": raw.upscore.kernel, "offset": raw.upscore.offset},
           "published_mIoU": published_mIoU(PUBLISHED_METHOD[row], cfg.input), "backbone": info,
           "hist": hist.tolist()}
    if main:
        logger.log(kind="eval", iter=state["iter"], mIoU=res["mIoU"], loss=vloss, final=True)
        write_run_outputs(run_dir, res, samples)
        if writer is not None:
            writer.add_scalar("val/mIoU", res["mIoU"], state["iter"])
            writer.close()
    barrier()
    return res


# --------------------------------------------------------------------------------------------- outputs
def write_run_outputs(run_dir: Path, res: dict, samples: list) -> None:
    atomic_write_text(run_dir / "results.json", json.dumps(res, indent=2))
    plot_iou({run_dir.name: res}, run_dir / "iou_per_class.png")
    plot_predictions(samples, run_dir / "predictions.png")


def write_summary(out_dir: Path, results: dict[str, dict], cfg: SegConfig) -> None:
    header = ["# VOC semantic segmentation, FCN-32s (Zhang et al. Table 2, segmentation)", "",
              f"Engine {cfg.engine}; train {next(iter(results.values()))['data']['train']}; evaluation "
              f"{next(iter(results.values()))['data']['val']}; input {cfg.input}. Scores as fcn.berkeleyvision.org "
              "score.py: one confusion matrix over the split, mean IoU over the classes present in prediction or "
              "truth. Published: Zhang et al. ECCV16 Table 2 and fcn.berkeleyvision.org README "
              "(pretext/data/published.tsv)."]
    write_report(out_dir, results, header, {"config": config_to_dict(cfg)})


# --------------------------------------------------------------------------------------------- entry point
def load_resumable(path: str, row: str) -> dict:
    """The checkpoint ``path`` if this command wrote it for ``row`` (native engine); else one line."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != FORMAT or ckpt.get("row") != row:
        what = (f"row '{ckpt.get('row')}'" if ckpt.get("format") == FORMAT else ckpt.get("format")
                or ("a pretext checkpoint" if "model_name" in ckpt else "no format"))
        raise UserError(f"{path}: not a checkpoint of this run (row {row}, {FORMAT}; it holds {what}); --resume takes "
                        "a checkpoint that this command wrote (give a pretext checkpoint with --checkpoint)")
    return ckpt


def main(args) -> int:
    extra = [f"{k}={getattr(args, k)}" for k in ("sbd", "voc", "checkpoint", "engine") if getattr(args, k, None)]
    args.overrides = list(getattr(args, "overrides", None) or []) + extra
    cfg = config_from_args(SegConfig, args)
    return run(cfg, getattr(args, "resume", None), getattr(args, "force", False),
               getattr(args, "allow_config_change", False))


def run(cfg: SegConfig, resume: str | None = None, force: bool = False, allow_change: bool = False) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.iter_size % world:
        raise UserError(f"iter_size {cfg.iter_size} (images per update, all processes) is not divisible by the "
                        f"{world} processes")
    if cfg.engine == "mmseg":
        from .mmseg_engine import require_mmseg

        require_mmseg()  # one line on how to install it, before anything is created
    if resume not in (None, "auto") and len(cfg.rows) > 1:
        raise UserError("--resume CHECKPOINT needs a single row; use --resume to continue every row")
    dist_info, device = init_distributed(cfg.device)
    lock = None
    try:
        out_dir = Path(cfg.out_dir)
        if dist_info.is_main and out_dir.is_dir():  # a folder in use: refused at once, in one line
            lock = RunLock(out_dir).acquire()
        setup_logging(None, dist_info.is_main)
        with held_logs() as held:  # a refused run prints its one error line alone
            data = get_datasets(cfg)  # a bad VOC / SBD folder is refused before the run folder is created
            check_sources(cfg.rows, cfg.checkpoint, cfg.supervised, cfg.input, "conv", cfg.seed)  # unreadable or unknown backbone sources
            if resume not in (None, "auto") and cfg.engine != "mmseg":  # and a --resume file of another kind
                load_resumable(resume, cfg.rows[0])
        if dist_info.is_main:
            lock = open_run_dir(out_dir, held, lock)
        barrier()
        plan = []
        for row in cfg.rows:
            run_dir = out_dir / row
            done = (run_dir / "results.json").is_file() and resume is not None
            latest = run_dir / ("mmseg/last_checkpoint" if cfg.engine == "mmseg" else "checkpoint.pth")
            plan.append((row, run_dir, None if done else resolve_resume(resume, latest, force), done))
        if dist_info.is_main:
            save_config(cfg, out_dir)
        results = {}
        with GracefulStop() as stop:
            for row, run_dir, ckpt, done in plan:
                if done:
                    log.info("%s: finished earlier, results kept", run_dir.name)
                    results[row] = _read_json(run_dir / "results.json")
                    continue
                if dist_info.is_main:
                    run_dir.mkdir(parents=True, exist_ok=True)
                if cfg.engine == "mmseg":
                    from .mmseg_engine import run_mmseg

                    r = run_mmseg(cfg, row, run_dir, ckpt, data, dist_info, device, stop, allow_change)
                else:
                    r = run_one(cfg, row, run_dir, ckpt, data, dist_info, device, stop, allow_change)
                if isinstance(r, int):
                    where = run_dir / ("mmseg" if cfg.engine == "mmseg" else "checkpoint.pth")
                    log.warning("%s received: checkpoint written in %s; continue with: %s", stop.name, where,
                                resume_command())
                    return r
                results[row] = r
                log.info("%s: mean IoU %.2f, pixel accuracy %.2f over %d images", row, 100 * r["mIoU"],
                         100 * r["pixel_acc"], r["images"])
        if dist_info.is_main:
            write_summary(out_dir, results, cfg)
            log.info("results: %s", out_dir / "results.md")
        return 0
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("transfer.segmentation", description="Fine-tune FCN-32s on PASCAL VOC segmentation "
                                "(Zhang et al. Table 2): rows x one protocol, published numbers beside.")
    add_config_args(p)
    add_resume_arg(p)
    p.add_argument("--sbd", help="benchmark_RELEASE/dataset (same as --set sbd=...)")
    p.add_argument("--voc", help="VOCdevkit/VOC2011 (same as --set voc=...)")
    p.add_argument("--checkpoint", help="pretext checkpoint to fine-tune (same as --set checkpoint=...)")
    p.add_argument("--engine", choices=ENGINES, help="native | mmseg (same as --set engine=...)")
    return p


if __name__ == "__main__":
    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
