"""PASCAL VOC: the one reader of the project (VOCdevkit layout, labels, boxes, masks) and VOC-style AP.

Layout (VOC2007 and VOC2012 alike; ``root`` is ``VOCdevkit/VOC2007`` or ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    Annotations/<id>.xml                     size, objects: name, bndbox (1-based pixels), difficult, truncated
    ImageSets/Main/<split>.txt               image ids of a split (train, val, trainval, test)
    ImageSets/Main/<class>_<split>.txt       "<id> <label>" per image: 1 present, -1 absent, 0 difficult only
    ImageSets/Segmentation/<split>.txt       ids with segmentation masks
    SegmentationClass/<id>.png               palette PNG: 0 background, 1..20 the classes, 255 void

Image-level labels everywhere in crosschannel are int8 per class: ``+1`` if the image has at least one
non-difficult instance, ``0`` if only difficult ones, ``-1`` otherwise -- the convention of the VOC devkit's
per-class files (Goyal et al. ICCV19 derive the same from the XML). Training losses and AP ignore ``0``.

Bad input is one :class:`pretext.runtime.UserError` line naming the file: a missing split file, a malformed XML,
a listed image that is missing, a box outside its image (or, with ``box_check='clip'``, a warning naming the file
and the box clipped or dropped), a mask of the wrong size or with indices outside 0..20 and 255.

AP definitions (scores ranked in decreasing order, label 0 ignored):

* ``voc07_11pt``: the VOC2007 devkit's, the mean over recall thresholds t in {0, 0.1, ..., 1} of the highest
  precision at recall >= t (0 if none);
* ``area``: the VOC2010+ devkit's (used by VISSL), the area under the precision/recall curve after making
  precision monotonically decreasing;
* ``sklearn``: ``sklearn.metrics.average_precision_score`` (sum over positives of precision times the recall
  step, no interpolation) with ties broken against the positives, exactly as philkr/voc-classification
  ``src/train_cls.py`` scores VOC classification (it subtracts 1e-5 * label from the score).
"""
from __future__ import annotations

import dataclasses
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pretext.runtime import UserError

log = logging.getLogger("crosschannel")

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
AP_TYPES = ("voc07_11pt", "area", "sklearn")
VOID = 255  #: the "void" / "don't care" index of SegmentationClass masks (object borders, ambiguous pixels)
NUM_SEG_CLASSES = len(VOC_CLASSES) + 1  #: background + 20 classes
BOX_CHECKS = ("error", "clip", "ignore")
LABEL_SOURCES = ("auto", "xml", "imagesets")


def _norm(name: str) -> str:
    """'potted plant' / 'tv/monitor' (labelme-style exports) -> 'pottedplant' / 'tvmonitor'."""
    return name.strip().lower().replace(" ", "").replace("/", "")


# --------------------------------------------------------------------------------------------- layout
def find_voc_root(path: str | Path, year: str | int | None = None) -> Path:
    """Accept ``VOCdevkit/``, ``VOCdevkit/VOC<year>/`` or any folder holding ``JPEGImages/``.

    ``year`` picks ``VOC<year>`` inside a devkit that holds several; without it VOC2007 is preferred, then VOC2012.
    """
    p = Path(path)
    years = [str(year)] if year is not None else ["2007", "2012"]
    cands = [p] + [q for y in years for q in (p / f"VOC{y}", p / "VOCdevkit" / f"VOC{y}")]
    for cand in cands:
        if (cand / "JPEGImages").is_dir():
            return cand
    where = " or ".join(f"VOC{y}/" for y in years)
    raise UserError(f"{p}: not a VOC folder (no JPEGImages/ in it, in {where} or in VOCdevkit/)")


