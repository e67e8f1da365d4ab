"""transfer.detection: Fast R-CNN on the transfer backbone. Pieces against independent truth (a transcription of
Caffe's ROIPooling layer, brute-force per-class top-k + NMS, fast-rcnn test_net's heap, hand-computed scales and
flips), then end-to-end runs on a VOCdevkit fixture and on ../shared/data/voc_sample, bad input, SIGTERM + exact
resume in a real subprocess, and DDP with gloo."""
import heapq
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pretext.runtime import UserError, build_config, load_checkpoint
from test_transfer_backbone import write_pretext_checkpoint, write_torchvision_alexnet
from test_voc import write_vocdevkit
from transfer.backbone import build_backbone
from transfer.det_eval import evaluate_results
from transfer.sampling import IterationSampler
from transfer.detection import (
    DetConfig,
    DetDataset,
    FastRCNNHeads,
    RoIPool,
    build_detector,
    build_optimizer,
    convert_selective_search,
    freeze,
    get_args_parser,
    image_scale,
    load_records,
    lr_at,
    main,
    read_proposals,
    set_thresholds,
)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# tiny but complete: the real AlexNet convolutions at 64 px, fc6/fc7 16 wide, few proposals
TINY = ["rows=random", "fc_dim=16", "train_scales=[64]", "train_max_size=128", "test_scale=64", "test_max_size=128",
        "max_iter=2", "workers=0", "log_every=1", "progress=false", "rpn_pre_nms_train=200", "rpn_post_nms_train=100",
        "rpn_pre_nms_test=100", "rpn_post_nms_test=50", "rois_per_batch=32", "checkpoint_every=1", "vis_images=2"]

FIXTURE = {"000001": [("dog", "0", (5, 8, 60, 50)), ("cat", "1", (40, 20, 78, 62))],
           "000002": [("dog", "0", (10, 4, 70, 40))],
           "000003": [("cat", "0", (2, 2, 40, 60)), ("dog", "0", (30, 10, 79, 63))],
           "000004": [("person", "0", (20, 5, 50, 60))],
           "000005": [("dog", "0", (4, 4, 76, 60)), ("person", "0", (50, 10, 70, 40))],
           "000006": [("cat", "0", (15, 15, 65, 55))]}


@pytest.fixture
def devkit(tmp_path) -> Path:
    ids = list(FIXTURE)
    return write_vocdevkit(tmp_path, FIXTURE, {"trainval": ids[:4], "test": ids[4:]}) / "VOC2007"


def _cfg(**kw) -> DetConfig:
    base = dict(voc="x", rows=["random"], fc_dim=16, train_scales=[64], test_scale=64, rois_per_batch=32)
    return build_config(DetConfig, {**base, **kw})


def _run(args: list[str]) -> int:
    return main(get_args_parser().parse_args(args))


# --------------------------------------------------------------------------------------------- RoI pooling
def _caffe_roi_pool(x: np.ndarray, roi, pooled: int, scale: float) -> np.ndarray:
    """Caffe ROIPoolingLayer::Forward_cpu (fast-rcnn's roi_pool5) for one RoI (x1, y1, x2, y2) in inclusive pixels."""
    rnd = lambda v: math.floor(v + 0.5)  # noqa: E731 - C++ round() for v >= 0
    sw, sh, ew, eh = (rnd(v * scale) for v in roi)
    rh, rw = max(eh - sh + 1, 1), max(ew - sw + 1, 1)
    bh, bw = rh / pooled, rw / pooled
    C, H, W = x.shape
    out = np.zeros((C, pooled, pooled), np.float32)
    for ph in range(pooled):
        for pw in range(pooled):
            hs = min(max(math.floor(ph * bh) + sh, 0), H)
            he = min(max(math.ceil((ph + 1) * bh) + sh, 0), H)
            ws = min(max(math.floor(pw * bw) + sw, 0), W)
            we = min(max(math.ceil((pw + 1) * bw) + sw, 0), W)
            if he > hs and we > ws:
                out[:, ph, pw] = x[:, hs:he, ws:we].max((1, 2))
    return out


