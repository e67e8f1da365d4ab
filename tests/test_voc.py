"""linear_probe.voc: VOC layout parsing (difficult flags, ImageSets fallback) and VOC-style AP, by hand."""
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linear_probe.voc import (
    VOC_CLASSES,
    area_ap,
    average_precision,
    find_voc_root,
    image_labels,
    load_voc_split,
    parse_annotation,
    voc07_11pt_ap,
)
from pretext.runtime import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _xml(objects) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult>"
                   "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
                   for n, d in objects)
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def write_vocdevkit(base: Path, images: dict, splits: dict | None, size=(80, 64), seed=0) -> Path:
    """``images``: id -> list of (class, difficult flag text); ``splits``: name -> ids (None: no ImageSets)."""
    root = base / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = sorted({n for objs in images.values() for n, _ in objs})
    for i, objs in images.items():
        img = rng.normal(128, 20, (size[1], size[0], 3))
        for n, _ in objs:  # a class-specific bright/dark stripe so that features are informative
            k = classes.index(n)
            img[:, 8 * k:8 * k + 8] = 240 if k % 2 else 20
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        (root / "Annotations" / f"{i}.xml").write_text(_xml(objs))
    if splits is not None:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for name, ids in splits.items():
            (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return base / "VOCdevkit"


def test_parse_annotation_difficult_flags(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(_xml([("dog", "0"), ("person", "1"), ("potted plant", ""), ("tv/monitor", "0")]))
    assert parse_annotation(p) == [("dog", False), ("person", True), ("pottedplant", False), ("tvmonitor", False)]
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation>")
    with pytest.raises(UserError, match="invalid XML"):
        parse_annotation(bad)


def test_image_labels_goyal_convention():
    lab = image_labels([("dog", False), ("cat", True), ("person", True), ("person", False)])
    c = {n: i for i, n in enumerate(VOC_CLASSES)}
    assert lab[c["dog"]] == 1 and lab[c["cat"]] == 0 and lab[c["person"]] == 1 and lab[c["car"]] == -1
    assert image_labels([("unknownthing", False)]).tolist() == [-1] * 20


def test_load_split_with_imagesets(tmp_path):
    imgs = {"000001": [("dog", "0")], "000002": [("cat", "1")], "000003": [("cat", "0"), ("dog", "1")]}
    devkit = write_vocdevkit(tmp_path, imgs, {"trainval": ["000001", "000002"], "test": ["000003"]})
    assert find_voc_root(devkit) == find_voc_root(devkit / "VOC2007") == find_voc_root(tmp_path) == devkit / "VOC2007"
    paths, labels, note = load_voc_split(devkit, "trainval", classes=("cat", "dog"))
    assert [p.stem for p in paths] == ["000001", "000002"] and note == "ImageSets/Main/trainval.txt"
    assert labels.tolist() == [[-1, 1], [0, -1]]
    _, labels, _ = load_voc_split(devkit, "test", classes=("cat", "dog"))
    assert labels.tolist() == [[1, 0]]
    with pytest.raises(UserError, match="not a VOC folder"):
        find_voc_root(tmp_path / "nowhere")


def test_load_split_fallback_without_imagesets(tmp_path, caplog, monkeypatch):
    imgs = {f"{i:06d}": [("dog", "0")] for i in range(10)}
    devkit = write_vocdevkit(tmp_path, imgs, None)
    with caplog.at_level(logging.WARNING, logger="crosschannel"):
        monkeypatch.setattr(logging.getLogger("crosschannel"), "propagate", True)
        tr, _, note = load_voc_split(devkit, "trainval", fallback="random", fallback_test_fraction=0.3, seed=1)
    assert "no ImageSets/Main/trainval.txt" in caplog.text and "seeded random split" in note
    te, _, _ = load_voc_split(devkit, "test", fallback="random", fallback_test_fraction=0.3, seed=1)
    assert len(tr) == 7 and len(te) == 3 and not {p.stem for p in tr} & {p.stem for p in te}
    al, _, note = load_voc_split(devkit, "test", fallback="all")
    assert len(al) == 10 and "train = test" in note


def test_per_class_files_without_annotations(tmp_path):
    root = tmp_path / "VOC2007"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for i in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets/Main/test.txt").write_text("a\nb\nc\n")
    (root / "ImageSets/Main/cat_test.txt").write_text("a  1\nb -1\nc  0\n")
    (root / "ImageSets/Main/dog_test.txt").write_text("a -1\nb  1\nc -1\n")
    _, labels, _ = load_voc_split(root, "test", classes=("cat", "dog"))
    assert labels.tolist() == [[1, -1], [-1, 1], [0, -1]]


def test_ap_by_hand():
    # ranked: + - + - +  => precision at the positives 1, 2/3, 3/5; recall 1/3, 2/3, 1
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, -1, 1, -1, 1])
    # area: envelope precision 1 on (0, 1/3], max(2/3, 1/2, 3/5) = 2/3 on (1/3, 2/3], 3/5 on (2/3, 1]
    assert area_ap(scores, labels) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # 11-point: t = 0..0.3 -> 1 (4 points), t = 0.4..0.6 -> 2/3 (3 points), t = 0.7..1.0 -> 3/5 (4 points)
    assert voc07_11pt_ap(scores, labels) == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 0.6) / 11)
    # a difficult (label 0) example ranked first is ignored, not counted as a false positive
    s2, l2 = np.concatenate([[1.0], scores]), np.concatenate([[0], labels])
    assert voc07_11pt_ap(s2, l2) == voc07_11pt_ap(scores, labels) and area_ap(s2, l2) == area_ap(scores, labels)
    assert average_precision(scores, labels, "area") == area_ap(scores, labels)
    assert area_ap([3, 2, 1], [1, 1, -1]) == voc07_11pt_ap([3, 2, 1], [1, 1, -1]) == 1.0
    assert area_ap([1, 2], [1, -1]) == pytest.approx(0.5)  # precision 1/2 at recall 1
    with pytest.raises(ValueError):
        area_ap([1, 2], [-1, 0])
    with pytest.raises(UserError):
        average_precision(scores, labels, "voc12")


@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
def test_shared_voc_sample_parses():
    paths, labels, note = load_voc_split(SHARED / "voc_sample" / "bbox_detection", "trainval", fallback="all")
    assert len(paths) == 3 and "train = test" in note
    c = {n: i for i, n in enumerate(VOC_CLASSES)}
    assert labels[:, c["person"]].max() == 1 and (labels != 0).all()  # <difficult/> empty -> not difficult
