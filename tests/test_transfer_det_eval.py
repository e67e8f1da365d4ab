"""transfer.det_eval: VOC detection AP exactly as py-faster-rcnn's ``lib/datasets/voc_eval.py``. One hand-worked case
per rule, a line-by-line transcription of voc_eval's loop compared on random detections, the devkit results files
(writing, reading, one-line errors), COCO-style AP on the same detections, and the ``det-eval`` command."""
import json

import numpy as np
import pytest

from pretext.runtime import UserError
from test_voc import write_vocdevkit
from transfer.det_eval import (
    Detections,
    ap_kind_for,
    coco_ap,
    evaluate_results,
    get_args_parser,
    main,
    match_detections,
    read_results,
    results_path,
    score,
    voc_eval_class,
    write_results,
)
from transfer.voc import VOCAnnotation, VOCObject


def _gt(boxes, difficult=None):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return boxes, np.asarray(difficult if difficult is not None else [False] * len(boxes), bool)


def _dets(rows):
    """rows: (image id, score, x1, y1, x2, y2) in file order."""
    return Detections([r[0] for r in rows], np.asarray([r[1] for r in rows], np.float64),
                      np.asarray([r[2:] for r in rows], np.float64).reshape(-1, 4))


# --------------------------------------------------------------------------------------------- one case per rule
def test_rule_detections_are_ranked_by_score_not_file_order():
    gt = {"a": _gt([(1, 1, 10, 10)])}
    # file order: the hit first; by score the miss (0.9) comes first -> precision 0 then 1/2 -> every 11-point
    # threshold sees at most 1/2 (it would be 1.0 in file order)
    d = _dets([("a", 0.8, 1, 1, 10, 10), ("a", 0.9, 50, 50, 60, 60)])
    order, tp, fp = match_detections(d, gt)
    assert order.tolist() == [1, 0] and tp.tolist() == [0, 1] and fp.tolist() == [1, 0]
    assert voc_eval_class(d, gt, 1, "voc07_11pt")["ap"] == pytest.approx(0.5)


def test_rule_iou_uses_the_plus_one_pixel_convention():
    # inclusive pixel boxes: gt 3x3 = 9 px, detection 3x2 = 6 px -> IoU 6/9 > 0.5 (continuous: 2/4 = 0.5, no match)
    gt = {"a": _gt([(1, 1, 3, 3)])}
    _, tp, fp = match_detections(_dets([("a", 1.0, 1, 1, 3, 2)]), gt)
    assert tp.tolist() == [1] and fp.tolist() == [0]


def test_rule_a_match_needs_iou_strictly_above_one_half():
    # gt 10x10 = 100 px, detection 10x5 = 50 px inside it: IoU exactly 0.5 -> false positive
    gt = {"a": _gt([(1, 1, 10, 10)])}
    _, tp, fp = match_detections(_dets([("a", 1.0, 1, 1, 10, 5), ("a", 0.5, 1, 1, 10, 6)]), gt)
    assert tp.tolist() == [0, 1] and fp.tolist() == [1, 0]  # 60/100 > 0.5 matches


def test_rule_detection_on_a_difficult_box_is_neither_tp_nor_fp():
    gt = {"a": _gt([(1, 1, 10, 10), (30, 30, 40, 40)], [True, False])}
    d = _dets([("a", 0.9, 1, 1, 10, 10), ("a", 0.85, 2, 2, 10, 10), ("a", 0.8, 30, 30, 40, 40)])
    _, tp, fp = match_detections(d, gt)
    assert tp.tolist() == [0, 0, 1] and fp.tolist() == [0, 0, 0]  # both on the difficult box: ignored, twice
    r = voc_eval_class(d, gt, 1, "voc07_11pt")
    # precision 0/eps = 0, 0, then 1 at recall 1 -> AP 1 (counting them as FPs would give 1/3)
    assert r["prec"].tolist() == [0, 0, 1] and r["rec"].tolist() == [0, 0, 1] and r["ap"] == pytest.approx(1.0)


def test_rule_second_detection_of_a_matched_box_is_a_false_positive():
    gt = {"a": _gt([(1, 1, 10, 10)])}
    d = _dets([("a", 0.9, 1, 1, 10, 10), ("a", 0.8, 1, 1, 10, 9)])
    _, tp, fp = match_detections(d, gt)
    assert tp.tolist() == [1, 0] and fp.tolist() == [0, 1]