def test_roi_pool_is_caffe_roi_pooling_on_inclusive_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 20, 25, generator=g)
    # continuous boxes [x1, x2) -> inclusive pixels x1 .. x2 - 1; ends on and off the 1/16 grid, tiny and clipped
    boxes = torch.tensor([[0, 0, 400, 320], [8, 24, 136, 200], [17.3, 3.9, 40.2, 21.1], [100, 100, 104, 103],
                          [300, 250, 399, 319], [0.0, 0.0, 16.0, 16.0]])
    out = RoIPool(6, 1 / 16)({"0": x}, [boxes]).numpy()
    for k, b in enumerate(boxes.tolist()):
        ref = _caffe_roi_pool(x[0].numpy(), (b[0], b[1], b[2] - 1, b[3] - 1), 6, 1 / 16)
        np.testing.assert_array_equal(out[k], ref)


# --------------------------------------------------------------------------------------------- RoI heads
def _heads(**kw) -> FastRCNNHeads:
    args = dict(bg_iou_lo=0.1, beta=1.0, detections_per_class=100)
    args.update(kw)
    return FastRCNNHeads(RoIPool(6, 1 / 16), nn.Identity(), nn.Identity(), 0.5, 0.5, 64, 0.25, (10.0, 10.0, 5.0, 5.0),
                         0.0, 0.3, 0, **args)


def test_foreground_background_and_ignored_rois():
    h = _heads()
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    props = torch.tensor([[0, 0, 100, 100], [0, 0, 100, 50], [0, 0, 100, 49.9], [0, 0, 100, 10], [0, 0, 100, 9.9],
                          [200, 200, 300, 300]], dtype=torch.float32)
    _, labels = h.assign_targets_to_proposals([props], [gt], [torch.tensor([7])])
    # IoU 1, 0.5 -> class 7 (fg: >= 0.5); 0.499, 0.1 -> background [0.1, 0.5); 0.099, 0 -> not sampled
    assert labels[0].tolist() == [7, 7, 0, 0, -1, -1]
    _, labels = h.assign_targets_to_proposals([props], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)])
    assert labels[0].tolist() == [-1] * 6  # no objects: no background either (fast-rcnn: max overlap 0 < 0.1)
    _, labels = _heads(bg_iou_lo=0.0).assign_targets_to_proposals([props], [gt], [torch.tensor([7])])
    assert labels[0].tolist() == [7, 7, 0, 0, 0, 0]  # bg_iou_lo 0: torchvision's (and py-faster-rcnn end2end's) rule
    # sampling: 64 per image, at most 25% foreground (30 near-copies of the box, 200 with IoU in [0.15, 0.45))
    g = torch.Generator().manual_seed(0)
    fg = gt + (torch.rand(30, 4, generator=g) - 0.5) * 4
    bg = torch.cat([torch.zeros(200, 3), 15 + 30 * torch.rand(200, 1, generator=g)], 1)
    bg[:, 2] = 100
    many = torch.cat([fg, bg])
    torch.manual_seed(0)
    props_s, _, lab, _ = h.select_training_samples([many], [{"boxes": gt, "labels": torch.tensor([7])}])
    assert len(props_s[0]) == 64 and int((lab[0] > 0).sum()) == 16 and int((lab[0] == 0).sum()) == 48


