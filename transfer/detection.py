"""Fine-tune on PASCAL VOC detection (Zhang et al. Table 2, detection column): Fast R-CNN's recipe on torchvision.

    python -m transfer.detection --config configs/transfer/voc07_det_alexnet_cc_gray.yaml --voc VOCdevkit/VOC2007
    torchrun --nproc_per_node=2 -m transfer.detection --config ... [--resume]
    crosschannel transfer det --config ...            (then: crosschannel transfer det-eval, see transfer.det_eval)

The detector is torchvision's ``FasterRCNN`` assembled around the transfer backbone (:mod:`transfer.backbone`):
conv5 (stride 16, 256 channels for AlexNet) as the feature map, torchvision's RPN (anchors 128/256/512 x 1:2/1:1/2:1,
py-faster-rcnn's end-to-end settings), and a box head that is Fast R-CNN's: RoI max pooling 6x6 at 1/16
(``roi_pool5``; :class:`RoIPool`), the pretrained fc6 (the 6x6 convolution reshaped to a linear layer) and fc7 with
dropout, and a new 21-way predictor (cls N(0, 0.01), bbox N(0, 0.001), biases 0). ``proposals: DIR`` replaces the
RPN with precomputed proposals, the paper's setting (selective search), fed to the RoI heads directly.

Fast R-CNN's settings (``rbgirshick/fast-rcnn``: ``lib/fast_rcnn/config.py``, ``experiments/cfgs/multiscale.yml``,
``models/CaffeNet/train.prototxt``, ``lib/roi_data_layer``; the release: 150k iterations, lr / 10 every 50k) are the
defaults; see PROVENANCE.md, "Transfer: VOC detection", for each and for the departures.

Coordinates: the XML's inclusive 1-based pixel boxes (x1, y1, x2, y2) become continuous boxes (x1 - 1, y1 - 1, x2,
y2) inside the network, so that torchvision's IoU (no +1) equals Fast R-CNN's +1 overlap; detections go back the
same way into the devkit results files. Precomputed proposals: ``DIR/<image id>.npy`` (an (R, 4) or (R, 5) float
array) or ``DIR/<image id>.txt`` (one ``x1 y1 x2 y2 [score]`` per line), in the XML's 1-based inclusive pixel
coordinates of the original image, best first (``proposals_max`` keeps the first R); selective-search ``.mat``
files (rows y1 x1 y2 x2) convert with :func:`convert_selective_search`.

Outputs per run (``out_dir/<row>/``): ``checkpoint.pth``, ``log.jsonl``, ``tensorboard/``, ``detections/``
(``comp4_det_<split>_<class>.txt`` + ``image_set.txt``: re-score with ``det-eval``), ``results.json``,
``results.md``, ``detections.png``; over all rows, ``out_dir/results.{json,md}`` and ``ap_per_class.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import resource
import signal
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
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
    resume_command,
    save_checkpoint,
    save_config,
    set_rng_state,
    setup_logging,
    truncate_jsonl,
)

from .backbone import (INPUT_MODES, RANDOM_INITS, TransferNet, build_backbone, check_sources, describe,
                       network_input)
from .det_eval import AP_KINDS, Detections, ap_kind_for, format_table, load_ground_truth, read_results, results_path, score, \
    write_results
from .sampling import IterationSampler, seed_of
from .voc import VOC_CLASSES, find_voc_root, load_voc_split, read_annotation

FORMAT = "crosschannel/transfer-det-v1"
ROWS = ("colorization", "random", "supervised")
PUBLISHED_METHOD = {"colorization": "zhang_alexnet_cc", "supervised": "imagenet_supervised", "random": "gaussian"}
NUM_CLASSES = len(VOC_CLASSES) + 1  #: background + 20
#: keys that make a resumed run another experiment (refused unless --allow-config-change)
GUARDED = ("voc", "train_split", "fallback_split", "proposals", "proposals_max", "checkpoint", "random_init",
           "supervised", "fc_dim", "input", "rescale", "init_images", "feature_stage", "freeze_until", "dropout",
           "train_scales", "train_max_size", "flip", "images_per_batch", "rois_per_batch", "fg_fraction", "fg_iou",
           "bg_iou_hi", "bg_iou_lo", "box_smooth_l1_beta", "bbox_reg_weights", "anchor_sizes", "anchor_ratios",
           "lr", "bias_lr_mult", "momentum", "weight_decay", "lr_step", "lr_gamma", "seed")


@dataclasses.dataclass(frozen=True)
class DetConfig:
    # data
    voc: str = ""  #: VOCdevkit/ or VOCdevkit/VOC2007/
    train_split: str = "trainval"
    test_split: str = "test"
    fallback_split: str = param("error", choices=("error", "all", "random"))  #: without ImageSets (transfer.voc)
    proposals: str = "rpn"  #: rpn (torchvision's RPN, trained jointly) | a folder of precomputed proposals per image
    proposals_max: int = param(0, ge=0, le=1_000_000)  #: keep the first N proposals of each file (0: all)
    # what is fine-tuned (Table 2 rows)
    checkpoint: str = ""  #: pretext checkpoint (row 'colorization')
    random_init: str = param("gaussian", choices=RANDOM_INITS)  #: row 'random'
    supervised: str = ""  #: row 'supervised': alexnet:WEIGHTS | vgg16:WEIGHTS (torchvision state dict)
    rows: list[str] = param(default_factory=lambda: ["colorization"], choices=ROWS)
    fc_dim: int = param(4096, ge=1, le=65536)  #: fc6/fc7 width of the random row (others bring their own)
    input: str = param("gray", choices=INPUT_MODES)  #: gray (L) | color (Lab; conv1's ab weights start at zero)
    rescale: bool = True  #: the release's magic_init rescaling of the checkpoint before fine-tuning
    init_images: int = param(80, ge=0, le=10_000)  #: training images (227 px) for the rescaling / data-dependent init
    feature_stage: str = "auto"  #: the RoI-pooled map: auto = conv5 (stride 16 for AlexNet/VGG), else the last stage
    freeze_until: str = ""  #: freeze the stages up to this one ('' trains all; fast-rcnn's CaffeNet: conv1)
    dropout: float = param(0.5, ge=0, lt=1)  #: drop6 / drop7
    # Fast R-CNN (lib/fast_rcnn/config.py, experiments/cfgs/multiscale.yml)
    train_scales: list[int] = param(default_factory=lambda: [480, 576, 688, 864, 1200], ge=32, le=4000)
    train_max_size: int = param(2000, ge=32, le=8000)
    test_scale: int = param(600, ge=32, le=4000)
    test_max_size: int = param(1000, ge=32, le=8000)
    flip: bool = True  #: TRAIN.USE_FLIPPED: every image also seen mirrored (the image list doubled)
    images_per_batch: int = param(2, ge=1, le=256)  #: IMS_PER_BATCH, global (split over the processes)
    rois_per_batch: int = param(128, ge=1, le=100_000)  #: BATCH_SIZE: RoIs per minibatch (per image: / images)
    fg_fraction: float = param(0.25, gt=0, le=1)
    fg_iou: float = param(0.5, gt=0, le=1)  #: foreground: IoU >= fg_iou
    bg_iou_hi: float = param(0.5, gt=0, le=1)  #: background: IoU in [bg_iou_lo, bg_iou_hi)
    bg_iou_lo: float = param(0.1, ge=0, lt=1)
    box_smooth_l1_beta: float = param(1.0, gt=0)  #: Fast R-CNN's SmoothL1Loss (sigma 1); torchvision uses 1/9
    bbox_reg_weights: list[float] = param(default_factory=lambda: [10.0, 10.0, 5.0, 5.0], gt=0)
    # RPN (py-faster-rcnn lib/fast_rcnn/config.py, end-to-end training)
    anchor_sizes: list[int] = param(default_factory=lambda: [128, 256, 512], ge=1, le=8000)
    anchor_ratios: list[float] = param(default_factory=lambda: [0.5, 1.0, 2.0], gt=0, le=100)
    rpn_pre_nms_train: int = param(12000, ge=1, le=1_000_000)
    rpn_post_nms_train: int = param(2000, ge=1, le=100_000)
    rpn_pre_nms_test: int = param(6000, ge=1, le=1_000_000)
    rpn_post_nms_test: int = param(300, ge=1, le=100_000)
    rpn_nms: float = param(0.7, gt=0, le=1)
    rpn_fg_iou: float = param(0.7, gt=0, le=1)
    rpn_bg_iou: float = param(0.3, ge=0, le=1)
    rpn_batch: int = param(256, ge=1, le=100_000)
    rpn_fg_fraction: float = param(0.5, gt=0, le=1)
    # test (lib/fast_rcnn/test.py: test_net)
    test_nms: float = param(0.3, gt=0, le=1)
    detections_per_class: int = param(100, ge=1, le=100_000)  #: per class per image, the top by score (before NMS, as test_net)
    max_per_set: int = param(40, ge=0, le=100_000)  #: per class over the test set: at most this x number of images (0: off)
    score_thresh: float = param(0.0, ge=0, lt=1)  #: fast-rcnn keeps every score
    ap: str = param("auto", choices=AP_KINDS)  #: auto: 11-point for VOC2007, area for 2010+
    coco: bool = True  #: also COCO-style AP (pycocotools) on the same detections
    vis_images: int = param(4, ge=0, le=64)  #: test images drawn in detections.png
    vis_thresh: float = param(0.5, ge=0, le=1)
    # solver (models/CaffeNet/solver.prototxt; the release: 150k iterations, / 10 every 50k)
    max_iter: int = param(150_000, ge=1)
    lr: float = param(1e-3, gt=0)
    bias_lr_mult: float = param(2.0, ge=0)  #: biases: lr x2, no weight decay (lr_mult 2, decay_mult 0)
    momentum: float = param(0.9, ge=0, lt=1)
    weight_decay: float = param(5e-4, ge=0)
    lr_step: int = param(50_000, ge=1)
    lr_gamma: float = param(0.1, gt=0)
    # runtime
    out_dir: str = "runs/transfer_det"
    workers: int = param(4, ge=0, le=256)
    amp: str = param("auto", choices=("auto", "bf16", "fp16", "none"))  #: CUDA only
    channels_last: bool = True  #: CUDA only
    checkpoint_every: int = param(10_000, ge=1)  #: TRAIN.SNAPSHOT_ITERS
    log_every: int = param(20, ge=1)
    tensorboard: bool = True
    seed: int = param(0, ge=0)
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        if not self.voc:
            raise UserError("no VOC data: --voc VOCdevkit/VOC2007 (or --set voc=...)")
        if not self.rows:
            raise UserError(f"config key 'rows': give at least one of {', '.join(ROWS)}")
        if "colorization" in self.rows and not self.checkpoint:
            raise UserError("row 'colorization' needs a pretext checkpoint: --checkpoint PATH")
        if "supervised" in self.rows and not self.supervised:
            raise UserError("row 'supervised' needs torchvision weights: --set supervised=alexnet:/path/alexnet.pth")
        if self.rois_per_batch % self.images_per_batch:
            raise UserError(f"rois_per_batch ({self.rois_per_batch}) must be a multiple of images_per_batch "
                            f"({self.images_per_batch}), as Fast R-CNN requires")
        if not self.bg_iou_lo < self.bg_iou_hi <= self.fg_iou:
            raise UserError(f"need bg_iou_lo < bg_iou_hi <= fg_iou, got {self.bg_iou_lo}, {self.bg_iou_hi}, "
                            f"{self.fg_iou}")
        if self.rpn_bg_iou > self.rpn_fg_iou:
            raise UserError(f"need rpn_bg_iou <= rpn_fg_iou, got {self.rpn_bg_iou}, {self.rpn_fg_iou}")
        if not self.train_scales:
            raise UserError("config key 'train_scales': give at least one scale")
        if len(self.bbox_reg_weights) != 4:
            raise UserError("config key 'bbox_reg_weights': four numbers (x, y, w, h)")
        if not self.proposals or (self.proposals != "rpn" and not Path(self.proposals).is_dir()):
            raise UserError(f"proposals '{self.proposals}': not a folder (give 'rpn' or a folder of per-image files)")
        if self.device not in ("auto", ""):  # torch.device('tpu7') is a RuntimeError (a traceback) otherwise
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise UserError(f"config key 'device': not a device name: {self.device!r}") from None


# --------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Record:
    """One image: ``boxes`` (K, 4) continuous pixel coordinates (the XML's x1 - 1, y1 - 1, x2, y2), ``labels`` (K,)
    in 1..20, ``difficult`` (K,)."""
    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def load_records(root: Path, split: str, cfg: DetConfig, train: bool) -> tuple[list[Record], dict]:
    """The images of ``split`` with their objects. Boxes outside the image are clipped and degenerate ones dropped
    (a warning naming the file, from :func:`transfer.voc.read_annotation`); in training, images left without
    objects are dropped (py-faster-rcnn's ``filter_roidb``: they have no foreground and, with bg_iou_lo > 0, no
    background RoIs) with a warning naming the file."""
    paths, _, note = load_voc_split(root, split, fallback=cfg.fallback_split, labels="xml", box_check="ignore",
                                    seed=cfg.seed)
    cls_index = {c: k + 1 for k, c in enumerate(VOC_CLASSES)}
    records, empty, unknown = [], [], set()
    for p in paths:
        xml = root / "Annotations" / f"{p.stem}.xml"
        a = read_annotation(xml, box_check="clip")
        w, h = a.width, a.height
        if w <= 0 or h <= 0:
            from PIL import Image

            with Image.open(p) as im:
                w, h = im.size
        objs = [o for o in a.objects if o.box is not None and o.name in cls_index]
        unknown |= {o.name for o in a.objects if o.name not in cls_index}
        boxes = np.asarray([(o.box[0] - 1, o.box[1] - 1, o.box[2], o.box[3]) for o in objs], np.float32).reshape(-1, 4)
        if train and not len(objs):
            log.warning("%s: no objects of the 20 classes: image left out of training", xml)
            empty.append(p.stem)
            continue
        records.append(Record(p.stem, p, w, h, boxes, np.asarray([cls_index[o.name] for o in objs], np.int64),
                              np.asarray([o.difficult for o in objs], bool)))
    if unknown:
        log.warning("%s: objects of classes outside the 20 VOC classes ignored: %s", root, ", ".join(sorted(unknown)))
    if not records:
        raise UserError(f"{root}: no {'training ' if train else ''}images with objects in split '{split}'")
    return records, {"note": note, "dropped_without_objects": empty}


def read_proposals(folder: str | Path, image_id: str, max_n: int = 0) -> np.ndarray:
    """(R, 4) float32 continuous boxes from ``folder/<image_id>.npy`` or ``.txt`` (module docstring); boxes with
    x2 < x1 or y2 < y1 are dropped. One-line errors naming the file."""
    folder = Path(folder)
    f = folder / f"{image_id}.npy"
    try:
        if f.is_file():
            arr = np.load(f, allow_pickle=False)
        else:
            f = folder / f"{image_id}.txt"
            if not f.is_file():
                raise UserError(f"{folder / image_id}.npy (or .txt): proposals file not found")
            arr = np.loadtxt(f, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise UserError(f"{f}: unreadable proposals ({str(e).splitlines()[0][:120]})") from None
    arr = np.asarray(arr, np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), np.float32)
    if arr.ndim != 2 or arr.shape[1] < 4 or not np.isfinite(arr[:, :4]).all():
        raise UserError(f"{f}: proposals must be an (R, 4) or (R, 5) array of finite x1 y1 x2 y2 [score]")
    arr = arr[:max_n] if max_n else arr
    b = np.stack([arr[:, 0] - 1, arr[:, 1] - 1, arr[:, 2], arr[:, 3]], 1)
    return b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])].astype(np.float32)


def convert_selective_search(mat_path: str | Path, out_dir: str | Path, image_ids: list[str] | None = None) -> int:
    """fast-rcnn's selective-search ``.mat`` (``boxes``: one (R, 4) array per image, rows y1 x1 y2 x2, 1-based;
    ``images``: the ids, else ``image_ids``) -> ``out_dir/<id>.npy`` (x1 y1 x2 y2). Returns the number of files."""
    from scipy.io import loadmat

    m = loadmat(mat_path)
    boxes = m["boxes"].ravel()
    ids = [str(np.asarray(i).ravel()[0]) for i in m["images"].ravel()] if "images" in m else image_ids
    if ids is None or len(ids) != len(boxes):
        raise UserError(f"{mat_path}: {len(boxes)} box arrays, {len(ids) if ids else 'no'} image ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, b in zip(ids, boxes):
        np.save(out / f"{i}.npy", np.asarray(b, np.float32).reshape(-1, 4)[:, (1, 0, 3, 2)])
    return len(ids)


def image_scale(h: int, w: int, target: int, max_size: int) -> float:
    """Fast R-CNN's ``prep_im_for_blob``: shorter side to ``target``, unless the longer would exceed ``max_size``."""
    s = target / min(h, w)
    if round(s * max(h, w)) > max_size:
        s = max_size / max(h, w)
    return s