def read_ids(path: str | Path) -> list[str]:
    """First column of every non-empty line of an ImageSets file; one-line error naming a missing file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: split file not found")
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def read_split(root: str | Path, split: str, task: str = "Main") -> list[str]:
    """Image ids of ``ImageSets/<task>/<split>.txt`` (task: Main, Segmentation, Layout, Action)."""
    ids = read_ids(Path(root) / "ImageSets" / task / f"{split}.txt")
    if not ids:
        raise UserError(f"{Path(root) / 'ImageSets' / task / f'{split}.txt'}: split '{split}' is empty")
    return ids


def image_paths(root: str | Path, ids: list[str], split: str = "") -> list[Path]:
    """``JPEGImages/<id>.jpg`` for every id; one-line error naming the first listed image that is missing."""
    root = Path(root)
    out = []
    for i in ids:
        p = root / "JPEGImages" / f"{i}.jpg"
        if not p.is_file():
            raise UserError(f"{p}: image listed in split '{split}' not found" if split else f"{p}: image not found")
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------- annotations
@dataclasses.dataclass(frozen=True)
class VOCObject:
    """One annotated object. ``box`` is (xmin, ymin, xmax, ymax) in the file's 1-based pixel coordinates
    (None for an object without ``<bndbox>``, as in some classification-only exports)."""
    name: str
    box: tuple[float, float, float, float] | None
    difficult: bool = False
    truncated: bool = False


@dataclasses.dataclass(frozen=True)
class VOCAnnotation:
    image_id: str
    width: int  #: 0 when the XML has no <size>
    height: int
    objects: tuple[VOCObject, ...]
    segmented: bool = False


def _flag(node: ET.Element, tag: str) -> bool:
    """VOC flags: '1' true, '0' / empty element / absent false (labelme writes ``<difficult/>``)."""
    text = (node.findtext(tag, default="0") or "0").strip()
    try:
        return float(text) != 0
    except ValueError:
        return False


def _number(node: ET.Element, tag: str, xml_path: Path, default: float | None = None) -> float:
    text = node.findtext(tag)
    if text is None or not text.strip():
        if default is not None:
            return default
        raise UserError(f"{xml_path}: <{tag}> missing in <{node.tag}>")
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{xml_path}: <{tag}> is not a number ({text.strip()!r})") from None


def _check_box(box, w: int, h: int, xml_path: Path, name: str, box_check: str):
    """Validate ``box`` against the image size: returns the box, the clipped box, or None (dropped)."""
    x1, y1, x2, y2 = box
    degenerate = x2 < x1 or y2 < y1
    # VOC boxes are 1-based and inclusive (1..W); 0 is tolerated for 0-based exports
    outside = w > 0 and h > 0 and (x1 < 0 or y1 < 0 or x2 > w or y2 > h)
    if not (degenerate or outside):
        return box
    what = (f"degenerate box {box} of '{name}'" if degenerate
            else f"box {box} of '{name}' outside the {w}x{h} image")
    if box_check == "error":
        raise UserError(f"{xml_path}: {what}")
    if degenerate:
        log.warning("%s: %s dropped", xml_path, what)
        return None
    clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h)))
    if clipped[2] < clipped[0] or clipped[3] < clipped[1]:
        log.warning("%s: %s dropped (nothing left after clipping)", xml_path, what)
        return None
    log.warning("%s: %s clipped to %s", xml_path, what, clipped)
    return clipped


def read_annotation(xml_path: str | Path, box_check: str = "error") -> VOCAnnotation:
    """Parse a VOC XML file.

    Args:
        xml_path: ``Annotations/<id>.xml``.
        box_check: ``error`` (a box outside the image or with xmax < xmin is a one-line error naming the file),
            ``clip`` (warn naming the file; clip the box to the image, drop degenerate ones: what detection
            training wants) or ``ignore`` (keep boxes as written).
    Returns:
        :class:`VOCAnnotation` with class names normalised ('potted plant' -> 'pottedplant').
    """
    xml_path = Path(xml_path)
    if box_check not in BOX_CHECKS:
        raise UserError(f"box_check must be one of {BOX_CHECKS}, got '{box_check}'")
    if not xml_path.is_file():
        raise UserError(f"{xml_path}: annotation not found")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise UserError(f"{xml_path}: invalid XML ({e})") from None
    if root.tag != "annotation":
        raise UserError(f"{xml_path}: not a VOC annotation (root element <{root.tag}>, expected <annotation>)")
    size = root.find("size")
    w = int(_number(size, "width", xml_path, 0)) if size is not None else 0
    h = int(_number(size, "height", xml_path, 0)) if size is not None else 0
    objects = []
    for obj in root.iter("object"):
        name = _norm(obj.findtext("name", default=""))
        if not name:
            raise UserError(f"{xml_path}: an <object> without <name>")
        bb = obj.find("bndbox")
        box = None
        if bb is not None:
            box = tuple(_number(bb, t, xml_path) for t in ("xmin", "ymin", "xmax", "ymax"))
            if box_check != "ignore":
                box = _check_box(box, w, h, xml_path, name, box_check)
                if box is None:
                    continue
        objects.append(VOCObject(name, box, _flag(obj, "difficult"), _flag(obj, "truncated")))
    return VOCAnnotation(xml_path.stem, w, h, tuple(objects), _flag(root, "segmented"))


def parse_annotation(xml_path: str | Path, box_check: str = "ignore") -> list[tuple[str, bool]]:
    """(class name, difficult) of every object in a VOC XML file; an empty ``<difficult/>`` means not difficult."""
    return [(o.name, o.difficult) for o in read_annotation(xml_path, box_check).objects]


def image_labels(objects: list[tuple[str, bool]], classes: tuple[str, ...] = VOC_CLASSES) -> np.ndarray:
    """(C,) int8: +1 any non-difficult instance, 0 difficult-only, -1 absent."""
    lab = np.full(len(classes), -1, np.int8)
    idx = {c: i for i, c in enumerate(classes)}
    for name, difficult in objects:
        if name in idx:
            i = idx[name]
            lab[i] = max(lab[i], 0 if difficult else 1)
    return lab


def labels_from_imagesets(root: str | Path, split: str, ids: list[str],
                          classes: tuple[str, ...] = VOC_CLASSES) -> np.ndarray:
    """(N, C) int8 labels of ``ids`` from ``ImageSets/Main/<class>_<split>.txt`` (as philkr/voc-classification reads
    them). An id absent from a class file is an error naming that file."""
    main = Path(root) / "ImageSets" / "Main"
    pos = {i: k for k, i in enumerate(ids)}
    labels = np.zeros((len(ids), len(classes)), np.int8)
    for c, name in enumerate(classes):
        f = main / f"{name}_{split}.txt"
        if not f.is_file():
            raise UserError(f"{f}: per-class split file not found")
        seen = np.zeros(len(ids), bool)
        for n, ln in enumerate(f.read_text().splitlines(), start=1):
            parts = ln.split()
            if not parts:
                continue
            if len(parts) < 2 or parts[1] not in ("1", "-1", "0"):
                raise UserError(f"{f}: line {n} is not '<image id> <1|-1|0>': {ln.strip()!r}")
            k = pos.get(parts[0])
            if k is not None:
                labels[k, c], seen[k] = int(parts[1]), True
        if not seen.all():
            raise UserError(f"{f}: no label for {int((~seen).sum())} image(s) of split '{split}', "
                            f"e.g. {ids[int(np.flatnonzero(~seen)[0])]}")
    return labels


def load_voc_split(root: str | Path, split: str, classes: tuple[str, ...] = VOC_CLASSES, fallback: str = "random",
                   fallback_test_fraction: float = 0.5, seed: int = 0, labels: str = "auto",
                   box_check: str = "error") -> tuple[list[Path], np.ndarray, str]:
    """Image paths, (N, C) int8 labels and a note on where the split came from.

    The split comes from ``ImageSets/Main/<split>.txt``. Without it (e.g. a bare JPEGImages/ + Annotations/
    export), ``fallback`` decides: ``error`` refuses (one line naming the missing file), ``all`` uses every
    annotated image for every split (a smoke test only: train and test overlap), ``random`` a seeded split with
    ``fallback_test_fraction`` of the images in ``test`` and the rest in ``trainval``/``train``.

    ``labels``: ``xml`` from ``Annotations/*.xml`` (boxes checked per ``box_check``), ``imagesets`` from the
    per-class files ``ImageSets/Main/<class>_<split>.txt``, ``auto`` the XML when ``Annotations/`` exists, else
    the per-class files.
    """
    if labels not in LABEL_SOURCES:
        raise UserError(f"labels must be one of {LABEL_SOURCES}, got '{labels}'")
    root = find_voc_root(root)
    ann, main = root / "Annotations", root / "ImageSets" / "Main"
    split_file = main / f"{split}.txt"
    if split_file.is_file():
        ids, note = read_ids(split_file), f"ImageSets/Main/{split}.txt"
    elif fallback == "error":
        raise UserError(f"{split_file}: split file not found")
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
            raise UserError(f"fallback_split must be 'error', 'all' or 'random', got '{fallback}'")
        log.warning("%s: %s", root, note)
    if not ids:
        raise UserError(f"{root}: split '{split}' is empty")
    source = labels if labels != "auto" else ("xml" if ann.is_dir() else "imagesets")
    if source == "xml":
        if not ann.is_dir():
            raise UserError(f"{ann}: not found (labels=xml needs the annotations)")
        missing = [i for i in ids if not (ann / f"{i}.xml").is_file()]
        if missing:
            raise UserError(f"{ann / (missing[0] + '.xml')}: annotation missing ({len(missing)} of split '{split}')")
        lab = np.stack([image_labels(parse_annotation(ann / f"{i}.xml", box_check), classes) for i in ids])
    else:
        lab = labels_from_imagesets(root, split, ids, classes)
    return image_paths(root, ids, split), lab, note


# --------------------------------------------------------------------------------------------- segmentation
def voc_palette() -> list[int]:
    """The 256-entry VOC colour map (flat [r, g, b, ...]): entry i spreads the bits of i over the three channels,
    most significant first; 255 (void) is (224, 224, 192)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def read_mask(png_path: str | Path, image_size: tuple[int, int] | None = None,
              num_classes: int = NUM_SEG_CLASSES) -> np.ndarray:
    """A ``SegmentationClass`` (or SBD-converted) mask as (H, W) uint8 class indices, 255 = void.

    Palette ('P') and 8-bit grey ('L') PNGs hold the indices directly; colour-coded RGB masks are refused (their
    colours are not indices). One-line errors naming the file: missing, unreadable, a size other than
    ``image_size`` (W, H), indices outside 0..num_classes-1 and 255.
    """
    from PIL import Image

    png_path = Path(png_path)
    if not png_path.is_file():
        raise UserError(f"{png_path}: mask not found")
    try:
        with Image.open(png_path) as im:
            im.load()
            mode, size = im.mode, im.size
            arr = np.array(im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise UserError(f"{png_path}: unreadable mask ({str(e).splitlines()[0][:120]})") from None
    if mode not in ("P", "L"):
        raise UserError(f"{png_path}: mask mode '{mode}', expected a palette (P) or 8-bit index (L) PNG")
    if image_size is not None and tuple(size) != tuple(image_size):
        raise UserError(f"{png_path}: mask is {size[0]}x{size[1]}, its image is {image_size[0]}x{image_size[1]}")
    bad = np.unique(arr[(arr >= num_classes) & (arr != VOID)])
    if bad.size:
        raise UserError(f"{png_path}: class indices {bad[:5].tolist()} outside 0..{num_classes - 1} and {VOID}")
    return arr.astype(np.uint8)


def segmentation_pairs(root: str | Path, split: str, ids: list[str] | None = None,
                       mask_dir: str = "SegmentationClass") -> list[tuple[Path, Path]]:
    """(image, mask) paths of ``ImageSets/Segmentation/<split>.txt`` (or of ``ids``, e.g. from another list file;
    ``mask_dir``: e.g. ``SegmentationClassAug`` for train_aug); one-line errors for a missing split file, image or
    mask."""
    root = find_voc_root(root)
    ids = read_split(root, split, "Segmentation") if ids is None else ids
    imgs = image_paths(root, ids, split)
    out = []
    for i, img in zip(ids, imgs):
        m = root / mask_dir / f"{i}.png"
        if not m.is_file():
            raise UserError(f"{m}: mask listed in split '{split}' not found")
        out.append((img, m))
    return out


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


def ap_from_pr(prec: np.ndarray, rec: np.ndarray, kind: str = "voc07_11pt") -> float:
    """AP of a precision/recall curve (one point per ranked item): ``voc07_11pt`` or ``area`` (module docstring).
    Shared by image-level AP (:func:`voc07_11pt_ap`, :func:`area_ap`) and detection AP (``transfer.det_eval``)."""
    prec, rec = np.asarray(prec, np.float64), np.asarray(rec, np.float64)
    if kind == "voc07_11pt":
        return float(np.mean([prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]))
    if kind == "area":
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    raise UserError(f"ap must be voc07_11pt or area, got '{kind}'")


def voc07_11pt_ap(scores, labels) -> float:
    """VOC2007 11-point interpolated AP (labels: 1 positive, -1 negative, 0 ignored)."""
    return ap_from_pr(*precision_recall(scores, labels), "voc07_11pt")


def area_ap(scores, labels) -> float:
    """VOC2010+ AP: area under the precision/recall curve with monotonically decreasing precision."""
    return ap_from_pr(*precision_recall(scores, labels), "area")


def sklearn_ap(scores, labels) -> float:
    """scikit-learn's average precision on the non-difficult labels, ties broken against the positives (philkr's
    ``score - 1e-5 * label``, with labels 1 / 0 there)."""
    from sklearn.metrics import average_precision_score

    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    keep = labels != 0
    y = (labels[keep] > 0).astype(np.int64)
    if y.sum() == 0:
        raise ValueError("AP is undefined without positives")
    return float(average_precision_score(y, scores[keep] - 1e-5 * y))


def average_precision(scores, labels, kind: str = "voc07_11pt") -> float:
    if kind == "voc07_11pt":
        return voc07_11pt_ap(scores, labels)
    if kind == "area":
        return area_ap(scores, labels)
    if kind == "sklearn":
        return sklearn_ap(scores, labels)
    raise UserError(f"ap must be one of {AP_TYPES}, got '{kind}'")