def _nms_ref(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list[int]:
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = []
        for j in order:
            iw = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            ih = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = iw * ih
            a = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            if inter / (a(boxes[i]) + a(boxes[j]) - inter) <= thresh:
                rest.append(j)
        order = rest
    return keep


def test_test_detections_are_per_class_top_k_then_nms():
    g = torch.Generator().manual_seed(1)
    R, C = 150, 4
    xy = torch.rand(R, 2, generator=g) * 200
    props = torch.cat([xy, xy + 20 + torch.rand(R, 2, generator=g) * 60], 1)
    logits = torch.randn(R, C, generator=g) * 3
    h = _heads(detections_per_class=100)
    out = h.detections(logits, torch.zeros(R, C * 4), [props], [(400, 400)])[0]
    probs = torch.softmax(logits, 1).numpy()
    pb = props.numpy()
    for c in range(1, C):
        top = np.argsort(-probs[:, c], kind="stable")[:100]
        keep = top[_nms_ref(pb[top], probs[top, c], 0.3)]
        mine = out["labels"] == c
        np.testing.assert_allclose(np.sort(out["scores"][mine].numpy()), np.sort(probs[keep, c]), rtol=1e-6)
        assert int((out["topk_labels"] == c).sum()) == 100  # the pre-NMS tops handed to the set cap
    # no cap over the classes (torchvision's box_detections_per_img): 3 classes x 100 disjoint boxes stay
    grid = torch.tensor([[20.0 * (k % 15), 20.0 * (k // 15), 20.0 * (k % 15) + 10, 20.0 * (k // 15) + 10]
                         for k in range(R)])
    out = h.detections(torch.zeros(R, C), torch.zeros(R, C * 4), [grid], [(400, 400)])[0]
    assert len(out["boxes"]) == 300 and all(int((out["labels"] == c).sum()) == 100 for c in range(1, C))


def test_set_cap_equals_test_net_heap():
    rng = np.random.default_rng(0)
    C, n_img, max_per_set = 3, 30, 2  # cap 60 per class over 30 images of up to 10 tops each
    tops = []
    for _ in range(n_img):
        lab = rng.integers(1, C + 1, rng.integers(0, 10))
        tops.append((rng.random(len(lab)).round(3), lab))  # rounded: ties
    cap = max_per_set * n_img
    thresh = set_thresholds(tops, C, cap)
    for c in range(1, C + 1):  # fast-rcnn lib/fast_rcnn/test.py test_net, one image after the other
        heap, t = [], -np.inf
        kept_per_image = []
        for s, lab in tops:
            s = s[(lab == c) & (s > t)]
            for v in s:
                heapq.heappush(heap, v)
            if len(heap) > cap:
                while len(heap) > cap:
                    heapq.heappop(heap)
                t = heap[0]
            kept_per_image.append(s)
        final = np.concatenate([s[s > t] for s in kept_per_image])
        mine = np.concatenate([s[(lab == c) & (s > thresh[c - 1])] for s, lab in tops])
        np.testing.assert_array_equal(np.sort(final), np.sort(mine))
    assert np.isinf(set_thresholds(tops, C, 0)).all()


# --------------------------------------------------------------------------------------------- model, data, solver
def test_detector_on_the_pretrained_fc6_fc7_with_fast_rcnn_init(tmp_path):
    write_pretext_checkpoint(tmp_path / "c.pth")
    net = build_backbone(str(tmp_path / "c.pth"), rescale=False, fc="linear")
    fc6 = net.fc6[0].weight.detach().clone()
    torch.manual_seed(0)
    m = build_detector(net, _cfg())
    assert m.backbone.out_channels == 256 and m.backbone.reduction == 16 and m.feature_stage == "conv5"
    pool = m.roi_heads.box_roi_pool
    assert isinstance(pool, RoIPool) and pool.output_size == 6 and pool.spatial_scale == 1 / 16
    assert torch.equal(m.roi_heads.box_head.fc6[0].weight, fc6) and fc6.shape == (32, 256 * 6 * 6)
    assert m.roi_heads.box_head.drop6.p == 0.5 and isinstance(m.roi_heads.box_head.drop7, nn.Dropout)
    pred = m.roi_heads.box_predictor
    assert pred.cls_score.out_features == 21 and pred.bbox_pred.out_features == 84
    assert pred.cls_score.bias.abs().sum() == 0 and pred.bbox_pred.bias.abs().sum() == 0
    big = build_detector(build_backbone(random_init="gaussian", fc="linear", fc_dim=1024), _cfg())
    assert abs(big.roi_heads.box_predictor.cls_score.weight.std().item() - 0.01) < 5e-4
    assert abs(big.roi_heads.box_predictor.bbox_pred.weight.std().item() - 0.001) < 5e-5
    m.eval()
    with torch.no_grad():
        dets = m([torch.rand(3, 96, 128)])
    assert set(dets[0]) >= {"boxes", "scores", "labels"}
    assert freeze(m, "conv1") == ["conv1"] and not m.backbone.body.conv1[0].weight.requires_grad
    with pytest.raises(UserError, match="freeze_until 'fc9'"):
        freeze(m, "fc9")
    # zhang_vgg and timm encoders through the same builder: a new two-layer head on their last map
    write_pretext_checkpoint(tmp_path / "z.pth", "zhang_vgg")
    z = build_detector(build_backbone(str(tmp_path / "z.pth"), rescale=False, fc="linear"), _cfg())
    assert z.feature_stage == "conv5" and z.roi_heads.box_roi_pool.spatial_scale == 1 / 8
    write_pretext_checkpoint(tmp_path / "t.pth", "timm:resnet18")
    t = build_detector(build_backbone(str(tmp_path / "t.pth"), rescale=False, fc="linear"), _cfg()).eval()
    assert t.feature_stage == "encoder" and t.backbone.reduction == 32
    with torch.no_grad():
        t([torch.rand(3, 96, 128)])


def test_data_layer_coordinates_scales_and_flips(devkit):
    cfg = _cfg(voc=str(devkit), test_scale=32, train_scales=[48, 96], train_max_size=100)
    recs, _ = load_records(devkit, "trainval", cfg, train=True)
    r = recs[0]  # 000001: dog (5, 8, 60, 50) in the XML's inclusive 1-based pixels, an 80 x 64 image
    np.testing.assert_array_equal(r.boxes[0], [4, 7, 60, 50])
    assert r.difficult.tolist() == [False, True] and r.labels.tolist() == [12, 8]  # dog, cat (difficult: kept)
    test = DetDataset(recs, cfg, train=False)[(0, 0)]
    assert test["scale"] == 0.5 and test["image"].shape == (3, 32, 40)
    torch.testing.assert_close(test["target"]["boxes"][0], torch.tensor([2.0, 3.5, 30.0, 25.0]))
    # fast-rcnn's prep_im_for_blob: 96 / 64 = 1.5 would make the long side 120 > 100 -> 100 / 80
    assert image_scale(64, 80, 96, 100) == 1.25 and image_scale(64, 80, 48, 100) == 0.75
    train = DetDataset(recs, cfg, train=True)
    assert len(train) == 2 * len(recs)
    for seed in range(4):
        a, b = train[(0, seed)], train[(len(recs), seed)]  # the same draw, unflipped and flipped
        assert a["scale"] in (0.75, 1.25) and a["scale"] == b["scale"] and b["flipped"] and not a["flipped"]
        torch.testing.assert_close(b["image"], a["image"].flip(-1))
        w = a["image"].shape[-1]
        ba, bb = a["target"]["boxes"], b["target"]["boxes"]
        torch.testing.assert_close(bb, torch.stack([w - ba[:, 2], ba[:, 1], w - ba[:, 0], ba[:, 3]], 1))
    scales = {train[(0, s)]["scale"] for s in range(20)}
    assert scales == {0.75, 1.25}


def test_precomputed_proposals_files(tmp_path):
    d = tmp_path / "props"
    d.mkdir()
    np.save(d / "a.npy", np.array([[1, 1, 10, 20, 0.9], [5, 5, 4, 9, 0.5], [2, 3, 30, 40, 0.1]], np.float32))
    (d / "b.txt").write_text("1 1 10 20\n2 3 30 40\n")
    np.testing.assert_array_equal(read_proposals(d, "a"), [[0, 0, 10, 20], [1, 2, 30, 40]])  # degenerate dropped
    np.testing.assert_array_equal(read_proposals(d, "b", max_n=1), [[0, 0, 10, 20]])
    with pytest.raises(UserError, match=r"props/c.npy \(or .txt\): proposals file not found"):
        read_proposals(d, "c")
    (d / "e.txt").write_text("1 2\n")
    with pytest.raises(UserError, match=r"e.txt: proposals must be an \(R, 4\)"):
        read_proposals(d, "e")
    from scipy.io import savemat

    boxes = np.empty(2, dtype=object)
    boxes[0] = np.array([[3, 1, 20, 10]], np.float64)  # y1 x1 y2 x2
    boxes[1] = np.array([[1, 2, 5, 6], [7, 8, 9, 10]], np.float64)
    savemat(tmp_path / "ss.mat", {"boxes": boxes, "images": np.array(["x", "y"], dtype=object)})
    assert convert_selective_search(tmp_path / "ss.mat", tmp_path / "out") == 2
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "x.npy"), [[1, 3, 10, 20]])
    np.testing.assert_array_equal(read_proposals(tmp_path / "out", "y"), [[1, 0, 6, 5], [7, 6, 10, 9]])


def test_iteration_sampler_ranks_make_the_single_process_batch():
    one = IterationSampler(10, 4, seed=3)
    one.set_range(0, 7)
    ranks = [IterationSampler(10, 2, r, 2, seed=3) for r in range(2)]
    for s in ranks:
        s.set_range(0, 7)
    a = list(one)
    b = [list(s) for s in ranks]
    merged = [x for it in range(7) for r in range(2) for x in b[r][2 * it:2 * it + 2]]
    assert merged == a and len(set(i for i, _ in a[:10])) == 10  # every entry once per pass
    later = IterationSampler(10, 4, seed=3)
    later.set_range(3, 7)
    assert list(later) == a[12:]  # resuming at iteration 3 continues the same stream


def test_solver_multipliers_and_schedule():
    cfg = _cfg()
    m = build_detector(build_backbone(random_init="gaussian", fc="linear", fc_dim=8), cfg)
    freeze(m, "conv1")
    opt = build_optimizer(m, cfg)
    w, b = opt.param_groups
    assert (w["lr_mult"], w["weight_decay"]) == (1.0, 5e-4) and (b["lr_mult"], b["weight_decay"]) == (2.0, 0.0)
    assert all(p.ndim > 1 for p in w["params"]) and all(p.ndim == 1 for p in b["params"])
    assert not any(p is m.backbone.body.conv1[0].weight for p in w["params"])
    assert [lr_at(cfg, i) for i in (0, 49_999, 50_000, 100_000, 149_999)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5, 1e-5])