class DetDataset(torch.utils.data.Dataset):
    """Items ``(index, seed)`` -> dict(image (3, h, w) RGB in [0, 1] at its scale, target (continuous boxes at that
    scale, labels), proposals (or None), index, scale, flipped, ok). Training: index in [0, 2N) with flips (the
    upper half mirrored, as fast-rcnn appends flipped copies), scale drawn from ``seed``; test: the test scale."""

    def __init__(self, records: list[Record], cfg: DetConfig, train: bool):
        self.records, self.cfg, self.train = records, cfg, train

    def __len__(self) -> int:
        return len(self.records) * (2 if self.train and self.cfg.flip else 1)

    def __getitem__(self, item):
        i, seed = item
        c = self.cfg
        r = self.records[i % len(self.records)]
        flipped = self.train and i >= len(self.records)
        if self.train:
            g = torch.Generator().manual_seed(int(seed))
            target_size = c.train_scales[int(torch.randint(len(c.train_scales), (1,), generator=g))]
            s = image_scale(r.height, r.width, target_size, c.train_max_size)
        else:
            s = image_scale(r.height, r.width, c.test_scale, c.test_max_size)
        ok = True
        try:
            img = pil_to_tensor(read_image(r.path))
            if img.shape[1:] != (r.height, r.width):
                log.warning("%s: image is %dx%d, its annotation says %dx%d", r.path, img.shape[2], img.shape[1],
                            r.width, r.height)
        except UnreadableImage as e:
            log.warning("%s (image left out of this batch's RoIs)", e)
            img, ok = torch.zeros(3, r.height, r.width), False
        h, w = img.shape[1:]
        size = (max(1, round(h * s)), max(1, round(w * s)))
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0].clamp_(0, 1)
        boxes = torch.from_numpy(r.boxes.copy()) if ok else torch.zeros(0, 4)
        labels = torch.from_numpy(r.labels.copy()) if ok else torch.zeros(0, dtype=torch.int64)
        props = None
        if c.proposals != "rpn":
            props = torch.from_numpy(read_proposals(c.proposals, r.image_id, c.proposals_max))
            props[:, 0::2] = props[:, 0::2].clamp(0, w)
            props[:, 1::2] = props[:, 1::2].clamp(0, h)
        if flipped:
            img = img.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            if props is not None:
                props = torch.stack([w - props[:, 2], props[:, 1], w - props[:, 0], props[:, 3]], 1)
        return {"image": img, "target": {"boxes": boxes * s, "labels": labels},
                "proposals": props * s if props is not None else None, "index": i % len(self.records), "scale": s,
                "flipped": flipped, "ok": ok}


