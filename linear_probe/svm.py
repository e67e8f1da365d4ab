"""VOC07 linear SVM benchmark on frozen features (Goyal et al. ICCV19, "Scaling and Benchmarking Self-Supervised
Visual Representation Learning"; the VISSL implementation).

    crosschannel svm -c configs/svm/voc07_alexnet_cc_conv5.yaml --checkpoint runs/pretext/checkpoint.pth

Features of one tap (pooled to <= ``max_dims`` as for the linear probes) on trainval and test, L2-normalised
per image. One ``LinearSVC`` per class (squared hinge, L2 penalty, class_weight {1: 2, -1: 1}); its cost is picked
from ``costs`` by ``cv_folds``-fold cross-validation of AP on trainval, then refit on all of trainval. Difficult-only
images are negatives in training and excluded at test time. Outputs ``results.json`` and ``results.md`` (per-class
AP and mAP) in ``out_dir``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pretext.data import UnreadableImage, eval_transform, read_image
from pretext.runtime import (
    UserError,
    add_config_args,
    atomic_write_text,
    autocast_dtype,
    log,
    save_config,
    seed_everything,
    select_device,
    setup_logging,
)

from .cache import Indexed, extract_pooled
from .encoder import add_encoder_args, build_encoder, fingerprint, load_encoder_config
from .heads import TapPools
from transfer.voc import AP_TYPES, VOC_CLASSES, average_precision, load_voc_split


@dataclasses.dataclass(frozen=True)
class SVMConfig:
    # encoder: exactly one source (the CLI flags set these keys)
    checkpoint: str = ""
    random_init: str = ""
    supervised: str = ""
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    label: str = ""
    # data: VOCdevkit/, VOCdevkit/VOC2007/ or a folder with JPEGImages/ + Annotations/
    data: str = ""
    train_split: str = "trainval"
    test_split: str = "test"
    classes: list[str] = dataclasses.field(default_factory=lambda: list(VOC_CLASSES))
    fallback_split: str = "random"  #: without ImageSets/Main: random (seeded split) | all (train = test, smoke test)
    fallback_test_fraction: float = 0.5
    crop: int = 227
    resize: int = 256
    # features
    tap: str = "conv5"
    pool: str = "avg"  #: avg | bilinear, to <= max_dims (conv5 of AlexNet at 227: 6x6x256 = 9216)
    max_dims: int = 10000
    # SVMs
    costs: list[float] = dataclasses.field(default_factory=lambda: [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0])
    cv_folds: int = 3
    ap: str = "area"  #: area (VOC2010+ devkit; Goyal et al. / VISSL code) | voc07_11pt (VOC2007 devkit)
    pos_weight: float = 2.0  #: class_weight {1: pos_weight, -1: 1}
    max_iter: int = 2000
    dual: str = "auto"  #: auto | true | false (LinearSVC dual)
    n_jobs: int = 1  #: classes trained in parallel
    # runtime
    batch_size: int = 64
    workers: int = 4
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/svm"
    progress: bool = True


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.transform(read_image(self.paths[i])), 0
        except UnreadableImage as e:  # one line naming the file; the run goes on without this image's features
            raise UserError(f"{e} (remove it from the VOC split or fix the file)") from None


def l2_normalize(x: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def _svc(cost: float, cfg: SVMConfig):
    from sklearn.svm import LinearSVC

    dual = {"auto": "auto", "true": True, "false": False}[cfg.dual.lower()]
    return LinearSVC(C=cost, class_weight={1: cfg.pos_weight, -1: 1}, penalty="l2", loss="squared_hinge",
                     max_iter=cfg.max_iter, dual=dual, random_state=cfg.seed)


def train_class(X: np.ndarray, labels: np.ndarray, X_test: np.ndarray, labels_test: np.ndarray, cfg: SVMConfig) -> dict:
    """One class: pick the cost by cross-validated AP, refit on all training data, AP on the test set.

    Args:
        X, X_test: (N, D) L2-normalised features.
        labels, labels_test: (N,) in {1, 0 (difficult-only), -1}.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold

    y = np.where(labels == 1, 1, -1)  # difficult-only images are negatives in training (Goyal et al.)
    npos, nneg = int((y == 1).sum()), int((y == -1).sum())
    rec = {"n_pos_train": npos, "n_pos_test": int((labels_test == 1).sum()),
           "n_difficult_test": int((labels_test == 0).sum()), "cost": None, "cv_ap": None, "ap": math.nan, "note": ""}
    if npos == 0 or nneg == 0:
        rec["note"] = "no positives in training" if npos == 0 else "no negatives in training"
        return rec
    n_unconverged = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        folds = min(cfg.cv_folds, npos, nneg)
        if folds >= 2:
            skf = StratifiedKFold(folds, shuffle=True, random_state=cfg.seed)
            cv = {}
            for c in cfg.costs:
                aps = []
                for tr, va in skf.split(X, y):
                    clf = _svc(c, cfg).fit(X[tr], y[tr])
                    aps.append(average_precision(clf.decision_function(X[va]), y[va], cfg.ap))
                cv[c] = float(np.mean(aps))
            best = max(cfg.costs, key=lambda c: (cv[c], -c))  # ties: the smaller cost
            rec["cv_ap"] = {str(c): v for c, v in cv.items()}
        else:
            best = cfg.costs[len(cfg.costs) // 2]
            rec["note"] = f"too few positives/negatives for {cfg.cv_folds}-fold CV: cost {best} without CV"
        clf = _svc(best, cfg).fit(X, y)
        n_unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    rec["cost"] = best
    if n_unconverged:
        rec["unconverged_fits"] = n_unconverged
    if rec["n_pos_test"] == 0:
        rec["note"] = (rec["note"] + "; " if rec["note"] else "") + "no positives in test"
        return rec
    rec["ap"] = average_precision(clf.decision_function(X_test), labels_test, cfg.ap)
    return rec


def _features(encoder, pooler, paths, cfg: SVMConfig, device) -> np.ndarray:
    ds = Indexed(_Images(paths, eval_transform(cfg.crop, cfg.resize)))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers, shuffle=False,
                                         pin_memory=device.type == "cuda")
    feats, _ = extract_pooled(encoder, pooler, loader, device, autocast_dtype(cfg.amp, device), progress=cfg.progress,
                              desc="features")
    return l2_normalize(feats[cfg.tap])


