"""VOC07 linear SVM benchmark on frozen features, as Goyal et al. ICCV19 ("Scaling and Benchmarking Self-Supervised
Visual Representation Learning") release it in facebookresearch/fair_self_supervision_benchmark.

    crosschannel svm -c configs/svm/voc07_alexnet_cc.yaml --checkpoint runs/pretext/checkpoint.pth

The protocol (see PROVENANCE.md for the files):

* features: the whole image resized to 227 x 227 (shorter side to 256, then the whole image to 227 x 227; no crop),
  every tap average-pooled with a fixed kernel / stride (AlexNet: conv1 19/4 -> 10x10x96, conv2 12/3 -> 6x6x256,
  conv3 and conv4 9/1 -> 5x5x384, conv5 8/1 -> 6x6x256), each image's vector divided by (its L2 norm + 1e-5);
* per class and cost, a ``LinearSVC`` (squared hinge, L2, C = cost, class_weight {1: 2, -1: 1}, tol 1e-4, dual,
  2000 iterations) scored by unshuffled 3-fold cross-validation with scikit-learn's ``average_precision``; the cost
  with the highest mean (the first in the cost list on ties) is refit on all of trainval;
* costs 1e-7, 1e-6, ..., 10, 100 and 0.5^4, ..., 0.5^19 (26 values, in that order);
* difficult-only images are negatives in training and left out of that class's test AP; the test AP is their
  area under the precision/recall curve with the precision made monotone (:func:`goyal_ap`).

An unreadable image is skipped and counted (with any number of loader workers): one warning naming it, its path
and reason in ``results.json`` (``skipped_unreadable``), the counts in the notes. Outputs ``results.json`` and
``results.md`` (per tap: pooled shape and pooling, mAP, per-class AP; published figures beside ours).

Every config value has declared limits, checked with the data and encoder before ``out_dir`` is created; one run per
``out_dir`` (``RunLock``). There is no training loop to checkpoint: the run's state is ``features.npz`` (both splits'
features, written once both are extracted) and ``svm_done.jsonl`` (one line per finished (tap, class) SVM). A stop
signal (SIGTERM, SIGINT, SIGUSR1) ends the run at the next batch or group of SVMs with exit 128 + signal and a line
giving the command that continues; ``--resume`` reuses the features (if the encoder, images and feature settings are
unchanged) and the finished SVMs (if the SVM settings are unchanged; changes need ``--allow-config-change``).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretext.data import UnreadableImage, eval_transform, pil_to_tensor, read_image
from pretext.decode import DECODER
from pretext.runtime import (
    GracefulStop,
    JsonlLogger,
    RunLock,
    UserError,
    add_config_args,
    add_resume_arg,
    atomic_write,
    atomic_write_text,
    autocast_dtype,
    check_resume_config,
    config_to_dict,
    ignore_stop_signals,
    log,
    param,
    read_jsonl,
    remove_stale_tmp,
    resolve_resume,
    save_config,
    seed_everything,
    select_device,
    setup_logging,
)

from .cache import pool_features
from .compare import pooling_label
from .encoder import GEOMETRIES, add_encoder_args, build_encoder, check_encoder_source, fingerprint, load_encoder_config
from .heads import POOL_MODES, TapPools
from transfer.voc import AP_TYPES, VOC_CLASSES, average_precision, load_voc_split

# tools/svm/svm_helper.py parse_cost_list(): the costs given on the command line (GETTING_STARTED.md) + 0.5^4..0.5^19
GOYAL_COSTS = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0] + [0.5 ** k for k in range(4, 20)]
# configs/benchmark_tasks/image_classification/voc07/alexnet_colorization_extract_features.yaml EXTRACT_BLOBS and
# self_supervision_benchmark/modeling/colorization/alexnet_colorize_finetune_linear.py AveragePool (kernel, stride)
GOYAL_POOLING = {"conv1": [19, 4], "conv2": [12, 3], "conv3": [9, 1], "conv4": [9, 1], "conv5": [8, 1]}
SVM_AP_TYPES = ("goyal", *AP_TYPES)
RESIZE_MODES = ("whole", "center_crop")
FEATURES_FORMAT = "crosschannel/svm-features-v1"


AMP_MODES = ("auto", "bf16", "bfloat16", "fp16", "float16", "none", "off", "fp32")
# keys the extracted features depend on: a rerun with --resume reuses out_dir/features.npz only if they are unchanged
FEATURE_KEYS = ("checkpoint", "random_init", "supervised", "model_kwargs", "geometry", "data", "train_split",
                "test_split", "classes", "fallback_split", "fallback_test_fraction", "resize_mode", "resize", "crop",
                "taps", "pool", "pool_kernels", "max_dims", "seed")
# keys the SVMs depend on: a change on resume is refused without --allow-config-change, then the SVMs are redone
SVM_KEYS = ("costs", "cv_folds", "ap", "pos_weight", "max_iter", "tol", "dual")


@dataclasses.dataclass(frozen=True)
class SVMConfig:
    # encoder: exactly one source (the CLI flags set these keys)
    checkpoint: str = ""
    random_init: str = ""
    supervised: str = ""
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    label: str = ""
    geometry: str = param("transfer", choices=GEOMETRIES)  #: transfer (alexnet_cc -> standard AlexNet) | pretext
    # data: VOCdevkit/, VOCdevkit/VOC2007/ or a folder with JPEGImages/ + Annotations/
    data: str = ""
    train_split: str = "trainval"
    test_split: str = "test"
    classes: list[str] = dataclasses.field(default_factory=lambda: list(VOC_CLASSES))
    fallback_split: str = param("random", choices=("random", "all", "error"))  #: without ImageSets/Main: random (seeded split) | all (train = test, smoke test) | error
    fallback_test_fraction: float = param(0.5, gt=0, lt=1)
    resize_mode: str = param("whole", choices=RESIZE_MODES)  #: whole (Goyal et al.: scale, then the whole image to crop x crop) | center_crop
    resize: int = param(256, ge=16, le=4096)  #: shorter side first scaled to this
    crop: int = param(227, ge=16, le=2048)  #: final size (whole: the whole image; center_crop: the crop)
    # features
    taps: list[str] = dataclasses.field(default_factory=lambda: list(GOYAL_POOLING))
    pool: str = param("fixed", choices=POOL_MODES)  #: fixed (pool_kernels) | avg (Fig. 7 rule) | bilinear | adaptive
    pool_kernels: dict = dataclasses.field(default_factory=lambda: dict(GOYAL_POOLING))  #: tap -> [kernel, stride]
    max_dims: int = param(10000, ge=1, le=1_000_000)  #: for pool avg / bilinear / adaptive
    # SVMs
    costs: list[float] = param(default_factory=lambda: list(GOYAL_COSTS), gt=0, le=1e12)
    cv_folds: int = param(3, ge=2, le=100)
    ap: str = param("goyal", choices=SVM_AP_TYPES)  #: goyal (their test AP) | area (VOC2010+ devkit) | voc07_11pt (VOC2007 devkit)
    pos_weight: float = param(2.0, gt=0, le=1e6)  #: class_weight {1: pos_weight, -1: 1}
    max_iter: int = param(2000, ge=1, le=10_000_000)
    tol: float = param(1e-4, gt=0, le=1)
    dual: str = "true"  #: true (theirs) | false | auto (LinearSVC dual)
    n_jobs: int = param(1, ge=-1, le=1024)  #: (tap, class) SVMs trained in parallel (-1: all cores)
    # runtime
    batch_size: int = param(64, ge=1, le=65536)
    workers: int = param(4, ge=0, le=256)
    amp: str = param("auto", choices=AMP_MODES)
    device: str = "auto"  #: auto | cpu | mps | cuda | cuda:N
    seed: int = param(0, ge=0, lt=2**32)  #: LinearSVC random_state (theirs is unset) and the fallback split
    out_dir: str = "runs/svm"
    progress: bool = True

    def validate(self) -> None:
        """Combinations and free-form values, checked before anything is created or allocated."""
        check_encoder_source(self)
        if str(self.dual).lower() not in ("auto", "true", "false"):
            raise UserError(f"config key 'dual': must be auto, true or false; got {self.dual!r}")
        if self.n_jobs == 0:
            raise UserError("config key 'n_jobs': must be >= 1, or -1 for all cores; got 0")
        if not self.taps:
            raise UserError("config key 'taps': give at least one tap")
        if not self.costs:
            raise UserError("config key 'costs': give at least one cost")
        if not self.classes:
            raise UserError("config key 'classes': give at least one class")
        if self.resize_mode == "center_crop" and self.resize < self.crop:
            raise UserError(f"config keys 'resize' ({self.resize}) and 'crop' ({self.crop}): resize must be >= crop")
        for tap, ks in self.pool_kernels.items():
            if not (isinstance(ks, (list, tuple)) and len(ks) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                          and 1 <= v <= 1024 for v in ks)):
                raise UserError(f"config key 'pool_kernels.{tap}': [kernel, stride], integers in 1..1024; got {ks!r}")
        if not self.out_dir:
            raise UserError("config key 'out_dir': give a folder")


# --------------------------------------------------------------------------------------------- images
def resize_whole(rgb: torch.Tensor, scale: int = 256, size: int = 227) -> torch.Tensor:
    """(3, H, W) -> (3, size, size): the shorter side to ``scale`` (the longer one floored), then the whole image
    to ``size`` x ``size``; both bilinear without antialiasing (OpenCV ``INTER_LINEAR``, as their
    ``data_transformation.scale`` and ``global_resize``)."""
    x = rgb[None].float()
    h, w = x.shape[-2:]
    if not ((w <= h and w == scale) or (h <= w and h == scale)):
        nh, nw = (math.floor(h / w * scale), scale) if w < h else (scale, math.floor(w / h * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0]


class _Images(torch.utils.data.Dataset):
    """(image, ok, index, reason): an unreadable file gives a zero image, ok False and the reason (in any worker)."""

    def __init__(self, paths, cfg: SVMConfig):
        self.paths = list(paths)
        self.mode, self.resize, self.crop = cfg.resize_mode, cfg.resize, cfg.crop
        self.center = eval_transform(cfg.crop, cfg.resize) if cfg.resize_mode == "center_crop" else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = read_image(self.paths[i])
            x = self.center(img) if self.center is not None else resize_whole(pil_to_tensor(img), self.resize, self.crop)
        except UnreadableImage as e:
            return torch.zeros(3, self.crop, self.crop), False, i, e.reason
        except Exception as e:  # noqa: BLE001 - a decodable but unusable image (e.g. a 1 x 60000 strip): skip it too
            return torch.zeros(3, self.crop, self.crop), False, i, f"cannot resize ({type(e).__name__}: {str(e)[:100]})"
        return x, True, i, ""


def extract_features(encoder, pooler: TapPools, paths, cfg: SVMConfig, device, stop: GracefulStop | None = None
                     ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]] | None:
    """Pooled float32 features of every tap, a mask of the readable images, and 'path: reason' of the others (one
    warning each; the run goes on without them, whichever loader worker read them). None if ``stop`` was
    requested (checked after every batch)."""
    from tqdm import tqdm

    n = len(paths)
    feats = {t: np.zeros((n, d), np.float32) for t, d in pooler.dims.items()}
    ok = np.zeros(n, bool)
    failed: list[str] = []
    loader = torch.utils.data.DataLoader(_Images(paths, cfg), batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         shuffle=False, pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals)
    amp = autocast_dtype(cfg.amp, device)
    for x, good, idx, reason in tqdm(loader, desc="features", disable=not cfg.progress, leave=False):
        for j in (~good).nonzero().flatten().tolist():
            failed.append(f"{paths[int(idx[j])]}: {reason[j]}")
            log.warning("skipped %s: %s", paths[int(idx[j])], reason[j])
        if not bool(good.any()):
            continue
        pooled = pool_features(encoder, pooler, x[good].to(device, non_blocking=True), amp)
        rows = idx[good].numpy()
        for t, v in pooled.items():
            feats[t][rows] = v.float().cpu().numpy()
        ok[rows] = True
        if stop is not None and stop.requested:
            return None
    return feats, ok, failed


# --------------------------------------------------------------------------------------------- SVMs
def normalize_features(x: np.ndarray) -> np.ndarray:
    """float64 rows divided by (their L2 norm + 1e-5) (svm_helper.normalize_features)."""
    x = np.asarray(x, np.float64)
    return x / (np.linalg.norm(x, axis=1) + 1e-5)[:, None]


def goyal_ap(scores, labels) -> float:
    """Their test AP (svm_helper.get_precision_recall + calculate_ap): images ranked by ``argsort(scores)``
    reversed; precision/recall after each; precision made non-increasing from the right; AP = sum over the recall
    steps of (step) * precision. ``labels``: > 0 positive, anything else negative (drop ignored images first)."""
    scores = np.asarray(scores, np.float64)
    pos = (np.asarray(labels) > 0).astype(np.float64)
    order = np.argsort(scores)[::-1]
    tp = np.cumsum(pos[order])
    fp = np.cumsum(1.0 - pos[order])
    prec = tp / (tp + fp)
    rec = tp / pos.sum()
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def _svc(cost: float, cfg: SVMConfig):
    from sklearn.svm import LinearSVC

    dual = {"auto": "auto", "true": True, "false": False}[cfg.dual.lower()]
    return LinearSVC(C=cost, class_weight={1: cfg.pos_weight, -1: 1}, intercept_scaling=1.0, penalty="l2",
                     loss="squared_hinge", tol=cfg.tol, dual=dual, max_iter=cfg.max_iter, random_state=cfg.seed)


def ap_on_test(scores, labels, kind: str) -> float:
    """AP of one class on the test set; ``labels`` in {1, 0 (difficult-only: left out), -1}."""
    labels = np.asarray(labels)
    keep = labels != 0
    if kind == "goyal":
        return goyal_ap(np.asarray(scores)[keep], labels[keep])
    return average_precision(scores, labels, kind)


def train_class(X: np.ndarray, labels: np.ndarray, X_test: np.ndarray, labels_test: np.ndarray, cfg: SVMConfig) -> dict:
    """One class: cross-validated AP of every cost, refit of the best on all training data, AP on the test set.

    Args:
        X, X_test: (N, D) normalised features (:func:`normalize_features`).
        labels, labels_test: (N,) in {1, 0 (difficult-only), -1}.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_score

    y = np.where(labels == 1, 1, -1)  # difficult-only images are negatives in training
    npos, nneg = int((y == 1).sum()), int((y == -1).sum())
    rec = {"n_pos_train": npos, "n_pos_test": int((labels_test == 1).sum()),
           "n_difficult_test": int((labels_test == 0).sum()), "cost": None, "cv_ap": None, "ap": math.nan, "note": ""}
    if npos == 0 or nneg == 0:
        rec["note"] = "no positives in training" if npos == 0 else "no negatives in training"
        return rec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if min(npos, nneg) >= cfg.cv_folds >= 2:
            # an integer cv with a classifier is StratifiedKFold(cv_folds) without shuffling, as theirs
            cv = [float(cross_val_score(_svc(c, cfg), X, y, cv=cfg.cv_folds, scoring="average_precision").mean())
                  for c in cfg.costs]
            best = cfg.costs[int(np.argmax(cv))]  # the first of the best in list order (np.argmax, theirs)
            rec["cv_ap"] = {repr(float(c)): v for c, v in zip(cfg.costs, cv)}
        else:
            best = cfg.costs[len(cfg.costs) // 2]
            rec["note"] = f"too few positives/negatives for {cfg.cv_folds}-fold CV: cost {best} without CV"
        clf = _svc(best, cfg).fit(X, y)
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    rec["cost"] = float(best)
    if unconverged:
        rec["unconverged_fits"] = unconverged
    if rec["n_pos_test"] == 0:
        rec["note"] = (rec["note"] + "; " if rec["note"] else "") + "no positives in test"
        return rec
    rec["ap"] = ap_on_test(clf.decision_function(X_test), labels_test, cfg.ap)
    return rec


# --------------------------------------------------------------------------------------------- outputs
def published_rows() -> list[dict]:
    from pretext.published import published

    return published("voc07_svm")


def write_results(out_dir: Path, results: dict) -> None:
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    taps = list(results["taps"])
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# VOC07 linear SVM: {results['label']}", "",
             f"{results['num_train']} train / {results['num_test']} test images ({results['resize_mode']} resize to "
             f"{results['crop']}), AP {results['ap_type']}, {len(results['costs'])} costs, {results['cv_folds']}-fold CV",
             "", "| tap | activation | pooling | pooled (h x w x C) | dims | mAP (%) |", "|---|---|---|---|---|---|"]
    for t, r in results["taps"].items():
        c, h, w = r["pooled_shape"]
        lines.append(f"| {t} | {'x'.join(map(str, r['shape']))} | {pooling_label(r['pooling'])} | {h}x{w}x{c} | "
                     f"{r['dims']} | {pct(r['mAP'])} ({r['num_evaluated']} classes) |")
    lines += ["", "AP (%) per class:", "", "| class | " + " | ".join(taps) + " |", "|---|" + "---|" * len(taps)]
    for c in results["class_names"]:
        lines.append(f"| {c} | " + " | ".join(pct(results["taps"][t]["classes"][c]["ap"]) for t in taps) + " |")
    lines += ["", "Published figures (pretext/data/published.tsv, benchmark `voc07_svm`):", ""]
    if results["published"]:
        lines += ["| method | setting | metric | value | source |", "|---|---|---|---|---|"]
        lines += [f"| {p['method']} | {p['setting']} | {p['metric']} | {p['value']:.2f} | {p['source']} |"
                  for p in results["published"]]
    else:
        lines.append("none in the table (see PROVENANCE.md for the figures that could not be verified).")
    if results["notes"]:
        lines += ["", *[f"- {n}" for n in results["notes"]]]
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------- state
# The SVM benchmark has no training loop to checkpoint. Its state in out_dir is what is expensive to redo: the
# features of both splits (features.npz, written atomically once both are extracted) and every finished (tap, class)
# SVM (svm_done.jsonl, one line each). A stop signal ends the run at the next batch or group of SVMs; --resume
# continues from that state.
def feature_key(fp: str, cfg: SVMConfig, tr_paths, te_paths) -> str:
    parts = dict(encoder=fp, decoder=DECODER, train=[str(p) for p in tr_paths], test=[str(p) for p in te_paths],
                 config={k: config_to_dict(cfg)[k] for k in FEATURE_KEYS})
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def save_features(path: Path, key: str, cfg: SVMConfig, splits: dict[str, tuple]) -> None:
    arrays = {"meta": np.array(json.dumps({"format": FEATURES_FORMAT, "key": key, "config": config_to_dict(cfg),
                                           "bad": {n: sp[2] for n, sp in splits.items()}}))}
    for name, (feats, ok, _) in splits.items():
        arrays[f"{name}/ok"] = ok
        arrays.update({f"{name}/{t}": v for t, v in feats.items()})
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_features_meta(path: str | Path) -> dict:
    """The meta record of an SVM features file, or one line saying what the file is instead."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except Exception as e:  # noqa: BLE001 - a torch checkpoint, a truncated file, ...: not our state
        raise UserError(f"{path}: not the features.npz of an svm run ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FEATURES_FORMAT:
        raise UserError(f"{path}: not the features.npz of an svm run")
    return meta


def load_features(path: str | Path, taps) -> dict[str, tuple]:
    meta = read_features_meta(path)
    with np.load(path, allow_pickle=False) as z:
        return {n: ({t: z[f"{n}/{t}"] for t in taps}, z[f"{n}/ok"], list(meta["bad"][n])) for n in ("train", "test")}


def svm_resume_command(argv: list[str] | None = None) -> str:
    from .train import resume_command

    return resume_command(argv).replace("python -m linear_probe.train", "python -m linear_probe.svm")


def main(args) -> int:
    cfg = load_encoder_config(SVMConfig, args)
    setup_logging(None)
    seed_everything(cfg.seed)
    t0 = time.time()
    # everything that can be refused is checked before out_dir is created
    if not cfg.data:
        raise UserError("no data: set 'data' to a VOCdevkit / VOC2007 folder")
    classes = tuple(cfg.classes)
    split_kw = dict(classes=classes, fallback=cfg.fallback_split, fallback_test_fraction=cfg.fallback_test_fraction,
                    seed=cfg.seed)
    tr_paths, tr_labels, tr_note = load_voc_split(cfg.data, cfg.train_split, **split_kw)
    te_paths, te_labels, te_note = load_voc_split(cfg.data, cfg.test_split, **split_kw)
    device = select_device(cfg.device)
    encoder, spec = build_encoder(list(cfg.taps), cfg.checkpoint or None, cfg.random_init or None,
                                  cfg.supervised or None, dict(cfg.model_kwargs), cfg.seed, cfg.geometry)
    try:
        shapes = encoder.tap_shapes(cfg.crop)
    except RuntimeError as e:
        raise UserError(f"crop {cfg.crop} is too small for the taps of {spec.name} ({str(e).splitlines()[0][:160]})") from None
    encoder.to(device)
    try:
        pooler = TapPools(shapes, cfg.pool, cfg.max_dims, {t: tuple(v) for t, v in cfg.pool_kernels.items()})
    except ValueError as e:
        raise UserError(f"{e} (set pool_kernels.TAP=[kernel,stride] or another pool)") from None
    fp = fingerprint(encoder)
    key = feature_key(fp, cfg, tr_paths, te_paths)
    resume = getattr(args, "resume", None)
    if resume not in (None, "auto"):
        read_features_meta(resume)  # a wrong file is refused before out_dir is created
    out_dir = Path(cfg.out_dir)
    with RunLock(out_dir):
        remove_stale_tmp(out_dir)
        setup_logging(out_dir)
        state = resolve_resume(resume, out_dir / "features.npz", getattr(args, "force", False))
        splits, done = None, {}
        done_path = out_dir / "svm_done.jsonl"
        if state:
            meta = read_features_meta(state)
            changes = check_resume_config(meta["config"], config_to_dict(cfg), (*FEATURE_KEYS, *SVM_KEYS),
                                          getattr(args, "allow_config_change", False), out_dir, 0)
            if meta["key"] == key:
                splits = load_features(state, pooler.taps)
                log.info("features: reusing %s", state)
            if splits is not None and not any(k in SVM_KEYS for k in changes) and done_path.is_file():
                done = {(r["tap"], r["class"]): r["rec"] for r in read_jsonl(done_path)}
                log.info("SVMs: %d (tap, class) pairs finished earlier", len(done))
        if not done and done_path.exists():
            done_path.unlink()
        save_config(cfg, out_dir)
        with GracefulStop() as stop:
            return _run(cfg, args, stop, t0, encoder, spec, shapes, pooler, device, fp, key, classes,
                        (tr_paths, tr_labels, tr_note), (te_paths, te_labels, te_note), splits, done, out_dir)


def _run(cfg: SVMConfig, args, stop: GracefulStop, t0: float, encoder, spec, shapes, pooler, device, fp, key, classes,
         train_split, test_split, splits, done, out_dir: Path) -> int:
    (tr_paths, tr_labels, tr_note), (te_paths, te_labels, te_note) = train_split, test_split
    pooling = pooler.describe()
    log.info("encoder %s; %d train (%s) / %d test (%s) images", spec.label, len(tr_paths), tr_note, len(te_paths), te_note)
    for t in pooler.taps:
        log.info("  tap %-6s %-12s %-18s -> %d dims", t, "x".join(map(str, shapes[t])), pooling_label(pooling[t]),
                 pooler.dims[t])

    def stopped(where: str) -> int:
        log.warning("%s received: stopped %s; continue with: %s", stop.name or "a stop signal", where, svm_resume_command())
        return stop.exit_code

    if splits is None:
        splits = {}
        for name, paths in (("train", tr_paths), ("test", te_paths)):
            got = extract_features(encoder, pooler, paths, cfg, device, stop)
            if got is None:
                return stopped(f"while extracting {name} features (nothing kept: they are saved once both splits are done)")
            splits[name] = got
        save_features(out_dir / "features.npz", key, cfg, splits)
    (F_tr, ok_tr, bad_tr), (F_te, ok_te, bad_te) = splits["train"], splits["test"]
    if not ok_tr.any() or not ok_te.any():
        raise UserError(f"{cfg.data}: no readable image in the {'train' if not ok_tr.any() else 'test'} split")
    if bad_tr or bad_te:
        log.warning("skipped %d unreadable image(s) (%d train, %d test), see the warnings above; the SVMs use the other "
                    "%d train / %d test images", len(bad_tr) + len(bad_te), len(bad_tr), len(bad_te), int(ok_tr.sum()),
                    int(ok_te.sum()))
    tr_labels, te_labels = tr_labels[ok_tr], te_labels[ok_te]
    t_feat = time.time() - t0

    from joblib import Parallel, delayed

    jobs = [(t, c) for t in pooler.taps for c in range(len(classes))]
    X = {t: normalize_features(F_tr[t][ok_tr]) for t in pooler.taps}
    X_te = {t: normalize_features(F_te[t][ok_te]) for t in pooler.taps}
    pending = [(t, c) for t, c in jobs if (t, classes[c]) not in done]
    chunk = max(1, cfg.n_jobs if cfg.n_jobs > 0 else (os.cpu_count() or 1)) * 2
    record = JsonlLogger(out_dir / "svm_done.jsonl")
    for s in range(0, len(pending), chunk):
        part = pending[s:s + chunk]
        try:
            recs = Parallel(n_jobs=cfg.n_jobs)(delayed(train_class)(X[t], tr_labels[:, c], X_te[t], te_labels[:, c], cfg)
                                               for t, c in part)
        except Exception:  # noqa: BLE001 - workers killed by the same signal (a terminal's Ctrl-C)
            if stop.requested:
                return stopped(f"after {len(jobs) - len(pending) + s} of {len(jobs)} SVMs (finished ones kept)")
            raise
        for (t, c), r in zip(part, recs):
            done[(t, classes[c])] = r
            record.log(tap=t, **{"class": classes[c]}, rec=r)
        if stop.requested and s + chunk < len(pending):
            return stopped(f"after {len(jobs) - len(pending) + s + len(part)} of {len(jobs)} SVMs (finished ones kept)")
    per_tap: dict[str, dict] = {}
    for t, c in jobs:
        r = done[(t, classes[c])]
        r = dict(r, ap=None if r["ap"] is None or math.isnan(r["ap"]) else r["ap"])
        per_tap.setdefault(t, {})[classes[c]] = r
    taps_out = {}
    for t in pooler.taps:
        aps = [r["ap"] for r in per_tap[t].values() if r["ap"] is not None]
        taps_out[t] = {"shape": list(shapes[t]), "pooled_shape": pooling[t]["out"], "pooling": pooling[t],
                       "dims": pooler.dims[t], "mAP": float(np.mean(aps)) if aps else None, "num_evaluated": len(aps),
                       "classes": per_tap[t]}
        log.info("  %-6s mAP %s over %d classes", t, "n/a" if not aps else f"{100 * np.mean(aps):.2f}", len(aps))
    notes = sorted({n for n in (tr_note, te_note) if not n.startswith("ImageSets")})
    skipped = sorted({c for t in taps_out for c, r in per_tap[t].items() if r["ap"] is None})
    if skipped:
        notes.append(f"no AP for {', '.join(skipped)} (no positives in training or in test); mAP over the others")
    if bad_tr or bad_te:
        notes.append(f"skipped {len(bad_tr) + len(bad_te)} unreadable image(s): {len(bad_tr)} train, {len(bad_te)} test")
    results = {"label": cfg.label or spec.label, "encoder": dataclasses.asdict(spec), "encoder_fingerprint": fp,
               "geometry": spec.extra.get("geometry", "pretext"), "resize_mode": cfg.resize_mode, "crop": cfg.crop,
               "ap_type": cfg.ap, "costs": list(cfg.costs), "cv_folds": cfg.cv_folds,
               "num_train": int(ok_tr.sum()), "num_test": int(ok_te.sum()), "class_names": list(classes),
               "skipped_unreadable": {"train": bad_tr, "test": bad_te}, "taps": taps_out, "notes": notes,
               "published": published_rows(),
               "seconds": {"features": round(t_feat, 1), "total": round(time.time() - t0, 1)}}
    write_results(out_dir, results)
    log.info("results: %s", out_dir / "results.md")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("linear_probe.svm", description="VOC07 linear SVM benchmark on frozen features.")
    add_config_args(p)
    add_encoder_args(p)
    add_resume_arg(p)
    p.epilog = ("--resume reuses out_dir/features.npz (both splits' features) and the SVMs finished in "
                "out_dir/svm_done.jsonl; a stop signal (SIGTERM, SIGINT, SIGUSR1) keeps them")
    return p


if __name__ == "__main__":
    import sys

    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