def collate(items: list[dict]) -> list[dict]:
    return items


# --------------------------------------------------------------------------------------------- the detector
class DetBackbone(nn.Module):
    """RGB batch -> the transfer network's input (L, Lab, RGB or grey) -> its stages up to ``stage``."""

    def __init__(self, net: TransferNet, stage: str):
        super().__init__()
        self.input_kind = net.input_kind
        self.body = net.trunk(stage)
        self.out_channels = net.channels(stage)
        self.reduction = net.reduction(stage)
        self.channels_last = False  #: CUDA: feed the convolutions channels-last

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = network_input(rgb, self.input_kind)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)


class RoIPool(nn.Module):
    """Fast R-CNN's ``roi_pool5`` (Caffe ROIPooling: max pooling into a fixed grid, ends rounded) with the interface
    of RoIHeads' ``box_roi_pool`` (features, proposals, image_shapes). ``torchvision.ops.roi_pool`` ports that
    layer, which takes inclusive pixel ends: continuous boxes [x1, x2) become x1 .. x2 - 1."""

    def __init__(self, output_size: int, spatial_scale: float):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, features, proposals: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        x = features["0"] if isinstance(features, dict) else features
        rois = [torch.cat([p[:, :2], p[:, 2:] - 1], 1).to(x.dtype) for p in proposals]
        return torchvision.ops.roi_pool(x, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class FastRCNNHeads(RoIHeads):
    """torchvision's RoIHeads (sampling, box coding, matching) with Fast R-CNN's rules where they differ:

    * background RoIs have IoU in [bg_iou_lo, bg_iou_hi): below ``bg_iou_lo`` they are not sampled at all
      (torchvision would take [0, 0.5));
    * the box loss is Smooth L1 with ``beta`` (fast-rcnn's SmoothL1Loss: 1; torchvision 1/9), over the number of
      sampled RoIs; a batch without any sampled RoI gives zero losses instead of NaN;
    * test: per class, the ``detections_per_class`` top-scoring boxes (before NMS, as fast-rcnn's ``test_net``),
      then NMS per class -- no overall cap of ``box_detections_per_img`` (which in torchvision counts all classes
      together), no 0.05 score threshold and no small-box removal. The pre-NMS top scores are returned too
      (``topk_scores``, ``topk_labels``) for test_net's cap of detections over the whole set."""

    def __init__(self, *args, bg_iou_lo: float = 0.1, beta: float = 1.0, detections_per_class: int = 100, **kwargs):
        super().__init__(*args, **kwargs)
        self.bg_iou_lo, self.beta, self.detections_per_class = bg_iou_lo, beta, detections_per_class

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        if self.bg_iou_lo > 0:
            for p, g, lab in zip(proposals, gt_boxes, labels):
                if g.numel() == 0:
                    lab.fill_(-1)
                else:
                    low = box_ops.box_iou(g, p).max(0).values < self.bg_iou_lo
                    lab[low & (lab == 0)] = -1
        return matched, labels

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(x)
        if self.training:
            return [], self.loss(class_logits, box_regression, labels, regression_targets)
        return self.detections(class_logits, box_regression, proposals, image_shapes), {}

    def loss(self, class_logits, box_regression, labels, regression_targets) -> dict[str, torch.Tensor]:
        labels = torch.cat(labels)
        if labels.numel() == 0:
            zero = class_logits.sum() * 0 + box_regression.sum() * 0
            return {"loss_classifier": zero, "loss_box_reg": zero}
        regression_targets = torch.cat(regression_targets)
        cls = F.cross_entropy(class_logits.float(), labels)
        pos = torch.where(labels > 0)[0]
        deltas = box_regression.float().reshape(labels.numel(), -1, 4)[pos, labels[pos]]
        box = F.smooth_l1_loss(deltas, regression_targets[pos], beta=self.beta, reduction="sum") / labels.numel()
        return {"loss_classifier": cls, "loss_box_reg": box}

    def detections(self, class_logits, box_regression, proposals, image_shapes) -> list[dict[str, torch.Tensor]]:
        per_image = [len(p) for p in proposals]
        boxes_all = self.box_coder.decode(box_regression.float(), proposals).split(per_image)
        scores_all = F.softmax(class_logits.float(), -1).split(per_image)
        out = []
        for boxes, scores, shape in zip(boxes_all, scores_all, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:]  # (R, C, 4) without the background
            scores = scores[:, 1:]
            k = min(self.detections_per_class, scores.shape[0])
            top_s, top_i = scores.topk(k, dim=0)  # (k, C): each class's best k
            cls = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(top_s)
            b = boxes[top_i, cls - 1]
            s, lab, b = top_s.reshape(-1), cls.reshape(-1), b.reshape(-1, 4)
            if self.score_thresh > 0:
                keep = s > self.score_thresh
                s, lab, b = s[keep], lab[keep], b[keep]
            kept = box_ops.batched_nms(b, s, lab, self.nms_thresh)
            out.append({"boxes": b[kept], "scores": s[kept], "labels": lab[kept], "topk_scores": s,
                        "topk_labels": lab})
        return out


class DetTransform(GeneralizedRCNNTransform):
    """Batching only: images arrive at their scale from the data layer (fast-rcnn's ``roi_data_layer`` resizes
    there, so the scale draw is part of the resumable data stream), in RGB; the colour conversion is the backbone's
    first step, after padding with black (zero), as with the release's PIXEL_MEANS = 0 and in-network Lab."""

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(self, image, target=None):
        return image, target


class TransferRCNN(FasterRCNN):
    """torchvision's FasterRCNN over a :class:`DetBackbone`, with :class:`FastRCNNHeads` and :class:`DetTransform`;
    ``forward(images, targets, proposals)`` skips the RPN when proposals are given (or there is no RPN)."""

    def forward(self, images, targets=None, proposals=None):
        image_list, targets = self.transform(images, targets)
        features = OrderedDict([("0", self.backbone(image_list.tensors))])
        losses = {}
        if proposals is None:
            if self.rpn is None:
                raise ValueError("this detector has no RPN: give proposals")
            proposals, losses = self.rpn(image_list, features, targets)
        dets, det_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**losses, **det_losses} if self.training else dets