def test_rule_each_detection_takes_its_best_box_even_if_already_taken():
    # voc_eval does not fall back to the second-best box: the 2nd detection's best box is the taken one -> FP
    gt = {"a": _gt([(1, 1, 10, 10), (1, 1, 10, 8)])}
    d = _dets([("a", 0.9, 1, 1, 10, 10), ("a", 0.8, 1, 1, 10, 10)])
    _, tp, fp = match_detections(d, gt)
    assert tp.tolist() == [1, 0] and fp.tolist() == [0, 1]


def test_rule_detection_in_an_image_without_boxes_of_its_class_is_fp():
    gt = {"a": _gt([(1, 1, 10, 10)]), "b": _gt([])}
    _, tp, fp = match_detections(_dets([("b", 0.9, 1, 1, 10, 10), ("a", 0.5, 1, 1, 10, 10)]), gt)
    assert tp.tolist() == [0, 1] and fp.tolist() == [1, 0]


def test_rule_npos_excludes_difficult_boxes():
    anns = {"a": VOCAnnotation("a", 50, 50, (VOCObject("dog", (1, 1, 10, 10)), VOCObject("dog", (20, 20, 30, 30)),
                                                VOCObject("dog", (35, 35, 45, 45), difficult=True),
                                                VOCObject("cat", (1, 1, 5, 5))))}
    res = score(anns, {"dog": _dets([("a", 0.9, 1, 1, 10, 10)])}, "voc07_11pt", ("dog",), coco=False)
    assert res["npos"]["dog"] == 2  # the difficult dog is not counted
    # recall 1/2 at precision 1: thresholds 0..0.5 (6 of 11) -> 6/11
    assert res["ap"]["dog"] == pytest.approx(6 / 11)


