"""transfer.voc: the VOCdevkit reader (splits, per-class files, XML boxes and flags, masks, one-line errors) and
VOC-style AP, against hand-computed cases. ``write_vocdevkit`` is the fixture writer other tests reuse."""
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretext.runtime import UserError
from transfer.voc import (
    VOC_CLASSES,
    VOID,
    area_ap,
    average_precision,
    find_voc_root,
    image_labels,
    labels_from_imagesets,
    load_voc_split,
    parse_annotation,
    read_annotation,
    read_mask,
    read_split,
    segmentation_pairs,
    sklearn_ap,
    voc07_11pt_ap,
    voc_palette,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _obj_xml(name, diff, box=(1, 1, 9, 9), truncated="0") -> str:
    bb = "" if box is None else ("<bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
                                 + "</bndbox>")
    return f"<object><name>{name}</name><truncated>{truncated}</truncated><difficult>{diff}</difficult>{bb}</object>"


def _xml(objects, size=None) -> str:
    sz = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    return f"<annotation><filename>x.jpg</filename>{sz}{''.join(_obj_xml(*o) for o in objects)}</annotation>"


def write_vocdevkit(base: Path, images: dict, splits: dict | None, size=(80, 64), seed=0, year="2007",
                    class_files: tuple[str, ...] = (), masks: bool = False) -> Path:
    """A VOCdevkit/VOC<year> tree. ``images``: id -> list of (class, difficult flag text[, box]); ``splits``: name ->
    ids (None: no ImageSets); ``class_files``: also write ``<class>_<split>.txt`` for these classes (labels derived
    from the objects, as the devkit does); ``masks``: SegmentationClass palette PNGs (the class index under each
    box, 255 on its border) and ImageSets/Segmentation copies of the splits. Each class paints a bright or dark
    vertical stripe, so that features carry the labels."""
    root = base / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = sorted({o[0] for objs in images.values() for o in objs})
    for i, objs in images.items():
        img = rng.normal(128, 20, (size[1], size[0], 3))
        mask = np.zeros((size[1], size[0]), np.uint8)
        for o in objs:
            k = classes.index(o[0])
            img[:, 8 * k:8 * k + 8] = 240 if k % 2 else 20
            if len(o) > 2 and o[2] is not None:
                x1, y1, x2, y2 = (int(v) for v in o[2])
                mask[y1 - 1:y2, x1 - 1:x2] = VOID
                mask[y1:y2 - 1, x1:x2 - 1] = VOC_CLASSES.index(o[0]) + 1 if o[0] in VOC_CLASSES else 1
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        (root / "Annotations" / f"{i}.xml").write_text(_xml(objs, size))
        if masks:
            (root / "SegmentationClass").mkdir(exist_ok=True)
            m = Image.fromarray(mask, "P")
            m.putpalette(voc_palette())
            m.save(root / "SegmentationClass" / f"{i}.png")
    if splits is not None:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for name, ids in splits.items():
            (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
            if masks:
                (root / "ImageSets" / "Segmentation").mkdir(exist_ok=True)
                (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
            for c in class_files:
                lines = []
                for i in ids:
                    lab = image_labels([(o[0], o[1] not in ("", "0")) for o in images[i]], (c,))[0]
                    lines.append(f"{i} {lab:2d}")
                (root / "ImageSets" / "Main" / f"{c}_{name}.txt").write_text("\n".join(lines) + "\n")
    return base / "VOCdevkit"


def test_parse_annotation_difficult_flags(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(_xml([("dog", "0"), ("person", "1"), ("potted plant", ""), ("tv/monitor", "0")]))
    assert parse_annotation(p) == [("dog", False), ("person", True), ("pottedplant", False), ("tvmonitor", False)]
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation>")
    with pytest.raises(UserError, match="bad.xml: invalid XML"):
        parse_annotation(bad)


def test_read_annotation_boxes_size_and_flags(tmp_path):
    p = tmp_path / "000005.xml"
    p.write_text(_xml([("chair", "0", (263, 211, 324, 339), "1"), ("chair", "1", (5, 244, 67, 374))], size=(500, 375))
                 .replace("</annotation>", "<segmented>1</segmented></annotation>"))
    a = read_annotation(p)
    assert (a.image_id, a.width, a.height, a.segmented) == ("000005", 500, 375, True)
    assert a.objects[0].box == (263.0, 211.0, 324.0, 339.0) and a.objects[0].truncated and not a.objects[0].difficult
    assert a.objects[1].difficult and not a.objects[1].truncated
    # an object without <bndbox> (classification-only export) keeps box None
    q = tmp_path / "nobox.xml"
    q.write_text(_xml([("dog", "0", None)]))
    assert read_annotation(q).objects[0].box is None


@pytest.mark.parametrize("body, message", [
    ("<annotation><object><name>dog</name><bndbox><xmin>a</xmin></bndbox></object></annotation>", "<xmin> is not a number"),
    ("<annotation><object><name>dog</name><bndbox><xmin>1</xmin></bndbox></object></annotation>", "<ymin> missing"),
    ("<annotation><object><difficult>0</difficult></object></annotation>", "without <name>"),
    ("<html></html>", "not a VOC annotation"),
    ("<annotation><object>", "invalid XML"),
])
def test_malformed_xml_is_one_line_naming_the_file(tmp_path, body, message):
    p = tmp_path / "broken.xml"
    p.write_text(body)
    with pytest.raises(UserError, match=message) as e:
        read_annotation(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_box_outside_image(tmp_path, caplog, monkeypatch):
    p = tmp_path / "out.xml"
    p.write_text(_xml([("dog", "0", (10, 10, 120, 50)), ("cat", "0", (30, 30, 20, 40)), ("cow", "0", (0, 1, 100, 60))],
                      size=(100, 60)))
    with pytest.raises(UserError, match=r"out.xml: box \(10.0, 10.0, 120.0, 50.0\) of 'dog' outside the 100x60 image"):
        read_annotation(p)
    monkeypatch.setattr(logging.getLogger("crosschannel"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="crosschannel"):
        a = read_annotation(p, box_check="clip")
    # dog clipped to the image, the degenerate cat dropped, cow (0 tolerated, x2 = width) kept as is
    assert [(o.name, o.box) for o in a.objects] == [("dog", (10.0, 10.0, 100.0, 50.0)), ("cow", (0.0, 1.0, 100.0, 60.0))]
    assert "out.xml" in caplog.text and "clipped" in caplog.text and "dropped" in caplog.text
    assert len(read_annotation(p, box_check="ignore").objects) == 3


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


def test_voc2012_layout_and_year(tmp_path):
    imgs = {"2011_000001": [("bus", "0")]}
    d12 = write_vocdevkit(tmp_path / "a", imgs, {"val": ["2011_000001"]}, year="2012")
    assert find_voc_root(d12) == d12 / "VOC2012"
    write_vocdevkit(tmp_path / "a", {"000001": [("dog", "0")]}, {"test": ["000001"]}, year="2007")
    assert find_voc_root(d12) == d12 / "VOC2007" and find_voc_root(d12, year=2012) == d12 / "VOC2012"
    assert read_split(d12 / "VOC2012", "val") == ["2011_000001"]


def test_labels_from_xml_equal_labels_from_per_class_files(tmp_path):
    rng = np.random.default_rng(3)
    imgs = {}
    for i in range(12):
        objs = [(VOC_CLASSES[int(k)], str(int(rng.integers(0, 2)))) for k in rng.choice(20, size=3)]
        imgs[f"{i:06d}"] = objs
    ids = sorted(imgs)
    devkit = write_vocdevkit(tmp_path, imgs, {"trainval": ids[:8], "test": ids[8:]}, class_files=VOC_CLASSES)
    for split in ("trainval", "test"):
        _, from_xml, _ = load_voc_split(devkit, split, labels="xml")
        _, from_sets, _ = load_voc_split(devkit, split, labels="imagesets")
        assert np.array_equal(from_xml, from_sets) and set(np.unique(from_xml)) <= {-1, 0, 1}
    assert (from_xml == 0).any() and (from_xml == 1).any()


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
    (root / "ImageSets/Main/dog_test.txt").write_text("a -1\nb  1\n")
    with pytest.raises(UserError, match=r"dog_test.txt: no label for 1 image\(s\) of split 'test', e.g. c"):
        labels_from_imagesets(root, "test", ["a", "b", "c"], ("cat", "dog"))
    (root / "ImageSets/Main/dog_test.txt").write_text("a -1\nb  yes\nc -1\n")
    with pytest.raises(UserError, match="dog_test.txt: line 2"):
        labels_from_imagesets(root, "test", ["a", "b", "c"], ("cat", "dog"))
    with pytest.raises(UserError, match="cow_test.txt: per-class split file not found"):
        labels_from_imagesets(root, "test", ["a"], ("cow",))


def test_missing_split_file_and_missing_image_name_the_file(tmp_path):
    devkit = write_vocdevkit(tmp_path, {"000001": [("dog", "0")], "000002": [("cat", "0")]},
                             {"trainval": ["000001", "000002"]})
    with pytest.raises(UserError, match=r"ImageSets/Main/test.txt: split file not found"):
        load_voc_split(devkit, "test", fallback="error")
    with pytest.raises(UserError, match=r"ImageSets/Segmentation/train.txt: split file not found"):
        read_split(devkit / "VOC2007", "train", "Segmentation")
    (devkit / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(UserError, match=r"JPEGImages/000002.jpg: image listed in split 'trainval' not found"):
        load_voc_split(devkit, "trainval")
    (devkit / "VOC2007" / "Annotations" / "000001.xml").unlink()
    with pytest.raises(UserError, match=r"Annotations/000001.xml: annotation missing"):
        load_voc_split(devkit, "trainval", labels="xml")


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


def test_masks_and_segmentation_pairs(tmp_path):
    imgs = {"000001": [("dog", "0", (3, 4, 20, 30))], "000002": [("cat", "0", (10, 10, 40, 40))]}
    devkit = write_vocdevkit(tmp_path, imgs, {"val": ["000001", "000002"]}, masks=True)
    pairs = segmentation_pairs(devkit, "val")
    assert [(a.stem, b.name) for a, b in pairs] == [("000001", "000001.png"), ("000002", "000002.png")]
    m = read_mask(pairs[0][1], image_size=(80, 64))
    assert m.shape == (64, 80) and m.dtype == np.uint8
    assert m[10, 10] == VOC_CLASSES.index("dog") + 1 and m[3, 2] == VOID and m[0, 0] == 0
    with pytest.raises(UserError, match=r"000001.png: mask is 80x64, its image is 81x64"):
        read_mask(pairs[0][1], image_size=(81, 64))
    bad = np.zeros((4, 4), np.uint8)
    bad[0, 0] = 22
    Image.fromarray(bad, "L").save(tmp_path / "bad.png")
    with pytest.raises(UserError, match=r"bad.png: class indices \[22\] outside 0..20 and 255"):
        read_mask(tmp_path / "bad.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match="rgb.png: mask mode 'RGB'"):
        read_mask(tmp_path / "rgb.png")
    (devkit / "VOC2007" / "SegmentationClass" / "000002.png").unlink()
    with pytest.raises(UserError, match=r"000002.png: mask listed in split 'val' not found"):
        segmentation_pairs(devkit, "val")


def test_voc_palette_known_entries():
    pal = voc_palette()
    rgb = lambda i: tuple(pal[3 * i:3 * i + 3])  # noqa: E731
    # background, aeroplane, bicycle, bird, boat, person (15), void (255): the devkit's colour map
    assert [rgb(i) for i in (0, 1, 2, 3, 4, 15, 255)] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0),
                                                           (0, 0, 128), (192, 128, 128), (224, 224, 192)]


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


def test_sklearn_ap_by_hand():
    # ranked + - - + + : precision at the positives 1, 2/4, 3/5. Non-interpolated (sklearn): mean = 0.7;
    # interpolated (VOC2010 area): 1, max(1/2, 3/5), 3/5 -> 2.2/3; so the two definitions are told apart
    s, y = np.array([5.0, 4, 3, 2, 1]), np.array([1, -1, -1, 1, 1])
    assert sklearn_ap(s, y) == pytest.approx((1 + 2 / 4 + 3 / 5) / 3)
    assert area_ap(s, y) == pytest.approx((1 + 0.6 + 0.6) / 3)
    # difficult labels are dropped, wherever they rank
    assert sklearn_ap(np.r_[9.0, s], np.r_[0, y]) == pytest.approx(0.7)
    # a tie between a positive and a negative is broken against the positive (philkr's score - 1e-5 * label):
    # the tied pair ranks - + , so precision at that positive is 1/2, not 1
    assert sklearn_ap([1.0, 1.0, 0.0], [1, -1, 1]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision([2.0, 1.0], [1, -1], "sklearn") == 1.0
    with pytest.raises(ValueError):
        sklearn_ap([1.0, 2.0], [-1, 0])


@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
def test_shared_voc_sample_parses():
    root = SHARED / "voc_sample"
    paths, labels, note = load_voc_split(root / "bbox_detection", "trainval", fallback="all")
    assert len(paths) == 3 and "train = test" in note
    c = {n: i for i, n in enumerate(VOC_CLASSES)}
    assert labels[:, c["person"]].max() == 1 and (labels != 0).all()  # <difficult/> empty -> not difficult
    for p in paths:  # real VOC2012 boxes all lie inside their images
        a = read_annotation(root / "bbox_detection" / "Annotations" / f"{p.stem}.xml")
        assert a.width == 500 and a.height in (338, 375) and all(o.box is not None for o in a.objects)
        with Image.open(p) as im:
            size = im.size
        m = read_mask(root / "semantic_segmentation" / "SegmentationClass" / f"{p.stem}.png", image_size=size)
        present = {VOC_CLASSES[k - 1] for k in np.unique(m) if 0 < k < VOID}
        assert {o.name for o in a.objects} <= present  # every boxed class is painted in the mask