def build_detector(net: TransferNet, cfg: DetConfig) -> TransferRCNN:
    """The detector around ``net`` (see the module docstring); the predictor gets Fast R-CNN's init."""
    stage = cfg.feature_stage
    if stage == "auto":
        stage = "conv5" if "conv5" in net.stage_names else net.stage_names[-1]
    if stage not in net.stage_names:
        raise UserError(f"feature_stage '{stage}': {net.arch} has stages {', '.join(net.stage_names)}")
    backbone = DetBackbone(net, stage)
    if net.has_fc and net.fc == "linear":
        pool = net.fc_kernel
        box_head = net.box_head()
        for m in box_head.modules():
            if isinstance(m, nn.Dropout):
                m.p = cfg.dropout
        width = net.channels("fc7")
    else:  # encoders without fc6/fc7 (zhang_vgg, timm): torchvision's two-layer MLP head, new
        pool, width = 7, 1024
        box_head = TwoMLPHead(backbone.out_channels * pool * pool, width)
    predictor = FastRCNNPredictor(width, NUM_CLASSES)
    with torch.no_grad():
        predictor.cls_score.weight.normal_(0, 0.01)
        predictor.bbox_pred.weight.normal_(0, 0.001)
        predictor.cls_score.bias.zero_()
        predictor.bbox_pred.bias.zero_()
    anchors = AnchorGenerator((tuple(cfg.anchor_sizes),), (tuple(cfg.anchor_ratios),))
    per_image = cfg.rois_per_batch // cfg.images_per_batch
    model = TransferRCNN(
        backbone, num_classes=None, min_size=cfg.test_scale, max_size=cfg.test_max_size, image_mean=[0.0],
        image_std=[1.0], size_divisible=1, rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
        rpn_nms_thresh=cfg.rpn_nms, rpn_fg_iou_thresh=cfg.rpn_fg_iou, rpn_bg_iou_thresh=cfg.rpn_bg_iou,
        rpn_batch_size_per_image=cfg.rpn_batch, rpn_positive_fraction=cfg.rpn_fg_fraction,
        box_head=box_head, box_predictor=predictor)
    model.transform = DetTransform(cfg.test_scale, cfg.test_max_size, [0.0], [1.0], size_divisible=1)
    model.roi_heads = FastRCNNHeads(
        RoIPool(pool, 1.0 / backbone.reduction), box_head, predictor, cfg.fg_iou, cfg.bg_iou_hi, per_image,
        cfg.fg_fraction, tuple(cfg.bbox_reg_weights), cfg.score_thresh, cfg.test_nms, 0,
        bg_iou_lo=cfg.bg_iou_lo, beta=cfg.box_smooth_l1_beta, detections_per_class=cfg.detections_per_class)
    if cfg.proposals != "rpn":
        model.rpn = None
    model.feature_stage = stage
    return model