def test_rule_11_point_and_area_ap_by_hand():
    gt = {"a": _gt([(1, 1, 10, 10)]), "b": _gt([(1, 1, 10, 10)])}
    d = _dets([("a", 0.9, 1, 1, 10, 10), ("a", 0.8, 30, 30, 40, 40), ("b", 0.7, 1, 1, 10, 10)])
    # TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    r11 = voc_eval_class(d, gt, 2, "voc07_11pt")
    assert r11["ap"] == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)  # t <= 0.5: 1; t >= 0.6: 2/3
    # area: envelope 1 on (0, 1/2], 2/3 on (1/2, 1]
    assert voc_eval_class(d, gt, 2, "area")["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_ap_type_follows_the_year(tmp_path):
    assert ap_kind_for(tmp_path / "VOCdevkit" / "VOC2007") == "voc07_11pt"
    assert ap_kind_for(tmp_path / "VOCdevkit" / "VOC2012") == "area"
    assert ap_kind_for(tmp_path / "VOCdevkit" / "VOC2010") == "area"
    assert ap_kind_for(tmp_path / "other") == "voc07_11pt"
    assert ap_kind_for(tmp_path / "VOC2012", "voc07_11pt") == "voc07_11pt"
    with pytest.raises(UserError, match="ap must be one of"):
        ap_kind_for(tmp_path, "coco")


def test_class_without_positives_has_no_ap_and_is_left_out_of_the_map(caplog):
    anns = {"a": VOCAnnotation("a", 50, 50, (VOCObject("dog", (1, 1, 10, 10)), VOCObject("cat", (1, 1, 9, 9), difficult=True)))}
    res = score(anns, {"dog": _dets([("a", 0.9, 1, 1, 10, 10)]), "cat": _dets([("a", 0.9, 1, 1, 9, 9)])},
                "voc07_11pt", ("dog", "cat"), coco=False)
    assert res["ap"] == {"dog": 1.0, "cat": None} and res["mAP"] == 1.0 and res["num_classes_evaluated"] == 1
    assert "no non-difficult ground truth for cat" in caplog.text


# --------------------------------------------------------------------------------------------- the transcription
def _voc_eval_transcribed(lines: list[str], recs: dict, classname: str, use_07: bool) -> float:
    """py-faster-rcnn lib/datasets/voc_eval.py, voc_eval() and voc_ap(), step by step (numpy only), from the
    results-file lines and parse_rec-style records ({id: [{'name', 'difficult', 'bbox'}]})."""
    class_recs, npos = {}, 0
    for name, objs in recs.items():
        R = [o for o in objs if o["name"] == classname]
        bbox = np.array([x["bbox"] for x in R])
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        npos = npos + sum(~difficult)
        class_recs[name] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(R)}
    splitlines = [x.strip().split(" ") for x in lines]
    image_ids = [x[0] for x in splitlines]
    confidence = np.array([float(x[1]) for x in splitlines])
    BB = np.array([[float(z) for z in x[2:]] for x in splitlines])
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1., 0.)
            ih = np.maximum(iymax - iymin + 1., 0.)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.) * (bb[3] - bb[1] + 1.) + (BBGT[:, 2] - BBGT[:, 0] + 1.) *
                   (BBGT[:, 3] - BBGT[:, 1] + 1.) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > 0.5:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.
        else:
            fp[d] = 1.
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        ap = 0.
        for t in np.arange(0., 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.
        return ap
    mrec = np.concatenate(([0.], rec, [1.]))
    mpre = np.concatenate(([0.], prec, [0.]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


@pytest.mark.parametrize("seed", range(6))
def test_equals_the_voc_eval_transcription_on_random_detections(tmp_path, seed):
    rng = np.random.default_rng(seed)
    recs, anns = {}, {}
    for k in range(12):
        objs = []
        for _ in range(rng.integers(0, 5)):
            x1, y1 = rng.integers(1, 60, 2)
            w, h = rng.integers(5, 40, 2)
            objs.append({"name": str(rng.choice(["dog", "cat"])), "difficult": int(rng.random() < 0.25),
                         "bbox": [int(x1), int(y1), int(x1 + w), int(y1 + h)]})
        recs[f"{k:06d}"] = objs
        anns[f"{k:06d}"] = VOCAnnotation(f"{k:06d}", 120, 120, tuple(
            VOCObject(o["name"], tuple(float(v) for v in o["bbox"]), bool(o["difficult"])) for o in objs))
    dets = {}
    for c in ("dog", "cat"):
        rows = []
        for k, objs in recs.items():
            for o in objs:  # jittered copies of the boxes (hits, misses, duplicates) and random boxes
                if o["name"] == c:
                    for _ in range(rng.integers(0, 3)):
                        j = rng.normal(0, 4, 4)
                        rows.append((k, round(float(rng.random()), 2), *(np.asarray(o["bbox"]) + j).round(1)))
            for _ in range(rng.integers(0, 3)):
                x1, y1 = rng.uniform(1, 80, 2)
                rows.append((k, round(float(rng.random()), 2), round(x1, 1), round(y1, 1), round(x1 + 20, 1),
                             round(y1 + 15, 1)))
        dets[c] = _dets(rows)  # scores to 2 decimals: many ties, broken as voc_eval breaks them
    write_results(tmp_path, "test", dets)
    for c in ("dog", "cat"):
        lines = results_path(tmp_path, "test", c).read_text().splitlines()
        d = read_results(results_path(tmp_path, "test", c), set(recs))
        res = score(anns, {c: d}, "voc07_11pt", (c,), coco=False)
        assert res["ap"][c] == pytest.approx(_voc_eval_transcribed(lines, recs, c, True), abs=1e-12)
        res = score(anns, {c: d}, "area", (c,), coco=False)
        assert res["ap"][c] == pytest.approx(_voc_eval_transcribed(lines, recs, c, False), abs=1e-12)


# --------------------------------------------------------------------------------------------- files, COCO, CLI
def test_results_files_roundtrip_and_one_line_errors(tmp_path):
    d = _dets([("000001", 0.123456789, 1.04, 2, 30.26, 40), ("000002", 1e-7, 5, 5, 9, 9)])
    write_results(tmp_path, "test", {"dog": d})
    p = results_path(tmp_path, "test", "dog")
    assert p.name == "comp4_det_test_dog.txt"
    assert p.read_text().splitlines()[0] == "000001 0.12345679 1.0 2.0 30.3 40.0"
    back = read_results(p, {"000001", "000002"})
    assert back.image_ids == ["000001", "000002"] and back.scores[1] == 1e-7
    p.write_text("000001 0.5 1 1 5 5\n\n000002 0.4 1 1 5\n")
    with pytest.raises(UserError, match=r"comp4_det_test_dog.txt: line 3 is not 'image_id score x1 y1 x2 y2'"):
        read_results(p)
    p.write_text("000009 0.5 1 1 5 5\n")
    with pytest.raises(UserError, match=r"line 1: image '000009' is not in the image set"):
        read_results(p, {"000001"})
    with pytest.raises(UserError, match="results file not found"):
        read_results(tmp_path / "nope.txt")


def test_coco_ap_on_the_same_detections():
    anns = {"a": VOCAnnotation("a", 100, 100, (VOCObject("dog", (11, 11, 50, 60)), VOCObject("dog", (60, 60, 90, 95), difficult=True))),
            "b": VOCAnnotation("b", 100, 100, (VOCObject("cat", (5, 5, 40, 30)),))}
    perfect = {"dog": _dets([("a", 0.9, 11, 11, 50, 60)]), "cat": _dets([("b", 0.8, 5, 5, 40, 30)])}
    c = coco_ap(anns, perfect, ("dog", "cat"))
    assert c["AP"] == pytest.approx(1.0) and c["AP50"] == pytest.approx(1.0)
    # a detection on the difficult (crowd) dog is ignored by COCO as by VOC; one a pixel off on each side is not
    # perfect at IoU 0.95 (inclusive 40x50 vs 38x48: IoU 0.912) but still counts at 0.50..0.90
    more = {"dog": _dets([("a", 0.95, 60, 60, 90, 95), ("a", 0.9, 12, 12, 49, 59)]), "cat": perfect["cat"]}
    c = coco_ap(anns, more, ("dog", "cat"))
    assert c["AP50"] == pytest.approx(1.0) and 0.5 < c["AP"] < 1.0
    res = score(anns, more, "voc07_11pt", ("dog", "cat"))
    assert res["ap"]["dog"] == pytest.approx(1.0) and res["coco"]["AP50"] == pytest.approx(1.0)
    assert coco_ap(anns, {"dog": Detections.empty()}, ("dog", "cat"))["AP"] is None
    # the COCO protocol's 100 detections per image over all classes: 100 better-scored (false) cats in image a push
    # its dog out (AP50: dog 1 -> 0; cat, whose one box is in b, 0)
    crowded = {"cat": _dets([("a", 0.9, 1, 1, 5, 5)] * 100), "dog": _dets([("a", 0.5, 11, 11, 50, 60)])}
    assert coco_ap(anns, crowded, ("dog", "cat"), max_per_image=101)["AP50"] == pytest.approx(0.5)
    assert coco_ap(anns, crowded, ("dog", "cat"))["AP50"] == pytest.approx(0.0)


def test_det_eval_command_on_a_devkit(tmp_path, capsys):
    images = {"000001": [("dog", "0", (3, 4, 40, 30)), ("cat", "1", (50, 10, 70, 40))],
              "000002": [("cat", "0", (10, 10, 60, 50))], "000003": [("dog", "0", (20, 20, 70, 60))]}
    devkit = write_vocdevkit(tmp_path, images, {"test": list(images)})
    out = tmp_path / "results"
    write_results(out, "test", {"dog": _dets([("000001", 0.9, 3, 4, 40, 30), ("000002", 0.7, 10, 10, 60, 50)]),
                                "cat": _dets([("000002", 0.8, 12, 10, 60, 50)]),
                                **{c: Detections.empty() for c in ("person", "car")}})
    root = devkit / "VOC2007"
    for c in ("aeroplane", "bicycle"):
        results_path(out, "test", c).write_text("")
    args = get_args_parser().parse_args(["--voc", str(root), "--results", str(out), "--json", str(tmp_path / "s.json")])
    with pytest.raises(UserError, match="comp4_det_test_bird.txt: results file not found"):
        main(args)
    from transfer.voc import VOC_CLASSES

    for c in VOC_CLASSES:
        if not results_path(out, "test", c).exists():
            results_path(out, "test", c).write_text("")
    from pretext.cli import main as crosschannel

    assert crosschannel(["transfer", "det-eval", "--voc", str(root), "--results", str(out), "--json",
                         str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    # dog: a hit in 000001, a detection in 000002 (no dog there), the dog of 000003 missed: 6/11; cat: the one
    # non-difficult cat found (IoU 49*41 / 51*41): 1
    assert "| dog | 54.5 | 2 | 2 |" in text and "| cat | 100.0 | 1 | 1 |" in text and "**mAP** | **77.3**" in text
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["ap"]["dog"] == pytest.approx(6 / 11) and res["ap"]["cat"] == 1.0
    assert res == {**res, "num_images": 3, "num_classes_evaluated": 2} and res["coco"]["AP50"] is not None
    assert evaluate_results(root, out, "test", coco=False)["mAP"] == res["mAP"]