def write_results(out_dir: Path, results: dict) -> None:
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    lines = [f"# VOC07 linear SVM: {results['label']}", "",
             f"tap {results['tap']} ({results['dims']} dims, L2-normalised), AP {results['ap_type']}, "
             f"{results['num_train']} train / {results['num_test']} test images", "",
             "| class | AP | cost | pos train | pos test |", "|---|---|---|---|---|"]
    for c, r in results["classes"].items():
        ap = "n/a" if r["ap"] is None else f"{100 * r['ap']:.2f}"
        lines.append(f"| {c} | {ap} | {r['cost'] if r['cost'] is not None else '-'} | {r['n_pos_train']} | {r['n_pos_test']} |")
    m = results["mAP"]
    lines.append(f"| **mAP** ({results['num_evaluated']} classes) | {'n/a' if m is None else f'{100 * m:.2f}'} | | | |")
    if results["notes"]:
        lines += ["", *[f"- {n}" for n in results["notes"]]]
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")


def main(args) -> int:
    cfg = load_encoder_config(SVMConfig, args)
    if cfg.ap not in AP_TYPES:
        raise UserError(f"ap must be one of {AP_TYPES}, got '{cfg.ap}'")
    if cfg.dual.lower() not in ("auto", "true", "false"):
        raise UserError(f"dual must be auto, true or false; got '{cfg.dual}'")
    if not cfg.data:
        raise UserError("no data: set 'data' to a VOCdevkit / VOC2007 folder")
    out_dir = Path(cfg.out_dir)
    setup_logging(out_dir)
    save_config(cfg, out_dir)
    seed_everything(cfg.seed)
    t0 = time.time()
    classes = tuple(cfg.classes)
    split_kw = dict(classes=classes, fallback=cfg.fallback_split, fallback_test_fraction=cfg.fallback_test_fraction,
                    seed=cfg.seed)
    tr_paths, tr_labels, tr_note = load_voc_split(cfg.data, cfg.train_split, **split_kw)
    te_paths, te_labels, te_note = load_voc_split(cfg.data, cfg.test_split, **split_kw)

    device = select_device(cfg.device)
    encoder, spec = build_encoder([cfg.tap], cfg.checkpoint or None, cfg.random_init or None, cfg.supervised or None,
                                  dict(cfg.model_kwargs), cfg.seed)
    encoder.to(device)
    chs = encoder.tap_shapes(cfg.crop)[cfg.tap][0]
    pooler = TapPools({cfg.tap: chs}, cfg.pool, cfg.max_dims)
    log.info("encoder %s, tap %s -> %d dims; %d train (%s) / %d test (%s) images", spec.label, cfg.tap,
             pooler.dims[cfg.tap], len(tr_paths), tr_note, len(te_paths), te_note)
    X, X_test = (_features(encoder, pooler, p, cfg, device) for p in (tr_paths, te_paths))
    t_feat = time.time() - t0

    from joblib import Parallel, delayed

    recs = Parallel(n_jobs=cfg.n_jobs)(delayed(train_class)(X, tr_labels[:, c], X_test, te_labels[:, c], cfg)
                                       for c in range(len(classes)))
    per_class = {}
    for name, r in zip(classes, recs):
        r = dict(r)
        r["ap"] = None if math.isnan(r["ap"]) else r["ap"]
        per_class[name] = r
        log.info("  %-12s AP %s  cost %s  %s", name, "n/a" if r["ap"] is None else f"{100 * r['ap']:.2f}", r["cost"], r["note"])
    aps = [r["ap"] for r in per_class.values() if r["ap"] is not None]
    notes = sorted({n for n in (tr_note, te_note) if not n.startswith("ImageSets")})
    skipped = [c for c, r in per_class.items() if r["ap"] is None]
    if skipped:
        notes.append(f"mAP over {len(aps)} of {len(classes)} classes; no AP for {', '.join(skipped)} "
                     "(no positives in training or in test)")
    results = {"label": cfg.label or spec.label, "encoder": dataclasses.asdict(spec), "encoder_fingerprint": fingerprint(encoder),
               "tap": cfg.tap, "dims": pooler.dims[cfg.tap], "pool": cfg.pool, "ap_type": cfg.ap, "costs": list(cfg.costs),
               "num_train": len(tr_paths), "num_test": len(te_paths), "mAP": float(np.mean(aps)) if aps else None,
               "num_evaluated": len(aps), "classes": per_class, "notes": notes,
               "seconds": {"features": round(t_feat, 1), "total": round(time.time() - t0, 1)}}
    write_results(out_dir, results)
    log.info("mAP %s over %d classes (%s); %s", "n/a" if not aps else f"{100 * np.mean(aps):.2f}", len(aps), cfg.ap,
             out_dir / "results.md")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("linear_probe.svm", description="VOC07 linear SVM benchmark on frozen features.")
    add_config_args(p)
    add_encoder_args(p)
    return p


if __name__ == "__main__":
    import sys

    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
