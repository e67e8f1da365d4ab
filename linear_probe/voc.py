"""PASCAL VOC classification labels and VOC-style average precision.

Image-level labels follow Goyal et al. ICCV19 (and VISSL): for each image and class, ``+1`` if the image has at
least one non-difficult instance of the class, ``0`` if it has only difficult instances, ``-1`` otherwise. For SVM
training ``0`` counts as negative; at test time ``0`` is excluded from that class's AP.

Two AP definitions (both on scores ranked in decreasing order, ignoring label 0):

* ``voc07_11pt``: the VOC2007 devkit's, the mean over recall thresholds t in {0, 0.1, ..., 1} of the highest
  precision at recall >= t (0 if none);
* ``area``: the VOC2010+ devkit's (used by VISSL), the area under the precision/recall curve after making
  precision monotonically decreasing.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pretext.runtime import UserError

log = logging.getLogger("crosschannel")

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
AP_TYPES = ("voc07_11pt", "area")


def _norm(name: str) -> str:
    """'potted plant' / 'tv/monitor' (labelme-style exports) -> 'pottedplant' / 'tvmonitor'."""
    return name.strip().lower().replace(" ", "").replace("/", "")


# --------------------------------------------------------------------------------------------- layout
def find_voc_root(path: str | Path) -> Path:
    """Accept ``VOCdevkit/``, ``VOCdevkit/VOC2007/`` or any folder holding ``JPEGImages/`` (+ ``Annotations/``)."""
    p = Path(path)
    for cand in (p, p / "VOC2007", p / "VOCdevkit" / "VOC2007"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise UserError(f"{p}: not a VOC folder (no JPEGImages/ in it, in VOC2007/ or in VOCdevkit/VOC2007/)")


def parse_annotation(xml_path: str | Path) -> list[tuple[str, bool]]:
    """(class name, difficult) of every object in a VOC XML file; an empty ``<difficult/>`` means not difficult."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise UserError(f"{xml_path}: invalid XML ({e})") from None
    objs = []
    for obj in root.iter("object"):
        name = obj.findtext("name", default="")
        diff = (obj.findtext("difficult", default="0") or "0").strip()
        objs.append((_norm(name), diff not in ("", "0")))
    return objs


def image_labels(objects: list[tuple[str, bool]], classes: tuple[str, ...] = VOC_CLASSES) -> np.ndarray:
    """(C,) int8: +1 any non-difficult instance, 0 difficult-only, -1 absent."""
    lab = np.full(len(classes), -1, np.int8)
    idx = {c: i for i, c in enumerate(classes)}
    for name, difficult in objects:
        if name in idx:
            i = idx[name]
            lab[i] = max(lab[i], 0 if difficult else 1)
    return lab


def _read_ids(path: Path) -> list[str]:
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def load_voc_split(root: str | Path, split: str, classes: tuple[str, ...] = VOC_CLASSES, fallback: str = "random",
                   fallback_test_fraction: float = 0.5, seed: int = 0) -> tuple[list[Path], np.ndarray, str]:
    """Image paths, (N, C) int8 labels and a note on where the split came from.

    The split comes from ``ImageSets/Main/<split>.txt``. Without it (e.g. a bare JPEGImages/ + Annotations/
    export), ``fallback`` decides: ``all`` uses every annotated image for every split (a smoke test only: train
    and test overlap), ``random`` a seeded split with ``fallback_test_fraction`` of the images in ``test`` and the
    rest in ``trainval``/``train``. Labels come from ``Annotations/*.xml``, or, without them, from the per-class
    files ``ImageSets/Main/<class>_<split>.txt`` (1 / 0 = difficult / -1).
    """
    root = find_voc_root(root)
    ann, main = root / "Annotations", root / "ImageSets" / "Main"
    split_file = main / f"{split}.txt"
    if split_file.is_file():
        ids, note = _read_ids(split_file), f"ImageSets/Main/{split}.txt"
    else:
        if not ann.is_dir():
            raise UserError(f"{root}: neither {split_file.relative_to(root)} nor Annotations/ found")
        all_ids = sorted(p.stem for p in ann.glob("*.xml"))
        if not all_ids:
            raise UserError(f"{ann}: no annotation files")
        if fallback == "all":
            ids, note = all_ids, f"no ImageSets/Main/{split}.txt: using all {len(all_ids)} annotated images (train = test)"
        elif fallback == "random":
            rng = np.random.default_rng(seed)
            perm = rng.permutation(len(all_ids))
            n_test = min(max(1, int(round(len(all_ids) * fallback_test_fraction))), len(all_ids) - 1) if len(all_ids) > 1 else 0
            test = {all_ids[i] for i in perm[:n_test]}
            ids = [i for i in all_ids if (i in test) == (split == "test")]
            note = (f"no ImageSets/Main/{split}.txt: seeded random split (seed {seed}, test fraction "
                    f"{fallback_test_fraction}) of {len(all_ids)} annotated images -> {len(ids)} in '{split}'")
        else:
            raise UserError(f"fallback_split must be 'all' or 'random', got '{fallback}'")
        log.warning("%s: %s", root, note)
    if not ids:
        raise UserError(f"{root}: split '{split}' is empty")
    if ann.is_dir():
        missing = [i for i in ids if not (ann / f"{i}.xml").is_file()]
        if missing:
            raise UserError(f"{ann}: {len(missing)} annotation(s) missing, e.g. {missing[0]}.xml")
        labels = np.stack([image_labels(parse_annotation(ann / f"{i}.xml"), classes) for i in ids])
    else:
        labels = np.full((len(ids), len(classes)), -1, np.int8)
        pos = {i: k for k, i in enumerate(ids)}
        for c, name in enumerate(classes):
            f = main / f"{name}_{split}.txt"
            if not f.is_file():
                raise UserError(f"{root}: no Annotations/ and no {f.relative_to(root)}")
            for ln in f.read_text().splitlines():
                parts = ln.split()
                if len(parts) >= 2 and parts[0] in pos:
                    labels[pos[parts[0]], c] = int(parts[1])
    paths = []
    for i in ids:
        p = root / "JPEGImages" / f"{i}.jpg"
        if not p.is_file():
            raise UserError(f"{p}: image listed in split '{split}' not found")
        paths.append(p)
    return paths, labels, note


# --------------------------------------------------------------------------------------------- AP
def precision_recall(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each ranked positive/negative (label 0 ignored). Needs >= 1 positive."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    keep = labels != 0
    scores, labels = scores[keep], labels[keep]
    npos = int((labels > 0).sum())
    if npos == 0:
        raise ValueError("AP is undefined without positives")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(labels[order] > 0)
    fp = np.cumsum(labels[order] < 0)
    return tp / np.maximum(tp + fp, 1), tp / npos


def voc07_11pt_ap(scores, labels) -> float:
    """VOC2007 11-point interpolated AP (labels: 1 positive, -1 negative, 0 ignored)."""
    prec, rec = precision_recall(scores, labels)
    return float(np.mean([prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]))


def area_ap(scores, labels) -> float:
    """VOC2010+ AP: area under the precision/recall curve with monotonically decreasing precision."""
    prec, rec = precision_recall(scores, labels)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def average_precision(scores, labels, kind: str = "voc07_11pt") -> float:
    if kind == "voc07_11pt":
        return voc07_11pt_ap(scores, labels)
    if kind == "area":
        return area_ap(scores, labels)
    raise UserError(f"ap must be one of {AP_TYPES}, got '{kind}'")