# --------------------------------------------------------------------------------------------- end to end
def test_train_and_evaluate_on_a_devkit_fixture(devkit, tmp_path):
    from pretext.cli import main as crosschannel

    out = tmp_path / "run"
    assert crosschannel(["transfer", "det", "--voc", str(devkit), "--set", f"out_dir={out}", "--set", "freeze_until=conv1",
                         *sum((["--set", s] for s in TINY), [])]) == 0
    row = out / "random"
    res = json.loads((row / "results.json").read_text())
    assert res["iterations"] == 2 and res["num_test_images"] == 2 and res["num_classes_evaluated"] == 3
    assert res["ap_type"] == "voc07_11pt" and set(res["coco"]) >= {"AP", "AP50"}
    recs = [json.loads(line) for line in (row / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs] == [1, 2] and {"loss_classifier", "loss_objectness", "max_rss_mb"} <= set(recs[0])
    # the results files are the devkit's and det-eval re-scores them to the same numbers
    again = evaluate_results(devkit, row / "detections", "test", image_set=str(row / "detections" / "image_set.txt"))
    assert again["mAP"] == res["mAP"] and again["ap"] == res["ap"]
    line = (row / "detections" / "comp4_det_test_dog.txt").read_text().splitlines()[0].split()
    assert line[0] in ("000005", "000006") and len(line) == 6
    assert (row / "detections.png").stat().st_size > 0 and (out / "ap_per_class.png").is_file()
    assert "| random | gray |" in (out / "results.md").read_text() and (out / "config.yaml").is_file()
    ck = load_checkpoint(row / "checkpoint.pth")
    assert ck["iter"] == 2 and ck["row"] == "random"
    assert (row / "tensorboard").is_dir()
    # a finished run is never overwritten; --resume keeps its results
    args = ["--voc", str(devkit), "--set", f"out_dir={out}", "--set", "freeze_until=conv1", *sum((["--set", s] for s in TINY), [])]
    with pytest.raises(UserError, match="exists: pass --resume"):
        _run(args)
    assert _run(args + ["--resume"]) == 0
    assert "random: finished earlier, results kept" in (out / "log.txt").read_text()
    # an unfinished row: a changed recipe is refused, a longer run continues (recorded), stale temp files go
    (row / "results.json").unlink()
    with pytest.raises(UserError, match=r"resuming with a changed config \(lr: 0.001 -> 0.01\)"):
        _run(args + ["--resume", "--set", "lr=0.01"])
    assert "lr: 0.001" in (out / "config.yaml").read_text()  # refused before anything was written
    (row / ".checkpoint.pth.x1y2.tmp").write_bytes(b"torn")
    assert _run(args + ["--resume", "--set", "max_iter=3"]) == 0
    assert load_checkpoint(row / "checkpoint.pth")["iter"] == 3 and not (row / ".checkpoint.pth.x1y2.tmp").exists()
    assert [json.loads(line)["iter"] for line in (row / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    hist = json.loads((row / "config_history.jsonl").read_text().splitlines()[-1])
    assert hist["step"] == 2 and hist["changes"]["max_iter"] == {"old": 2, "new": 3}
    # two runs never share a folder
    from pretext.runtime import RunLock

    with RunLock(out):
        with pytest.raises(UserError, match="is in use by another run"):
            _run(args + ["--resume"])


def test_supervised_row_is_the_torchvision_alexnet(tmp_path):
    tv = write_torchvision_alexnet(tmp_path / "alexnet.pth", fc_dim=32)
    net = build_backbone(supervised=f"alexnet:{tmp_path / 'alexnet.pth'}", fc="linear", input="gray")
    m = build_detector(net, _cfg(rows=["supervised"], supervised="alexnet:x"))
    assert torch.equal(m.roi_heads.box_head.fc6[0].weight, tv.classifier[1].weight)
    assert torch.equal(m.roi_heads.box_head.fc7[0].weight, tv.classifier[4].weight)
    assert m.backbone.input_kind == "grey" and m.backbone.out_channels == 256 and m.roi_heads.box_roi_pool.output_size == 6
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 96, 128)])[0]
    assert out["boxes"].shape[1] == 4


