"""PASCAL VOC detection scoring, identical to py-faster-rcnn ``lib/datasets/voc_eval.py``, with COCO-style AP beside.

    crosschannel transfer det-eval --voc VOCdevkit/VOC2007 --split test --results DIR
    python -m transfer.det_eval --voc VOCdevkit/VOC2007 --split test --results DIR

Results files are the VOC devkit's (what ``transfer.detection`` writes): ``DIR/comp4_det_<split>_<class>.txt``, one
detection per line, ``image_id score x1 y1 x2 y2`` in 1-based inclusive pixel coordinates (the XML's convention).

Per class (``voc_eval``'s rules):

* detections are ranked by decreasing score (``np.argsort(-score)``, as there, so ties break the same way);
* overlap is IoU with the +1 pixel convention: width = x2 - x1 + 1 (boxes are inclusive pixel ranges);
* each detection is compared with every ground-truth box of its image and class; the best one (first on ties) is
  its match, and a match needs IoU **>** 0.5;
* a detection matched to a *difficult* box is neither a true nor a false positive;
* the first detection of a non-difficult box is a true positive, any later one a false positive, as is a detection
  without a match;
* ``npos`` counts the non-difficult boxes; recall = TP / npos, precision = TP / max(TP + FP, eps);
* AP: VOC2007's 11-point AP for VOC2007 (and folders whose year is unknown), the area under the monotone
  precision envelope for VOC2010 and later (py-faster-rcnn: ``use_07_metric = year < 2010``); ``--ap`` overrides.

Two departures, both only where ``voc_eval`` would crash or give a 0/0 artefact: a class without non-difficult
boxes in the image set has no AP (reported as null, left out of the mAP, with a warning), where voc_eval gives 0
(11-point) or NaN (area); annotation coordinates are read as numbers (VOC2012 has a few non-integer ones, which
voc_eval's ``int()`` refuses).

COCO-style AP (pycocotools, AP at IoU 0.50:0.95 and the rest of ``COCOeval.summarize``) is computed on the same
detections, each image's 100 best over all classes (the COCO protocol's limit per image; VOC's AP keeps them all),
and the ground truth converted to COCO json: inclusive pixel boxes become ``[x1 - 1, y1 - 1, x2 - x1 + 1,
y2 - y1 + 1]`` and difficult objects become ``iscrowd`` regions, so that detections on them are ignored as in VOC
(COCO's crowd overlap is intersection over the detection's area, not IoU: the one difference).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import re
from pathlib import Path

import numpy as np

from pretext.runtime import UserError, atomic_write_text

from .voc import VOC_CLASSES, VOCAnnotation, ap_from_pr, find_voc_root, read_annotation, read_ids

log = logging.getLogger("crosschannel")

AP_KINDS = ("auto", "voc07_11pt", "area")
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclasses.dataclass
class Detections:
    """Detections of one class: ``image_ids`` (N,), ``scores`` (N,), ``boxes`` (N, 4) inclusive 1-based pixels."""
    image_ids: list[str]
    scores: np.ndarray
    boxes: np.ndarray

    @classmethod
    def empty(cls) -> "Detections":
        return cls([], np.zeros(0), np.zeros((0, 4)))

    def __len__(self) -> int:
        return len(self.image_ids)


# --------------------------------------------------------------------------------------------- results files
def results_path(results_dir: str | Path, split: str, cls: str, prefix: str = "comp4") -> Path:
    return Path(results_dir) / f"{prefix}_det_{split}_{cls}.txt"


def write_results(results_dir: str | Path, split: str, dets: dict[str, Detections], prefix: str = "comp4") -> None:
    """One devkit results file per class (atomically): ``image_id score x1 y1 x2 y2``, boxes to 0.1 pixel as
    py-faster-rcnn writes them, scores to 8 significant digits (py-faster-rcnn's 3 decimals would create ties)."""
    for cls, d in dets.items():
        lines = [f"{i} {s:.8g} {b[0]:.1f} {b[1]:.1f} {b[2]:.1f} {b[3]:.1f}\n"
                 for i, s, b in zip(d.image_ids, d.scores.tolist(), d.boxes.tolist())]
        atomic_write_text(results_path(results_dir, split, cls, prefix), "".join(lines))


def read_results(path: str | Path, image_ids: set[str] | None = None) -> Detections:
    """Parse a devkit results file; one-line errors naming the file and line for a malformed line or an image that
    is not in the image set."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: results file not found")
    ids, scores, boxes = [], [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 6:
                raise ValueError
            vals = [float(v) for v in parts[1:]]
        except ValueError:
            raise UserError(f"{path}: line {n} is not 'image_id score x1 y1 x2 y2': {line.strip()[:120]!r}") from None
        if not all(np.isfinite(vals)):
            raise UserError(f"{path}: line {n} has a non-finite number: {line.strip()[:120]!r}")
        if image_ids is not None and parts[0] not in image_ids:
            raise UserError(f"{path}: line {n}: image '{parts[0]}' is not in the image set")
        ids.append(parts[0])
        scores.append(vals[0])
        boxes.append(vals[1:])
    return Detections(ids, np.asarray(scores, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4))


# --------------------------------------------------------------------------------------------- ground truth
def load_ground_truth(root: str | Path, image_ids: list[str]) -> dict[str, VOCAnnotation]:
    """``Annotations/<id>.xml`` of every image, boxes as written (``box_check='ignore'``, as voc_eval reads them)."""
    ann = Path(root) / "Annotations"
    return {i: read_annotation(ann / f"{i}.xml", box_check="ignore") for i in image_ids}


def class_ground_truth(gt: dict[str, VOCAnnotation], cls: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Per image: (boxes (K, 4), difficult (K,) bool) of class ``cls``; and npos, the non-difficult count."""
    out, npos = {}, 0
    for i, a in gt.items():
        objs = [o for o in a.objects if o.name == cls and o.box is not None]
        boxes = np.asarray([o.box for o in objs], np.float64).reshape(-1, 4)
        diff = np.asarray([o.difficult for o in objs], bool)
        out[i] = (boxes, diff)
        npos += int((~diff).sum())
    return out, npos


def iou_plus1(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(D, G) IoU of inclusive pixel boxes (width x2 - x1 + 1), with voc_eval's operations in its order."""
    ixmin = np.maximum(gt[None, :, 0], boxes[:, None, 0])
    iymin = np.maximum(gt[None, :, 1], boxes[:, None, 1])
    ixmax = np.minimum(gt[None, :, 2], boxes[:, None, 2])
    iymax = np.minimum(gt[None, :, 3], boxes[:, None, 3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inters = iw * ih
    uni = ((boxes[:, None, 2] - boxes[:, None, 0] + 1.0) * (boxes[:, None, 3] - boxes[:, None, 1] + 1.0)
           + (gt[None, :, 2] - gt[None, :, 0] + 1.0) * (gt[None, :, 3] - gt[None, :, 1] + 1.0) - inters)
    return inters / uni


def match_detections(dets: Detections, gt: dict[str, tuple[np.ndarray, np.ndarray]], ovthresh: float = 0.5
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """voc_eval's matching, vectorised: (order, tp, fp), ``tp``/``fp`` (N,) in ranked order.

    A detection's best box (``ovmax``, ``jmax``) does not depend on the other detections, so the sequential loop
    reduces to: no box with IoU > ovthresh -> FP; best box difficult -> neither; otherwise TP if it is the first
    detection (in rank order) whose best box this is, else FP."""
    order = np.argsort(-dets.scores)  # voc_eval's call (default kind): the same order on ties
    n = len(order)
    ovmax = np.full(n, -np.inf)
    jmax = np.zeros(n, np.int64)
    ids = np.asarray(dets.image_ids, dtype=object)[order] if n else np.zeros(0, dtype=object)
    boxes = dets.boxes[order]
    rank_of_image: dict[str, list[int]] = {}
    for r, i in enumerate(ids):
        rank_of_image.setdefault(i, []).append(r)
    difficult = np.zeros(n, bool)
    for i, ranks in rank_of_image.items():
        g, diff = gt[i]
        if len(g) == 0:
            continue
        ov = iou_plus1(boxes[ranks], g)
        ovmax[ranks] = ov.max(1)
        jmax[ranks] = ov.argmax(1)
        difficult[ranks] = diff[jmax[ranks]]
    matched = ovmax > ovthresh
    eligible = matched & ~difficult
    tp = np.zeros(n)
    fp = (~matched).astype(np.float64)
    if eligible.any():
        r = np.flatnonzero(eligible)
        keys = np.asarray([f"{ids[k]}\0{jmax[k]}" for k in r])
        _, first = np.unique(keys, return_index=True)
        is_first = np.zeros(len(r), bool)
        is_first[first] = True
        tp[r[is_first]] = 1.0
        fp[r[~is_first]] = 1.0
    return order, tp, fp


def voc_eval_class(dets: Detections, gt: dict[str, tuple[np.ndarray, np.ndarray]], npos: int, kind: str,
                   ovthresh: float = 0.5) -> dict:
    """AP of one class; returns ``ap`` (None without positives), ``rec``, ``prec``, ``npos``, ``tp``, ``fp``."""
    _, tp, fp = match_detections(dets, gt, ovthresh)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    if npos == 0:
        return {"ap": None, "rec": np.zeros(0), "prec": np.zeros(0), "npos": 0, "tp": int(tp[-1]) if len(tp) else 0,
                "fp": int(fp[-1]) if len(fp) else 0}
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return {"ap": ap_from_pr(prec, rec, kind), "rec": rec, "prec": prec, "npos": npos,
            "tp": int(tp[-1]) if len(tp) else 0, "fp": int(fp[-1]) if len(fp) else 0}


def ap_kind_for(root: str | Path, kind: str = "auto") -> str:
    """``auto``: 11-point for VOC2007 (and unknown years), area for VOC2010+ (py-faster-rcnn's ``year < 2010``)."""
    if kind not in AP_KINDS:
        raise UserError(f"ap must be one of {AP_KINDS}, got '{kind}'")
    if kind != "auto":
        return kind
    m = re.search(r"VOC(\d{4})", str(Path(root).resolve()))
    if m is None:
        log.info("%s: no VOC<year> in the path; scoring with the VOC2007 11-point AP", root)
        return "voc07_11pt"
    return "voc07_11pt" if int(m.group(1)) < 2010 else "area"


# --------------------------------------------------------------------------------------------- COCO
def coco_ap(gt: dict[str, VOCAnnotation], dets: dict[str, Detections], classes: tuple[str, ...] = VOC_CLASSES,
            max_per_image: int = 100) -> dict[str, float | None]:
    """COCO-style AP (pycocotools) of each image's ``max_per_image`` best detections over all classes, ground truth
    converted to COCO json (module docstring)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    img_id = {i: k + 1 for k, i in enumerate(gt)}
    cat_id = {c: k + 1 for k, c in enumerate(classes)}
    images, anns = [], []
    for i, a in gt.items():
        images.append({"id": img_id[i], "file_name": f"{i}.jpg", "width": a.width, "height": a.height})
        for o in a.objects:
            if o.name not in cat_id or o.box is None:
                continue
            x1, y1, x2, y2 = o.box
            w, h = x2 - x1 + 1, y2 - y1 + 1
            anns.append({"id": len(anns) + 1, "image_id": img_id[i], "category_id": cat_id[o.name],
                         "bbox": [x1 - 1, y1 - 1, w, h], "area": w * h, "iscrowd": int(o.difficult)})
    per_image: dict[str, list] = {}
    for c, d in dets.items():
        for i, s, b in zip(d.image_ids, d.scores.tolist(), d.boxes.tolist()):
            per_image.setdefault(i, []).append((s, c, b))
    res = []
    for i, rows in per_image.items():
        for s, c, b in sorted(rows, key=lambda r: -r[0])[:max_per_image]:
            res.append({"image_id": img_id[i], "category_id": cat_id[c], "score": s,
                        "bbox": [b[0] - 1, b[1] - 1, b[2] - b[0] + 1, b[3] - b[1] + 1]})
    if not res or not anns:
        return {k: None for k in COCO_STATS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": anns,
                           "categories": [{"id": v, "name": c} for c, v in cat_id.items()]}
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float(v) if v >= 0 else None) for k, v in zip(COCO_STATS, ev.stats)}


# --------------------------------------------------------------------------------------------- scoring
def score(gt: dict[str, VOCAnnotation], dets: dict[str, Detections], kind: str, classes: tuple[str, ...] = VOC_CLASSES,
          coco: bool = True) -> dict:
    """VOC AP per class and mAP (over the classes with positives), and COCO AP, of ``dets`` against ``gt``."""
    ap, npos, ndet, tps = {}, {}, {}, {}
    for c in classes:
        d = dets.get(c, Detections.empty())
        g, n = class_ground_truth(gt, c)
        r = voc_eval_class(d, g, n, kind)
        ap[c], npos[c], ndet[c], tps[c] = r["ap"], n, len(d), r["tp"]
    missing = [c for c in classes if ap[c] is None]
    if missing:
        log.warning("no non-difficult ground truth for %s in these %d images: no AP (left out of the mAP)",
                    ", ".join(missing), len(gt))
    valid = [v for v in ap.values() if v is not None]
    out = {"ap_type": kind, "mAP": float(np.mean(valid)) if valid else None, "ap": ap, "npos": npos,
           "num_detections": ndet, "true_positives": tps, "num_images": len(gt),
           "num_classes_evaluated": len(valid)}
    if coco:
        out["coco"] = coco_ap(gt, dets, classes)
    return out


def evaluate_results(voc: str | Path, results_dir: str | Path, split: str = "test", image_set: str | None = None,
                     ap: str = "auto", prefix: str = "comp4", coco: bool = True,
                     classes: tuple[str, ...] = VOC_CLASSES) -> dict:
    """Score the devkit results files in ``results_dir`` on ``image_set`` (default
    ``<voc>/ImageSets/Main/<split>.txt``)."""
    root = find_voc_root(voc)
    ids = read_ids(image_set if image_set else root / "ImageSets" / "Main" / f"{split}.txt")
    if not ids:
        raise UserError(f"{image_set or split}: empty image set")
    gt = load_ground_truth(root, ids)
    known = set(ids)
    dets = {c: read_results(results_path(results_dir, split, c, prefix), known) for c in classes}
    out = score(gt, dets, ap_kind_for(root, ap), classes, coco)
    out.update(voc=str(root), split=split, results=str(results_dir))
    return out


def format_table(res: dict) -> str:
    """Per-class AP and mAP as a Markdown table (percent)."""
    pct = lambda v: f"{100 * v:.1f}" if v is not None else "n/a"  # noqa: E731
    lines = ["| class | AP (%) | npos | detections |", "|---|---|---|---|"]
    lines += [f"| {c} | {pct(a)} | {res['npos'][c]} | {res['num_detections'][c]} |" for c, a in res["ap"].items()]
    lines.append(f"| **mAP** | **{pct(res['mAP'])}** | | |")
    coco = res.get("coco")
    if coco:
        lines += ["", f"COCO-style AP@[.5:.95] {pct(coco['AP'])}, AP50 {pct(coco['AP50'])}, AP75 {pct(coco['AP75'])} "
                      "(pycocotools, same detections)"]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("transfer.det_eval", description="Score VOC devkit detection results files exactly as "
                                "py-faster-rcnn's voc_eval.py (and COCO-style AP beside).")
    p.add_argument("--voc", required=True, help="VOCdevkit/VOC2007 (Annotations/, ImageSets/Main/)")
    p.add_argument("--split", default="test", help="image set name (ImageSets/Main/<split>.txt; in the file names)")
    p.add_argument("--results", required=True, help="folder with <comp>_det_<split>_<class>.txt")
    p.add_argument("--image-set", default=None, help="list of image ids (default: ImageSets/Main/<split>.txt)")
    p.add_argument("--ap", default="auto", choices=AP_KINDS, help="auto: 11-point for VOC2007, area for 2010+")
    p.add_argument("--comp", default="comp4", help="results file prefix (comp3: own training data only, comp4: any)")
    p.add_argument("--no-coco", action="store_true", help="skip the COCO-style AP")
    p.add_argument("--json", default=None, help="also write the scores here")
    return p


def main(args) -> int:
    res = evaluate_results(args.voc, args.results, args.split, args.image_set, args.ap, args.comp, not args.no_coco)
    print(f"VOC detection AP ({res['ap_type']}), {res['num_images']} images of '{args.split}':\n")
    print(format_table(res))
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