def freeze(model: TransferRCNN, until: str) -> list[str]:
    """Freeze the backbone stages up to and including ``until`` ('' freezes nothing); returns their names."""
    body = model.backbone.body
    names = [n for n in body._modules if n != "norm"]
    if not until:
        return []
    if until not in names:
        raise UserError(f"freeze_until '{until}': the detector's backbone has {', '.join(names)}")
    frozen = names[: names.index(until) + 1]
    for n in frozen:
        for p in getattr(body, n).parameters():
            p.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module) -> None:
    """Training mode with every BatchNorm in eval mode: statistics of 1-2 images per process would be noise (what
    torchvision's detection backbones do with FrozenBatchNorm2d); the folded AlexNet has none."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def build_optimizer(model: nn.Module, cfg: DetConfig) -> torch.optim.SGD:
    """SGD with the prototxt's multipliers: weights lr x1, decay x1; biases lr x ``bias_lr_mult``, decay 0."""
    weights, biases = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (biases if n.endswith("bias") else weights).append(p)
    groups = [{"params": weights, "lr_mult": 1.0, "weight_decay": cfg.weight_decay},
              {"params": biases, "lr_mult": cfg.bias_lr_mult, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum)


def lr_at(cfg: DetConfig, it: int) -> float:
    """Caffe's ``step`` policy."""
    return cfg.lr * cfg.lr_gamma ** (it // cfg.lr_step)


def fingerprints(model: nn.Module, names: list[str]) -> dict[str, str]:
    params = dict(model.named_parameters())
    return {n: hashlib.sha256(params[n].detach().cpu().contiguous().numpy().tobytes()).hexdigest() for n in names}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


# --------------------------------------------------------------------------------------------- train / evaluate
def _to_device(batch: list[dict], device) -> tuple[list, list, list | None]:
    images = [b["image"].to(device, non_blocking=True) for b in batch]
    targets = [{k: v.to(device) for k, v in b["target"].items()} for b in batch]
    props = [b["proposals"].to(device) for b in batch] if batch[0]["proposals"] is not None else None
    return images, targets, props


def train_one_epoch(model, optimizer, scaler, loader, cfg: DetConfig, state: dict, device, amp_dtype,
                    logger: JsonlLogger, writer, bar, world: int, stop: GracefulStop) -> bool:
    """Run the iterations the loader's sampler holds; returns True when a stop signal ended them (all ranks agree,
    after the step, and a checkpoint is written)."""
    set_train_mode(model)
    window_t, window_n, t_step = time.time(), 0, time.time()
    fault = int(os.environ.get("CROSSCHANNEL_FAULT_AT_STEP", "0"))  # crash injection for resume tests
    for batch in loader:
        it = state["iter"]
        images, targets, props = _to_device(batch, device)
        state["skipped"] += sum(not b["ok"] for b in batch)
        lr = lr_at(cfg, it)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = model(images, targets, props)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state["iter"] = it = it + 1
        window_n += len(images) * world
        if bar is not None:
            bar.update(1)
        nonfinite, stopping = any_process([not math.isfinite(loss.item()), stop.requested], device)
        if nonfinite:
            raise UserError(f"loss is not finite at iteration {it}; lower lr or check the data")
        if it % cfg.log_every == 0 or it == cfg.max_iter:
            vals = torch.stack([loss.detach().float()] + [v.detach().float() for v in losses.values()])
            vals = (all_reduce_sum(vals) / world).tolist()
            now = time.time()
            rec = dict(kind="train", iter=it, loss=vals[0], **dict(zip(losses, vals[1:])), lr=lr,
                       img_per_s=window_n / max(now - window_t, 1e-9), sec_per_iter=now - t_step,
                       max_rss_mb=round(peak_rss_mb(), 1), skipped=state["skipped"])
            if device.type == "cuda":
                rec["max_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            window_t, window_n = now, 0
            logger.log(**rec)
            if bar is not None:
                bar.set_postfix(loss=f"{vals[0]:.3f}", img_s=f"{rec['img_per_s']:.2f}")
            if writer is not None:
                for k, v in rec.items():
                    if k not in ("kind", "iter") and isinstance(v, (int, float)):
                        writer.add_scalar(f"train/{k}", v, it)
        t_step = time.time()
        if it % cfg.checkpoint_every == 0 or it == cfg.max_iter or stopping:
            state["save"](it)
        if fault and it == fault:
            os.kill(os.getpid(), signal.SIGKILL)
        if stopping:
            return True
    return False


@torch.no_grad()
def evaluate(model, dataset: DetDataset, cfg: DetConfig, device, amp_dtype, rank: int, world: int,
             progress: bool = False) -> tuple[dict[str, Detections], list[int]]:
    """Fast R-CNN's ``test_net`` over the test set with the unwrapped model (ranks see different numbers of images;
    DDP's forward would wait for the others), one image per forward as there, rank r taking images r, r + world,
    ...: per class at most ``detections_per_class`` boxes per image, NMS, and at most ``max_per_set`` x N
    per class over the set (scores strictly above the (max_per_set x N)-th best of the per-image tops). Returns
    per-class detections in the devkit's inclusive 1-based pixel boxes, and unreadable image indices."""
    model.eval()
    items = [(i, 0) for i in range(rank, len(dataset.records), world)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=items, num_workers=cfg.workers,
                                         collate_fn=collate, worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator())
    dets, tops, bad = [], [], []
    for batch in tqdm(loader, desc="test", disable=not progress, leave=False, dynamic_ncols=True):
        b = batch[0]
        images, _, props = _to_device(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(images, None, props)[0]
        r = dataset.records[b["index"]]
        boxes = (out["boxes"].float() / b["scale"]).cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, r.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, r.height)
        boxes[:, :2] += 1  # continuous -> the devkit's inclusive 1-based pixels
        dets.append((b["index"], boxes.numpy(), out["scores"].float().cpu().numpy(), out["labels"].cpu().numpy()))
        tops.append((out["topk_scores"].float().cpu().numpy(), out["topk_labels"].cpu().numpy()))
        if not b["ok"]:
            bad.append(b["index"])
    parts = all_gather_objects((dets, tops, bad))
    dets = [d for p in parts for d in p[0]]
    tops = [t for p in parts for t in p[1]]
    bad = sorted(i for p in parts for i in p[2])
    thresholds = set_thresholds(tops, len(VOC_CLASSES), cfg.max_per_set * len(dataset.records))
    by_class = {}
    for c, name in enumerate(VOC_CLASSES, start=1):
        thresh = thresholds[c - 1]
        ids, scores, boxes = [], [], []
        for idx, b, s, lab in sorted(dets, key=lambda d: d[0]):
            keep = (lab == c) & (s > thresh)
            ids += [dataset.records[idx].image_id] * int(keep.sum())
            scores.append(s[keep])
            boxes.append(b[keep])
        by_class[name] = Detections(ids, np.concatenate(scores) if scores else np.zeros(0),
                                    np.concatenate(boxes) if boxes else np.zeros((0, 4)))
    return by_class, bad


def set_thresholds(tops: list[tuple[np.ndarray, np.ndarray]], num_classes: int, cap: int) -> np.ndarray:
    """test_net's per-class cap over the set: ``tops`` holds each image's pre-NMS (scores, labels 1..C); a class
    with more than ``cap`` of them keeps the scores strictly above its ``cap``-th best (the minimum of test_net's
    heap of ``cap`` scores); others keep everything (-inf). ``cap`` 0: no cap."""
    out = np.full(num_classes, -np.inf)
    if cap <= 0 or not tops:
        return out
    scores = np.concatenate([s for s, _ in tops])
    labels = np.concatenate([lab for _, lab in tops])
    for c in range(1, num_classes + 1):
        s = scores[labels == c]
        if len(s) > cap:
            out[c - 1] = np.partition(s, len(s) - cap)[len(s) - cap]
    return out


# --------------------------------------------------------------------------------------------- one run
def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _init_images(records: list[Record], n: int, seed: int) -> torch.Tensor | None:
    """``n`` training images (a seeded choice), shorter side to 227 and centre-cropped to 227 x 227, for the
    rescaling / data-dependent init (the network's 227 px input geometry)."""
    if n == 0:
        return None
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed_of(seed, "init"))).tolist()
    out = []
    for k in range(n):
        r = records[order[k % len(records)]]
        try:
            img = pil_to_tensor(read_image(r.path))
        except UnreadableImage:
            continue
        s = 227 / min(img.shape[1:])
        img = F.interpolate(img[None], size=(max(227, round(img.shape[1] * s)), max(227, round(img.shape[2] * s))),
                            mode="bilinear", align_corners=False, antialias=True)[0]
        t, left = (img.shape[1] - 227) // 2, (img.shape[2] - 227) // 2
        out.append(img[:, t:t + 227, left:left + 227].clamp(0, 1))
    return torch.stack(out) if out else None


def run_one(cfg: DetConfig, row: str, run_dir: Path, resume: str | None, data, dist_info, device,
            stop: GracefulStop) -> tuple[dict | None, bool]:
    """Fine-tune one row and evaluate it; returns (its results on the main process, whether a signal stopped it)."""
    train_records, test_records, root, data_info = data
    rank, world, main = dist_info.rank, dist_info.world_size, dist_info.is_main
    torch.manual_seed(cfg.seed)
    src = dict(checkpoint=cfg.checkpoint if row == "colorization" else None,
               supervised=cfg.supervised if row == "supervised" else None,
               random_init=(cfg.random_init if not resume else "gaussian") if row == "random" else None)
    needs_images = not resume and ((row == "colorization" and cfg.rescale) or
                                   (row == "random" and cfg.random_init != "gaussian"))
    images = _init_images(train_records, cfg.init_images, cfg.seed) if needs_images else None
    net = build_backbone(**src, input=cfg.input, fc="linear", images=images, rescale=cfg.rescale and not resume,
                         seed=cfg.seed, fc_dim=cfg.fc_dim, device=device)
    model = build_detector(net, cfg).to(device)
    frozen_stages = freeze(model, cfg.freeze_until)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        model.backbone.channels_last = True
    optimizer = build_optimizer(model, cfg)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state = dict(iter=0, skipped=0)
    info = dict(net.info)
    if resume:
        ckpt = load_checkpoint(resume)  # checked by check_resumable
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng_per_rank"]) == world:
            set_rng_state(ckpt["rng_per_rank"][rank])
        else:
            log.warning("checkpoint written by %d processes, resuming with %d: random streams restart",
                        len(ckpt["rng_per_rank"]), world)
        state.update(iter=ckpt["iter"], skipped=ckpt["skipped"])
        info = ckpt["backbone_info"]
        if main:
            truncate_jsonl(run_dir / "log.jsonl", state["iter"], key="iter")
        log.info("%s: resumed from %s at iteration %d", row, resume, state["iter"])
    else:
        torch.manual_seed(seed_of(cfg.seed, "train", rank))  # the same weights on every rank, its own dropout / sampling
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    before = fingerprints(model, frozen)
    raw = model
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in raw.parameters())
    log.info("%s: %s; detector on %s (stride %d), %s, %.1fM parameters%s", row, describe(net), raw.feature_stage,
             raw.backbone.reduction, "RPN proposals" if raw.rpn is not None else f"proposals from {cfg.proposals}",
             n_params / 1e6, f", frozen: {', '.join(frozen_stages)}" if frozen_stages else "")

    def save(it: int) -> None:
        rng = all_gather_objects(get_rng_state())
        if main:
            save_checkpoint({"format": FORMAT, "row": row, "input": cfg.input, "iter": it, "skipped": state["skipped"],
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
    train_ds = DetDataset(train_records, cfg, train=True)
    b = cfg.images_per_batch // world
    sampler = IterationSampler(len(train_ds), b, rank, world, cfg.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=b, sampler=sampler, num_workers=cfg.workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.workers > 0, worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator())  # leaves the global RNG to dropout / sampling
    per_pass = max(1, math.ceil(len(train_ds) / cfg.images_per_batch))
    bar = tqdm(total=cfg.max_iter, initial=state["iter"], desc=row, unit="it", dynamic_ncols=True,
               disable=not (main and cfg.progress))
    t0, it0 = time.time(), state["iter"]
    stopped = False
    while state["iter"] < cfg.max_iter and not stopped:
        start = state["iter"]
        sampler.set_range(start, min(cfg.max_iter, (start // per_pass + 1) * per_pass))
        stopped = train_one_epoch(model, optimizer, scaler, loader, cfg, state, device, amp_dtype, logger, writer,
                                  bar, world, stop)
    bar.close()
    sec_per_iter = (time.time() - t0) / max(1, state["iter"] - it0)
    changed = [n for n, h in fingerprints(raw, frozen).items() if h != before[n]]
    if changed:
        raise RuntimeError(f"{row}: frozen parameters changed during training ({changed[:5]}): results invalid")
    if stopped:
        if writer is not None:
            writer.close()
        return None, True
    test_ds = DetDataset(test_records, cfg, train=False)
    dets, bad = evaluate(raw, test_ds, cfg, device, amp_dtype, rank, world, progress=main and cfg.progress)
    if bad:
        raise UserError(f"{test_records[bad[0]].path}: unreadable test image ({len(bad)} in all): the test set must be "
                        "complete for a comparable AP")
    res = None
    if main:
        res = write_run_outputs(run_dir, dets, test_ds, root, cfg, row, info, state, sec_per_iter, data_info)
        if writer is not None:
            if res["mAP"] is not None:
                writer.add_scalar("test/mAP", res["mAP"], state["iter"])
            writer.close()
    barrier()
    return res, False


# --------------------------------------------------------------------------------------------- outputs
def published_map(row: str, inp: str) -> float | None:
    from pretext.published import published

    rows = published("voc07_det", method=PUBLISHED_METHOD[row], setting=f"all/{inp}", metric="mAP")
    return rows[0]["value"] if rows else None


def write_run_outputs(run_dir: Path, dets: dict[str, Detections], test_ds: DetDataset, root: Path, cfg: DetConfig,
                      row: str, info: dict, state: dict, sec_per_iter: float, data_info: dict) -> dict:
    """Devkit results files, then the scores read back from them (what ``det-eval`` computes), results.json/md and
    detections.png."""
    out = run_dir / "detections"
    ids = [r.image_id for r in test_ds.records]
    write_results(out, cfg.test_split, dets)
    atomic_write_text(out / "image_set.txt", "\n".join(ids) + "\n")
    gt = load_ground_truth(root, ids)
    back = {c: read_results(results_path(out, cfg.test_split, c), set(ids)) for c in VOC_CLASSES}
    scores = score(gt, back, ap_kind_for(root, cfg.ap), VOC_CLASSES, cfg.coco)
    cmd = (f"crosschannel transfer det-eval --voc {root} --split {cfg.test_split} --results {out} "
           f"--image-set {out / 'image_set.txt'}")
    res = {"row": row, "input": cfg.input, "iterations": state["iter"], "mAP": scores["mAP"],
           "published_mAP": published_map(row, cfg.input), **scores, "num_train_images": len(data_info["train"]),
           "num_test_images": len(ids), "dropped_without_objects": data_info["dropped"],
           "skipped_unreadable_train_items": state["skipped"], "seconds_per_iter": round(sec_per_iter, 4),
           "peak_rss_mb": round(peak_rss_mb(), 1), "proposals": cfg.proposals, "rescore": cmd, "backbone": info}
    atomic_write_text(run_dir / "results.json", json.dumps(res, indent=2))
    pub = res["published_mAP"]
    md = [f"# VOC detection: {row}, {cfg.input} input", "",
          f"{len(ids)} '{cfg.test_split}' images of `{root}`; {state['iter']} iterations; AP: {scores['ap_type']} "
          f"(py-faster-rcnn voc_eval); published mAP: {f'{pub:.1f}' if pub is not None else '-'}.", "",
          format_table(scores), "", f"Re-score: `{cmd}`"]
    atomic_write_text(run_dir / "results.md", "\n".join(md) + "\n")
    draw_detections(test_ds, dets, run_dir / "detections.png", cfg.vis_images, cfg.vis_thresh)
    return res


def draw_detections(ds: DetDataset, dets: dict[str, Detections], png: Path, n: int, thresh: float) -> None:
    """The first ``n`` test images with their detections above ``thresh`` (solid, labelled) and the ground truth
    (dashed white)."""
    if n == 0:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = ds.records[:n]
    fig, axes = plt.subplots(1, len(recs), figsize=(4.5 * len(recs), 4.5), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, r in zip(axes[0], recs):
        try:
            ax.imshow(read_image(r.path))
        except UnreadableImage:
            ax.imshow(np.zeros((r.height, r.width, 3)))
        for (x1, y1, x2, y2) in r.boxes.tolist():
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", ls="--", lw=1))
        for c, name in enumerate(VOC_CLASSES):
            d = dets[name]
            for i, s, b in zip(d.image_ids, d.scores.tolist(), d.boxes.tolist()):
                if i == r.image_id and s >= thresh:
                    ax.add_patch(plt.Rectangle((b[0] - 1, b[1] - 1), b[2] - b[0] + 1, b[3] - b[1] + 1, fill=False,
                                               ec=colours(c), lw=2))
                    ax.text(b[0] - 1, b[1] - 1, f"{name} {s:.2f}", color="white", fontsize=7, va="bottom",
                            bbox=dict(facecolor=colours(c), alpha=0.8, pad=1, lw=0))
        ax.set_title(r.image_id, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"detections with score >= {thresh} (dashed: ground truth)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write_summary(out_dir: Path, results: dict[str, dict], cfg: DetConfig) -> None:
    """``results.json`` / ``results.md`` / ``ap_per_class.png`` over the rows, published numbers beside ours."""
    pct = lambda v: f"{100 * v:.1f}" if v is not None else "n/a"  # noqa: E731
    md = ["# VOC detection fine-tuning (Zhang et al. Table 2, detection)", "",
          f"Data: `{cfg.voc}` ({cfg.train_split} -> {cfg.test_split}); input {cfg.input}; Fast R-CNN recipe "
          f"({'RPN' if cfg.proposals == 'rpn' else 'precomputed'} proposals); AP as py-faster-rcnn voc_eval. "
          "Published: Zhang et al. ECCV16 Table 2 (pretext/data/published.tsv).", "",
          "| row | input | mAP (%) | published mAP (%) | COCO AP (%) | AP50 (%) | iterations | s/iter |",
          "|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        coco = r.get("coco") or {}
        pub = r.get("published_mAP")
        md.append(f"| {r['row']} | {r['input']} | {pct(r['mAP'])} | {f'{pub:.1f}' if pub is not None else '-'} | "
                  f"{pct(coco.get('AP'))} | {pct(coco.get('AP50'))} | {r['iterations']} | {r['seconds_per_iter']} |")
    md += ["", "## AP per class (%)", "", "| class | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    md += [f"| {c} | " + " | ".join(pct(r["ap"][c]) for r in results.values()) + " |" for c in VOC_CLASSES]
    atomic_write_text(out_dir / "results.md", "\n".join(md) + "\n")
    atomic_write_text(out_dir / "results.json", json.dumps({"config": config_to_dict(cfg), "runs": results}, indent=2))
    plot_ap(results, out_dir / "ap_per_class.png")


def plot_ap(results: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    k, x = len(results), np.arange(len(VOC_CLASSES))
    for j, (name, r) in enumerate(results.items()):
        vals = [100 * v if v is not None else 0 for v in r["ap"].values()]
        m = f"{100 * r['mAP']:.1f}" if r["mAP"] is not None else "n/a"
        ax.bar(x + (j - (k - 1) / 2) * 0.8 / k, vals, 0.8 / k, label=f"{name} (mAP {m})")
    ax.set_xticks(x, VOC_CLASSES, rotation=45, ha="right")
    ax.set(ylabel="AP (%)", ylim=(0, 100), title="VOC detection: AP per class")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- entry point
def get_data(cfg: DetConfig):
    root = find_voc_root(cfg.voc)
    train, tr_info = load_records(root, cfg.train_split, cfg, train=True)
    test, te_info = load_records(root, cfg.test_split, cfg, train=False)
    if cfg.proposals != "rpn":  # every file is there and readable before anything trains
        for r in train + test:
            read_proposals(cfg.proposals, r.image_id, cfg.proposals_max)
    log.info("VOC %s: %d training images (%s), %s: %d test images (%s)", cfg.train_split, len(train), tr_info["note"],
             cfg.test_split, len(test), te_info["note"])
    return train, test, root, {"train": [r.image_id for r in train], "dropped": tr_info["dropped_without_objects"]}


def check_resumable(path: str, row: str, cfg: DetConfig, run_dir: Path, allow_change: bool, dist_info, device,
                    config: bool = True) -> None:
    """Before anything is written: ``path`` is a detection checkpoint of ``row`` and, with ``config``, the config
    keeps its recipe (:data:`GUARDED`; other changes are recorded in ``config_history.jsonl`` by the main process).
    All ranks agree."""
    error = None
    if dist_info.is_main:
        try:
            ckpt = load_checkpoint(path)
            if ckpt.get("format") != FORMAT or ckpt.get("row") != row:
                what = (f"row '{ckpt.get('row')}'" if ckpt.get("format") == FORMAT else ckpt.get("format")
                        or ("a pretext checkpoint" if "model_name" in ckpt else "no format"))
                raise UserError(f"{path}: not a detection checkpoint of row '{row}' ({what}); --resume takes a "
                                "checkpoint that this command wrote (give a pretext checkpoint with --checkpoint)")
            if config:
                check_resume_config(ckpt["config"], config_to_dict(cfg), GUARDED, allow_change, run_dir, ckpt["iter"])
        except UserError as e:
            error = e
    if any_process([error is not None], device)[0]:
        raise error or UserError(f"{path}: refused by the main process (see its error)")


def main(args) -> int:
    extra = [f"{k}={getattr(args, k)}" for k in ("voc", "checkpoint") if getattr(args, k, None)]
    args.overrides = list(getattr(args, "overrides", None) or []) + extra
    cfg = config_from_args(DetConfig, args)
    return run(cfg, getattr(args, "resume", None), getattr(args, "force", False),
               getattr(args, "allow_config_change", False))


def run(cfg: DetConfig, resume: str | None = None, force: bool = False, allow_change: bool = False) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.images_per_batch % world:
        raise UserError(f"images_per_batch {cfg.images_per_batch} (global) is not divisible by the {world} processes")
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
            data = get_data(cfg)  # a bad VOC folder is refused before the run folder is created
            check_sources(cfg.rows, cfg.checkpoint, cfg.supervised, cfg.input, "linear", cfg.seed)  # unreadable or unknown backbone sources
            if resume not in (None, "auto"):  # and a --resume file of another kind
                check_resumable(resume, cfg.rows[0], cfg, out_dir, allow_change, dist_info, device, config=False)
        if dist_info.is_main:
            lock = open_run_dir(out_dir, held, lock)
        barrier()
        plan = []
        for row in cfg.rows:
            run_dir = out_dir / row
            done = (run_dir / "results.json").is_file() and resume is not None
            plan.append((row, run_dir, None if done else resolve_resume(resume, run_dir / "checkpoint.pth", force), done))
        for row, run_dir, ckpt, _ in plan:
            if ckpt:
                check_resumable(ckpt, row, cfg, run_dir, allow_change, dist_info, device)
        if dist_info.is_main:
            save_config(cfg, out_dir)
        results = {}
        with GracefulStop() as stop:
            for row, run_dir, ckpt, done in plan:
                if done:
                    log.info("%s: finished earlier, results kept", row)
                    results[row] = json.loads((run_dir / "results.json").read_text())
                    continue
                if dist_info.is_main:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    remove_stale_tmp(run_dir)
                res, stopped = run_one(cfg, row, run_dir, ckpt, data, dist_info, device, stop)
                if stopped:
                    log.warning("%s received: stopped row '%s' at a checkpoint in %s; continue with: %s",
                                stop.name or "stop signal", row, run_dir, resume_command())
                    return stop.exit_code  # 0 on a rank that only followed the others
                if dist_info.is_main:
                    results[row] = res
                    log.info("%s: mAP %s over %d classes (%s)", row,
                             f"{100 * res['mAP']:.2f}" if res["mAP"] is not None else "n/a",
                             res["num_classes_evaluated"], res["ap_type"])
        if dist_info.is_main:
            write_summary(out_dir, results, cfg)
            log.info("results: %s", out_dir / "results.md")
        return 0
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("transfer.detection", description="Fine-tune on PASCAL VOC detection with Fast R-CNN's "
                                "recipe (Zhang et al. Table 2): one row per backbone, published numbers beside.")
    add_config_args(p)
    add_resume_arg(p)
    p.add_argument("--voc", help="VOCdevkit/ or VOCdevkit/VOC2007/ (same as --set voc=...)")
    p.add_argument("--checkpoint", help="pretext checkpoint to fine-tune (same as --set checkpoint=...)")
    return p


if __name__ == "__main__":
    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