@pytest.mark.slow
def test_checkpoint_row_color_input_precomputed_proposals_on_voc_sample(shared_data, tmp_path):
    """The colorization row (a pretext checkpoint, rescaled as the release, Lab input) with selective-search-style
    proposals on the three real VOC2012 images of ../shared/data/voc_sample (no ImageSets: every image in both
    splits)."""
    voc = shared_data / "voc_sample" / "bbox_detection"
    write_pretext_checkpoint(tmp_path / "c.pth")
    props = tmp_path / "props"
    props.mkdir()
    rng = np.random.default_rng(0)
    for p in (voc / "JPEGImages").glob("*.jpg"):
        xy = rng.uniform(1, 300, (50, 2))
        np.save(props / f"{p.stem}.npy", np.concatenate([xy, xy + rng.uniform(20, 200, (50, 2))], 1))
    out = tmp_path / "run"
    args = ["--voc", str(voc), "--checkpoint", str(tmp_path / "c.pth"), *sum((["--set", s] for s in TINY), []),
            "--set", "rows=colorization", "--set", "input=color", "--set", "init_images=3", "--set", f"proposals={props}",
            "--set", "fallback_split=all", "--set", f"out_dir={out}", "--set", "train_scales=[96,128]",
            "--set", "test_scale=96", "--set", "ap=area"]
    assert _run(args) == 0
    res = json.loads((out / "colorization" / "results.json").read_text())
    assert res["num_test_images"] == 3 and res["ap_type"] == "area" and res["input"] == "color"
    assert res["published_mAP"] == 47.9 and res["backbone"]["source"] == "checkpoint"
    assert res["backbone"]["rescale"]["images"] == 3  # the release's rescaling, on 3 real training images
    assert "| colorization | color |" in (out / "results.md").read_text()
    model = load_checkpoint(out / "colorization" / "checkpoint.pth")["model"]
    assert not any(k.startswith("rpn.") for k in model) and model["backbone.body.conv1.0.weight"].shape[1] == 3


def test_bad_input_is_refused_in_one_line(devkit, tmp_path, caplog, monkeypatch):
    base = ["--voc", str(devkit), "--set", f"out_dir={tmp_path / 'r'}", *sum((["--set", s] for s in TINY), [])]
    with pytest.raises(UserError, match="rois_per_batch \\(33\\) must be a multiple of images_per_batch"):
        _run(base + ["--set", "rois_per_batch=33"])
    with pytest.raises(UserError, match="need bg_iou_lo < bg_iou_hi <= fg_iou"):
        _run(base + ["--set", "bg_iou_lo=0.6"])
    with pytest.raises(UserError, match="config key 'train_scales': must be <= 4000"):
        _run(base + ["--set", "train_scales=[600,100000]"])
    with pytest.raises(UserError, match="row 'colorization' needs a pretext checkpoint"):
        _run(base + ["--set", "rows=colorization"])
    with pytest.raises(UserError, match="not a folder"):
        _run(base + ["--set", f"proposals={tmp_path / 'none'}"])
    (tmp_path / "p").mkdir()
    with pytest.raises(UserError, match=r"p/000001.npy \(or .txt\): proposals file not found"):
        _run(base + ["--set", f"proposals={tmp_path / 'p'}"])
    assert not (tmp_path / "r").exists()  # nothing created before the data is checked
    # a box outside the image is clipped, a degenerate one dropped, an image left without objects leaves training,
    # each with a warning naming the file; a malformed XML is one line naming it
    ann = devkit / "Annotations"
    (ann / "000002.xml").write_text((ann / "000002.xml").read_text().replace("<xmax>70</xmax>", "<xmax>95</xmax>"))
    (ann / "000004.xml").write_text((ann / "000004.xml").read_text().replace("<xmin>20</xmin>", "<xmin>55</xmin>"))
    monkeypatch.setattr(logging.getLogger("crosschannel"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="crosschannel"):
        recs, info = load_records(devkit, "trainval", _cfg(voc=str(devkit)), train=True)
    assert "000002.xml: box (10.0, 4.0, 95.0, 40.0) of 'dog' outside the 80x64 image clipped" in caplog.text
    assert "000004.xml: degenerate box" in caplog.text and "000004.xml: no objects of the 20 classes" in caplog.text
    assert [r.image_id for r in recs] == ["000001", "000002", "000003"] and info["dropped_without_objects"] == ["000004"]
    assert recs[1].boxes[0].tolist() == [9, 3, 80, 40]
    (ann / "000003.xml").write_text("<annotation><object><name>dog</name>")
    with pytest.raises(UserError, match=r"Annotations/000003.xml: invalid XML"):
        _run(base)


# --------------------------------------------------------------------------------------------- signals, resume, DDP
def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resumes_to_the_same_weights(devkit, tmp_path):
    def cmd(out, *extra):
        return [PY, "-m", "transfer.detection", "--voc", str(devkit), *sum((["--set", s] for s in TINY), []),
                "--set", "max_iter=10", "--set", "checkpoint_every=100", "--set", "coco=false",
                "--set", f"out_dir={out}", *extra]

    ref = subprocess.run(cmd(tmp_path / "ref"), env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "cut"
    p = subprocess.Popen(cmd(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_file = out / "random" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log_file.is_file() and len(log_file.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-2000:]
    warned = [ln for ln in err.splitlines() if "SIGTERM received: stopped row 'random'" in ln]  # a command to copy
    assert len(warned) == 1 and warned[0].endswith(" --resume") and "continue with: " in warned[0], err[-2000:]
    assert "-m transfer.detection --voc" in warned[0], warned[0]
    cut = load_checkpoint(out / "random" / "checkpoint.pth")["iter"]
    assert 2 <= cut < 10 and not (out / "random" / "results.json").exists()
    done = subprocess.run(cmd(out, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_checkpoint(tmp_path / "ref" / "random" / "checkpoint.pth")
    b = load_checkpoint(out / "random" / "checkpoint.pth")
    assert a["iter"] == b["iter"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    iters = [json.loads(line)["iter"] for line in (out / "random" / "log.jsonl").read_text().splitlines()]
    assert iters == list(range(1, 11))  # the steps after the checkpoint are not logged twice
    ra = json.loads((tmp_path / "ref" / "random" / "results.json").read_text())
    rb = json.loads((out / "random" / "results.json").read_text())
    assert ra["ap"] == rb["ap"]


@pytest.mark.slow
def test_ddp_two_processes_gloo(devkit, tmp_path):
    out = tmp_path / "ddp"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "transfer.detection",
           "--voc", str(devkit), *sum((["--set", s] for s in TINY), []), "--set", "max_iter=3", "--set", "coco=false",
           "--set", f"out_dir={out}", "--set", "device=cpu"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "random" / "results.json").read_text())
    assert res["iterations"] == 3 and res["num_test_images"] == 2
    ck = load_checkpoint(out / "random" / "checkpoint.pth")
    assert len(ck["rng_per_rank"]) == 2  # every rank's random state, for an exact resume
    # every test image was scored once, across both ranks
    ids = {line.split()[0] for c in ("dog", "cat", "person")
           for line in (out / "random" / "detections" / f"comp4_det_test_{c}.txt").read_text().splitlines()}
    assert ids == {"000005", "000006"}
