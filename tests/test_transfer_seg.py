"""transfer.segmentation / transfer.seg_eval: FCN-32s as fcn.berkeleyvision.org builds it (bilinear kernel and crop
offsets against the released surgery.py and prototxts), the loss and the scores against hand-computed cases and a
transcription of score.py, the SBD / VOC readers' one-line errors, the stand-alone scorer over PNGs, and the trainer
end to end on VOC + SBD fixtures and on ../shared/data/voc_sample (grey and colour input, the three rows, resume,
SIGTERM on a real subprocess, DDP with gloo). ``sbd_fixture`` / ``voc_fixture`` are reused by the mmseg tests."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_transfer_backbone import write_pretext_checkpoint, write_torchvision_alexnet
from test_voc import write_vocdevkit

from pretext.runtime import RunLock, UserError, load_checkpoint, load_config, run_entry
from transfer import seg_eval as E
from transfer import fcn as FC
from transfer import seg_data as D
from transfer import segmentation as S
from transfer.backbone import alexnet_transfer_net, vgg16_transfer_net
from transfer.voc import VOC_CLASSES, VOID, voc_palette

REPO = Path(__file__).resolve().parents[1]
SEG11VALID_MD5 = "7984b6ce736bd3666d8b7ee70b5401da"  # fcn.berkeleyvision.org data/pascal/seg11valid.txt @ 1305c73


# --------------------------------------------------------------------------------------------- fixtures
def voc_fixture(base: Path, n: int = 6, size=(48, 40), seed: int = 0) -> Path:
    """VOCdevkit/VOC2011 with SegmentationClass masks (class boxes, void borders); split 'val' = every image."""
    rng = np.random.default_rng(seed)
    imgs = {}
    for i in range(n):
        objs = []
        for c in rng.choice(20, 2, replace=False):
            x1, y1 = int(rng.integers(1, size[0] // 2)), int(rng.integers(1, size[1] // 2))
            objs.append((VOC_CLASSES[int(c)], "0", (x1, y1, x1 + int(rng.integers(6, size[0] // 2)),
                                                     y1 + int(rng.integers(6, size[1] // 2)))))
        imgs[f"2011_{i:06d}"] = objs
    ids = sorted(imgs)
    return write_vocdevkit(base, imgs, {"val": ids, "train": ids[: n // 2]}, size=size, seed=seed, year="2011",
                           masks=True) / "VOC2011"


def write_sbd_mat(path: Path, mask: np.ndarray) -> None:
    """An SBD ``cls/<id>.mat``: struct GTcls with Segmentation (uint8), Boundaries, CategoriesPresent."""
    from scipy.io import savemat

    savemat(path, {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros((20, 1), object),
                             "CategoriesPresent": np.unique(mask[mask > 0]).astype(np.uint8)}})


def sbd_fixture(base: Path, n: int = 6, size=(44, 36), seed: int = 1) -> Path:
    """benchmark_RELEASE/dataset with img/*.jpg, cls/*.mat (class boxes painted into the image) and train.txt."""
    root = base / "benchmark_RELEASE" / "dataset"
    (root / "img").mkdir(parents=True)
    (root / "cls").mkdir()
    rng = np.random.default_rng(seed)
    ids = [f"2008_{i:06d}" for i in range(n)]
    for i in ids:
        img = rng.normal(128, 20, (size[1], size[0], 3))
        mask = np.zeros((size[1], size[0]), np.uint8)
        c = int(rng.integers(1, 21))
        y, x = int(rng.integers(0, size[1] // 2)), int(rng.integers(0, size[0] // 2))
        mask[y:y + size[1] // 2, x:x + size[0] // 2] = c
        img[mask == c] = (c * 12) % 255
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "img" / f"{i}.jpg", quality=95)
        write_sbd_mat(root / "cls" / f"{i}.mat", mask)
    (root / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def tiny(out, **kw) -> list[str]:
    sets = dict(out_dir=out, max_iter=2, iter_size=2, workers=0, progress="false", tensorboard="false",
                rescale="false", log_every=1, checkpoint_every=1, eval_every=0, device="cpu", val_split="val",
                vis_images=2, fc_dim=16)
    sets.update(kw)
    return [f"{k}={v}" for k, v in sets.items()]


def flags(items: list[str]) -> list[str]:
    return [x for kv in items for x in ("--set", kv)]


def run_cli(module, args: list[str]) -> int:
    mod = __import__(module, fromlist=["main"])
    return run_entry(mod.main, mod.get_args_parser(), args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("segdata")
    write_pretext_checkpoint(base / "c.pth")
    write_torchvision_alexnet(base / "alexnet.pth", fc_dim=16)
    return dict(voc=voc_fixture(base), sbd=sbd_fixture(base), ckpt=base / "c.pth", alexnet=base / "alexnet.pth")


# --------------------------------------------------------------------------------------------- FCN geometry
def _upsample_filt(size):
    """Transcription of fcn.berkeleyvision.org surgery.py upsample_filt."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.ogrid[:size, :size]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


@pytest.mark.parametrize("size", [4, 16, 63, 64])
def test_bilinear_kernel_is_surgery_upsample_filt(size):
    np.testing.assert_allclose(FC.bilinear_kernel(size).numpy(), _upsample_filt(size), rtol=0, atol=1e-7)


def test_crop_offsets_are_the_released_prototxts():
    # voc-fcn-alexnet/train.prototxt: upscore kernel 63 stride 32, crop offset 18 (conv1 pad 100, CaffeNet geometry)
    alex = alexnet_transfer_net("alexnet_cc", "L", "conv", 8, 100)
    assert FC.coord_offset(alex) == 13.0 and FC.upsample_geometry(alex) == (32, 63, 18)
    # voc-fcn32s/train.prototxt: upscore kernel 64 stride 32, crop offset 19 (VGG-16, conv1_1 pad 100)
    vgg = vgg16_transfer_net("rgb", "conv", 8, 100)
    assert FC.coord_offset(vgg) == 12.5 and FC.upsample_geometry(vgg) == (32, 64, 19)
    # torchvision's AlexNet (64 channels, conv1 padding replaced by 100): the same geometry, the same crop
    assert FC.upsample_geometry(alexnet_transfer_net("alexnet", "rgb", "conv", 8, 100)) == (32, 63, 18)
    # without the padding the output cannot cover the input: refused, not misaligned
    with pytest.raises(UserError, match="crop offset -82 < 0"):
        FC.upsample_geometry(alexnet_transfer_net("alexnet_cc", "L", "conv", 8, None))


def test_upsampling_maps_score_x_to_input_32x_plus_13():
    """A one-hot score at column x, upsampled and cropped, peaks at input column 32 x + 13 (Caffe's coord_map of
    voc-fcn-alexnet) and is the surgery kernel there; the frozen layer has no gradient."""
    up = FC.BilinearUpsample(21, 32, 63, 18)
    assert not up.weight.requires_grad
    score = torch.zeros(1, 21, 3, 9)
    score[0, 4, 1, 5] = 1.0
    y = up(score, (100, 300))
    assert y.shape == (1, 21, 100, 300)
    r, c = divmod(int(y[0, 4].argmax()), 300)
    assert (r, c) == (32 + 13, 32 * 5 + 13)
    assert torch.allclose(y[0, 4, r - 31:r + 32, c - 31:c + 32], FC.bilinear_kernel(63))
    with pytest.raises(ValueError, match="do not cover"):
        up(score, (100, 400))


@pytest.mark.parametrize("hw", [(17, 23), (40, 48), (67, 101)])
def test_fcn_output_is_the_input_size(hw, tmp_path):
    write_pretext_checkpoint(tmp_path / "c.pth")
    net = FC.fcn_backbone(str(tmp_path / "c.pth"), rescale=False)
    assert net.conv1[0].padding == (100, 100) and net.drop6.p == 0.5
    fcn = FC.FCN(net).eval()
    assert torch.count_nonzero(fcn.score.weight) == 0 and torch.count_nonzero(fcn.score.bias) == 0  # Caffe's default
    x = net.prepare(torch.rand(1, 3, *hw))
    out = fcn(x)
    assert out.shape == (1, 21, *hw) and torch.count_nonzero(out) == 0
    assert "upscore.weight" not in {n for n, p in fcn.named_parameters() if p.requires_grad}
    assert all(p is not fcn.upscore.weight for g in S.build_optimizer(fcn, S.SegConfig(voc="x", checkpoint="c"))
               .param_groups for p in g["params"])


def test_zhang_vgg_and_timm_through_the_same_builder(tmp_path):
    write_pretext_checkpoint(tmp_path / "z.pth", "zhang_vgg")
    fcn = FC.FCN(FC.fcn_backbone(str(tmp_path / "z.pth"), rescale=False)).eval()
    assert (fcn.upscore.stride, fcn.upscore.kernel, fcn.upscore.offset) == (8, 16, 8)
    assert fcn.backbone.conv1[0].padding == (1, 1)  # no fc6: no FCN padding
    with torch.no_grad():
        assert fcn(torch.rand(1, 1, 37, 29) * 100).shape == (1, 21, 37, 29)
    write_pretext_checkpoint(tmp_path / "t.pth", "timm:resnet18")
    fcn = FC.FCN(FC.fcn_backbone(str(tmp_path / "t.pth"), rescale=False, input="color")).eval()
    assert (fcn.upscore.stride, fcn.upscore.kernel, fcn.upscore.offset) == (32, 64, 32)
    with torch.no_grad():
        assert fcn(fcn.backbone.prepare(torch.rand(1, 3, 45, 70))).shape == (1, 21, 45, 70)


# --------------------------------------------------------------------------------------------- loss
def test_loss_is_softmax_normalised_by_valid_pixels():
    logits = torch.randn(1, 21, 3, 4, requires_grad=True)
    target = torch.tensor([[[0, 5, 255, 7], [255, 255, 20, 1], [3, 3, 3, 255]]])
    logp = torch.log_softmax(logits, 1)[0]
    valid = [(i, j) for i in range(3) for j in range(4) if target[0, i, j] != 255]
    by_hand = -sum(logp[target[0, i, j], i, j] for i, j in valid) / len(valid)
    loss = FC.seg_loss(logits, target)
    torch.testing.assert_close(loss, by_hand)
    void = FC.seg_loss(logits, torch.full_like(target, 255))
    void.backward()  # Caffe's normaliser is max(1, valid): an all-void image gives 0 and no gradient
    assert void.item() == 0 and torch.count_nonzero(logits.grad) == 0


# --------------------------------------------------------------------------------------------- scores
def test_confusion_and_scores_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 3]])
    hist = E.confusion(gt, pred, 4).numpy()
    assert hist.tolist() == [[1, 1, 0, 1], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]  # void pixel skipped
    s = E.scores(hist, ("a", "b", "c", "d"))
    # IoU: a 1/(3+2-1)=1/4, b 2/(2+3-2)=2/3, c 1/(2+1-1)=1/2, d 0/(0+1-0)=0 (predicted, absent from the truth)
    assert s["iou"] == pytest.approx({"a": 0.25, "b": 2 / 3, "c": 0.5, "d": 0.0})
    assert s["mIoU"] == pytest.approx((0.25 + 2 / 3 + 0.5 + 0) / 4)
    assert s["pixel_acc"] == pytest.approx(4 / 7)
    assert s["acc"]["d"] is None and s["mean_acc"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    assert s["fwIoU"] == pytest.approx(3 / 7 * 0.25 + 2 / 7 * 2 / 3 + 2 / 7 * 0.5)
    s = E.scores(E.confusion(np.array([0, 0, 1]), np.array([0, 0, 1]), 3).numpy(), ("a", "b", "c"))
    assert s["iou"]["c"] is None and s["mIoU"] == 1.0 and s["classes_scored"] == 2  # c absent from both: NaN
    with pytest.raises(UserError, match="every ground-truth pixel is void"):
        E.scores(np.zeros((3, 3)))


def _score_py(hist):
    """Transcription of fcn.berkeleyvision.org score.py do_seg_tests."""
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(hist).sum() / hist.sum()
        acc_cls = np.diag(hist) / hist.sum(1)
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    freq = hist.sum(1) / hist.sum()
    return acc, np.nanmean(acc_cls), np.nanmean(iu), (freq[freq > 0] * iu[freq > 0]).sum()


def _fast_hist(a, b, n):
    """Transcription of score.py fast_hist."""
    k = (a >= 0) & (a < n)
    return np.bincount(n * a[k].astype(int) + b[k], minlength=n ** 2).reshape(n, n)


def test_scores_equal_a_transcription_of_score_py():
    rng = np.random.default_rng(0)
    hist_ref, hist = np.zeros((21, 21)), torch.zeros(21, 21, dtype=torch.int64)
    for _ in range(5):
        gt = rng.choice(np.r_[np.arange(0, 21, 3), 255], size=(13, 17)).astype(np.uint8)
        pred = rng.integers(0, 21, size=(13, 17))
        hist_ref += _fast_hist(gt.flatten(), pred.flatten(), 21)
        hist += E.confusion(torch.from_numpy(gt), torch.from_numpy(pred))
    assert np.array_equal(hist.numpy(), hist_ref)
    acc, macc, miu, fw = _score_py(hist_ref)
    s = E.scores(hist)
    assert (s["pixel_acc"], s["mean_acc"], s["mIoU"], s["fwIoU"]) == pytest.approx((acc, macc, miu, fw), abs=1e-12)


def _png(path, arr, palette=True):
    im = Image.fromarray(np.asarray(arr, np.uint8), "P" if palette else "L")
    if palette:
        im.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def test_seg_eval_over_pngs_by_hand(tmp_path, capsys):
    gts = {"a": [[0, 0, 1, 1], [2, 2, 255, 0]], "b": [[1, 1], [0, 255]]}
    preds = {"a": [[0, 1, 1, 1], [2, 0, 2, 3]], "b": [[1, 0], [0, 3]]}
    for k in gts:
        _png(tmp_path / "gt" / "SegmentationClass" / f"{k}.png", gts[k])
        _png(tmp_path / "pred" / f"{k}.png", preds[k], palette=k == "a")
    # hist by hand: image a as in test_confusion_and_scores_by_hand, image b adds (1,1) (1,0) (0,0)
    hist = np.zeros((21, 21), np.int64)
    for (g, p) in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0), (0, 3), (1, 1), (1, 0), (0, 0)]:
        hist[g, p] += 1
    (tmp_path / "list.txt").write_text("a\nb\n")
    from pretext.cli import main as crosschannel

    rc = crosschannel(["transfer", "seg-eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                       "--list", str(tmp_path / "list.txt"), "-o", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]["pred"]
    assert np.array_equal(np.array(res["hist"]), hist) and res["images"] == 2
    acc, macc, miu, fw = _score_py(hist.astype(float))
    assert (res["pixel_acc"], res["mean_acc"], res["mIoU"], res["fwIoU"]) == pytest.approx((acc, macc, miu, fw))
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "iou_per_class.png").is_file()
    assert "2 images" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", r"pred/c.png: prediction missing for listed image c"),
    ("size", r"pred/a.png: mask is 3x2, its image is 4x2"),
    ("index", r"pred/a.png: class indices \[30\] outside 0..20 and 255"),
    ("void", r"pred/a.png: a prediction holds void \(255\) pixels"),
    ("gt_missing", r"gt/a.png: mask not found"),
])
def test_seg_eval_bad_input_is_one_line_naming_the_file(tmp_path, capsys, case, message):
    _png(tmp_path / "gt" / "a.png", [[0, 1, 1, 255], [2, 0, 0, 0]])
    pred = {"size": [[0, 1, 1], [0, 0, 0]], "index": [[0, 30, 1, 1], [0, 0, 0, 0]],
            "void": [[0, 255, 1, 1], [0, 0, 0, 0]]}.get(case, [[0, 1, 1, 1], [0, 0, 0, 0]])
    _png(tmp_path / "pred" / "a.png", pred)
    if case == "gt_missing":
        (tmp_path / "gt" / "a.png").unlink()
    lst = tmp_path / "l.txt"
    lst.write_text("a\nc\n" if case == "missing" else "a\n")
    rc = run_cli("transfer.seg_eval", ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--list",
                                        str(lst)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_seg11valid_is_shipped_as_released():
    path = E.resolve_list("seg11valid")
    assert hashlib.md5(path.read_bytes()).hexdigest() == SEG11VALID_MD5
    ids = path.read_text().split()
    assert len(ids) == len(set(ids)) == 736 and ids[0] == "2007_000033" and ids[-1] == "2011_003271"
    assert all(len(i) == 11 and i[4] == "_" for i in ids)


# --------------------------------------------------------------------------------------------- data
def test_sbd_reader_and_its_errors(tmp_path):
    m = (np.arange(12).reshape(3, 4) % 21).astype(np.uint8)
    write_sbd_mat(tmp_path / "ok.mat", m)
    assert np.array_equal(D.read_sbd_mask(tmp_path / "ok.mat", (4, 3)), m)
    from scipy.io import loadmat  # as torchvision's SBDataset reads it

    assert np.array_equal(loadmat(str(tmp_path / "ok.mat"))["GTcls"][0]["Segmentation"][0], m)
    with pytest.raises(UserError, match=r"ok.mat: mask is 4x3, its image is 5x3"):
        D.read_sbd_mask(tmp_path / "ok.mat", (5, 3))
    write_sbd_mat(tmp_path / "bad.mat", np.full((2, 2), 40, np.uint8))
    with pytest.raises(UserError, match=r"bad.mat: class indices \[40\] outside 0..20 and 255"):
        D.read_sbd_mask(tmp_path / "bad.mat")
    from scipy.io import savemat

    savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    with pytest.raises(UserError, match="other.mat: no GTcls.Segmentation"):
        D.read_sbd_mask(tmp_path / "other.mat")
    with pytest.raises(UserError, match="nope.mat: SBD mask not found"):
        D.read_sbd_mask(tmp_path / "nope.mat")
    root = sbd_fixture(tmp_path / "s", n=3)
    assert D.find_sbd_root(tmp_path / "s") == root and len(D.sbd_samples(tmp_path / "s", "train")) == 3
    (root / "cls" / "2008_000001.mat").unlink()
    with pytest.raises(UserError, match=r"cls/2008_000001.mat: SBD mask listed in split 'train' not found"):
        D.sbd_samples(root, "train")


def test_voc_lists_and_bad_masks(tmp_path):
    voc = voc_fixture(tmp_path, n=3)
    pairs, note = D.voc_samples(voc, "val")
    assert [p.stem for p, _ in pairs] == ["2011_000000", "2011_000001", "2011_000002"] and note.endswith("val.txt")
    assert len(D.voc_samples(voc, "all")[0]) == 3
    with pytest.raises(UserError, match=r"JPEGImages/2007_000033.jpg: image listed in split 'seg11valid' not found"):
        D.voc_samples(voc, "seg11valid")  # the shipped list, against this VOC folder
    (voc / "SegmentationClass" / "2011_000002.png").unlink()
    with pytest.raises(UserError, match=r"2011_000002.png: mask listed in split 'val' not found"):
        D.voc_samples(voc, "val")
    _png(voc / "SegmentationClass" / "2011_000002.png", np.zeros((5, 5)))  # wrong size
    ds = D.SegmentationData(D.voc_samples(voc, "val")[0])
    rgb, mask, i, err = ds[2]
    assert err.startswith("mask: ") and "2011_000002.png: mask is 5x5, its image is 48x40" in err
    assert (mask == VOID).all() and rgb.shape == (3, 64, 64)  # the stand-in keeps the processes in step
    assert ds[0][3] == "" and ds[0][0].shape == (3, 40, 48) and ds[0][1].dtype == torch.int64
    # VOC2012 train_aug: its list in ImageSets/Segmentation, its masks in SegmentationClassAug/
    (voc / "SegmentationClassAug").mkdir()
    _png(voc / "SegmentationClassAug" / "2011_000001.png", np.ones((40, 48)))
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2011_000001\n")
    cfg = load_config(S.SegConfig, None, [f"voc={voc}", "train_data=voc", "train_split=train_aug", "checkpoint=c"])
    pairs, _ = D.voc_samples(voc, cfg.train_split, S.train_masks_dir(cfg))
    assert [m.parent.name for _, m in pairs] == ["SegmentationClassAug"]
    assert (D.SegmentationData(pairs)[0][1] == 1).all()


def test_draw_stream_is_split_over_processes_and_resumable():
    n, seed = 7, 3
    s1 = D.DrawSampler(n, 4, 0, 1, seed, "random")
    s1.set_range(0, 5)
    single = list(s1)
    parts = []
    for r in range(2):
        s = D.DrawSampler(n, 4, r, 2, seed, "random")
        s.set_range(0, 5)
        parts.append(list(s))
    merged = [parts[j % 2][(it * 2) + j // 2] for it in range(5) for j in range(4)]
    assert merged == single
    s1.set_range(3, 5)
    assert list(s1) == single[12:]  # resuming at update 3 draws what an uninterrupted run draws
    assert len(set(single)) < len(single)  # with replacement (20 draws of 7 images)
    e = D.DrawSampler(n, 7, 0, 1, seed, "epoch")
    e.set_range(0, 2)
    draws = list(e)
    assert sorted(draws[:7]) == list(range(7)) and sorted(draws[7:]) == list(range(7)) and draws[:7] != draws[7:]


def test_config_limits_and_combinations(tmp_path):
    with pytest.raises(UserError, match="iter_size': must be >= 1"):
        load_config(S.SegConfig, None, ["iter_size=0", "voc=v", "checkpoint=c"])
    with pytest.raises(UserError, match="lr': must be > 0"):
        load_config(S.SegConfig, None, ["lr=-1", "voc=v", "checkpoint=c"])
    with pytest.raises(UserError, match="rows': must be one of"):
        load_config(S.SegConfig, None, ["rows=colorization,imagenet", "voc=v", "checkpoint=c"])
    with pytest.raises(UserError, match="train_data=sbd needs"):
        load_config(S.SegConfig, None, ["voc=v", "checkpoint=c"])
    with pytest.raises(UserError, match="needs a pretext checkpoint"):
        load_config(S.SegConfig, None, ["voc=v", "train_data=voc"])
    with pytest.raises(UserError, match="lr_milestones must be increasing"):
        load_config(S.SegConfig, None, ["voc=v", "train_data=voc", "checkpoint=c", "lr_milestones=[5,3]"])
    cfg = load_config(S.SegConfig, REPO / "configs" / "transfer" / "seg_fcn32s_alexnet_cc_gray_sbd.yaml",
                      ["voc=v", "sbd=s", "checkpoint=c"])
    assert (cfg.iter_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.max_iter) == (20, 1e-4, 0.9, 5e-4, 100_000)
    os.environ["WORLD_SIZE"] = "3"
    try:
        with pytest.raises(UserError, match="iter_size 20 .* not divisible by the 3 processes"):
            S.run(cfg)
    finally:
        del os.environ["WORLD_SIZE"]


def test_published_rows_are_read_by_the_report():
    assert E.published_mIoU("zhang_alexnet_cc", "gray") == 35.0
    assert E.published_mIoU("zhang_alexnet_cc", "color") == 35.6
    assert E.published_mIoU("imagenet_supervised", "color") == 48.0
    assert E.published_mIoU("gaussian", "gray") is None


def test_engine_mmseg_without_the_extra_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from transfer import mmseg_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] in
                        ("mmseg", "mmcv", "mmengine") else real(name, *a))
    cfg = load_config(S.SegConfig, None, ["voc=v", "sbd=s", "checkpoint=c", "engine=mmseg",
                                          f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(UserError, match=r"--engine mmseg needs mmcv, mmengine, mmseg: pip install 'crosschannel\[seg\]'"):
        S.run(cfg)
    assert not (tmp_path / "o").exists() and "seg]" in mmseg_engine.INSTALL


# --------------------------------------------------------------------------------------------- end to end
def test_end_to_end_sbd_to_voc_three_rows(data, tmp_path):
    out = tmp_path / "run"
    rc = run_cli("transfer.segmentation", ["--sbd", str(data["sbd"]), "--voc", str(data["voc"]), "--checkpoint",
                                           str(data["ckpt"]), *flags(tiny(out, rows="colorization,random,supervised",
                                           supervised=f"alexnet:{data['alexnet']}", eval_every=1, tensorboard="true"))])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["runs"]) == {"colorization", "random", "supervised"}
    md = (out / "results.md").read_text()
    assert "| colorization |" in md and "35.0" in md  # the published grey number beside ours
    for row, r in summary["runs"].items():
        d = out / row
        assert r["iterations"] == 2 and r["images"] == 6 and r["num_train"] == 6 and r["engine"] == "native"
        assert r["mIoU"] == pytest.approx(E.scores(np.array(r["hist"]))["mIoU"])
        assert (d / "predictions.png").is_file() and (d / "iou_per_class.png").is_file()
        assert list((d / "tensorboard").glob("events.out.tfevents.*"))
        recs = [json.loads(ln) for ln in (d / "log.jsonl").read_text().splitlines()]
        assert [x["iter"] for x in recs if x["kind"] == "train"] == [1, 2]
        assert [x["iter"] for x in recs if x["kind"] == "eval"] == [1, 2]
        # the stand-alone scorer over the saved predictions gives the trainer's numbers
        hist, ids = E.score_folders(d / "predictions", data["voc"], str(data["voc"] / "ImageSets/Segmentation/val.txt"))
        assert np.array_equal(hist, np.array(r["hist"])) and len(ids) == 6
        ck = load_checkpoint(d / "checkpoint.pth")
        assert ck["iter"] == 2 and ck["spec"]["conv1_padding"] == 100
        assert torch.equal(ck["model"]["upscore.weight"][0, 0], FC.bilinear_kernel(63))  # frozen
    assert summary["runs"]["supervised"]["backbone"]["input_kind"] == "grey"
    assert summary["runs"]["colorization"]["upsampling"] == {"stride": 32, "kernel": 63, "offset": 18}
    # a finished folder is never overwritten; --resume keeps finished rows
    with pytest.raises(UserError, match="checkpoint.pth exists: pass --resume"):
        S.run(load_config(S.SegConfig, None, ["sbd=" + str(data["sbd"]), "voc=" + str(data["voc"]),
                                              "checkpoint=" + str(data["ckpt"]), *tiny(out)]))


def test_colour_input_rescaled_trains_the_ab_weights_on_voc_train(data, tmp_path):
    out = tmp_path / "run"
    rc = run_cli("transfer.segmentation", ["--voc", str(data["voc"]), "--checkpoint", str(data["ckpt"]),
                                           *flags(tiny(out, train_data="voc", train_split="train", input="color",
                                                       lr=0.01, rescale="true", init_images=3))])
    assert rc == 0
    r = json.loads((out / "colorization" / "results.json").read_text())
    assert r["num_train"] == 3 and r["backbone"]["input_kind"] == "Lab" and r["published_mIoU"] == 35.6
    assert r["backbone"]["rescale"]["images"] == 3 and len(r["backbone"]["rescale"]["ratios"]) > 0  # the release's
    w = load_checkpoint(out / "colorization" / "checkpoint.pth")["model"]["backbone.conv1.0.weight"]
    assert w.shape[1] == 3 and w[:, 1:].abs().sum() > 0  # ab weights started at zero and learned


def test_bad_training_mask_is_one_line_naming_the_file(data, tmp_path, capsys):
    sbd = sbd_fixture(tmp_path / "s", n=2)
    write_sbd_mat(sbd / "cls" / "2008_000001.mat", np.zeros((5, 5), np.uint8))
    rc = run_cli("transfer.segmentation", ["--sbd", str(sbd), "--voc", str(data["voc"]), "--checkpoint",
                                           str(data["ckpt"]), *flags(tiny(tmp_path / "run", sampling="epoch"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].endswith("2008_000001.mat: mask is 5x5, its image is 44x36"), err[-1]


def test_run_folder_lock(data, tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    try:
        with pytest.raises(UserError, match="is in use by another run"):
            S.run(load_config(S.SegConfig, None, ["sbd=" + str(data["sbd"]), "voc=" + str(data["voc"]),
                                                  "checkpoint=" + str(data["ckpt"]), *tiny(out)]))
    finally:
        lock.release()


def test_voc_sample_end_to_end(shared_data, tmp_path):
    """The 3 real VOC2011 images of ../shared/data (no split files): train and evaluate on all of them."""
    voc = shared_data / "voc_sample" / "semantic_segmentation"
    write_pretext_checkpoint(tmp_path / "c.pth")
    rc = run_cli("transfer.segmentation", ["--voc", str(voc), "--checkpoint", str(tmp_path / "c.pth"),
                                           *flags(tiny(tmp_path / "run", train_data="voc", train_split="all",
                                                       val_split="all", max_iter=1))])
    assert rc == 0
    r = json.loads((tmp_path / "run" / "colorization" / "results.json").read_text())
    assert r["images"] == 3 and r["data"]["overlap"] == 3 and r["pixels"] > 0.8 * 3 * 500 * 340
    assert sorted(p.stem for p in (tmp_path / "run" / "colorization" / "predictions").glob("*.png")) == \
        ["2011_000003", "2011_000006", "2011_000025"]


def _subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_exact(data, tmp_path):
    """A real subprocess gets SIGTERM mid-run: it finishes the update, writes a checkpoint, exits 143 with a line
    saying how to resume; --resume then ends with the weights of an uninterrupted run."""
    base = [sys.executable, "-m", "transfer.segmentation", "--sbd", str(data["sbd"]), "--voc", str(data["voc"]),
            "--checkpoint", str(data["ckpt"])]
    ref = tmp_path / "ref"
    sets = dict(max_iter=4, checkpoint_every=100)
    assert subprocess.run(base + flags(tiny(ref, **sets)), env=_subprocess_env(), capture_output=True).returncode == 0
    out = tmp_path / "run"
    proc = subprocess.Popen(base + flags(tiny(out, **sets)), env=_subprocess_env(), stderr=subprocess.PIPE, text=True)
    log = out / "colorization" / "log.jsonl"
    t0 = time.time()
    while not (log.is_file() and log.read_text().strip()) and time.time() - t0 < 300:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM received" in err and "--resume" in err.strip().splitlines()[-1]
    stopped = load_checkpoint(out / "colorization" / "checkpoint.pth")["iter"]
    assert 1 <= stopped < 4 and not (out / "colorization" / "results.json").exists()
    res = subprocess.run(base + flags(tiny(out, **sets)) + ["--resume"], env=_subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_checkpoint(ref / "colorization" / "checkpoint.pth")["model"]
    b = load_checkpoint(out / "colorization" / "checkpoint.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(ln) for ln in (out / "colorization" / "log.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in recs if x["kind"] == "train"] == [1, 2, 3, 4]  # no step logged twice
    # a changed protocol is refused on resume unless allowed (and then recorded)
    sets = ["sbd=" + str(data["sbd"]), "voc=" + str(data["voc"]), "checkpoint=" + str(data["ckpt"])]
    os.remove(out / "colorization" / "results.json")
    with pytest.raises(UserError, match=r"resuming with a changed config \(lr: 0.0001 -> 0.1\)"):
        S.run(load_config(S.SegConfig, None, sets + tiny(out, max_iter=5, lr=0.1)), resume="auto")
    assert S.run(load_config(S.SegConfig, None, sets + tiny(out, max_iter=5, lr=0.1)), resume="auto",
                 allow_change=True) == 0
    assert "lr" in (out / "colorization" / "config_history.jsonl").read_text()


@pytest.mark.slow
def test_ddp_two_processes_equal_one(data, tmp_path):
    """gloo, 2 processes, iter_size 2 (one image each per update) == one process with iter_size 2 (dropout off)."""
    base = [sys.executable, "-m", "transfer.segmentation", "--sbd", str(data["sbd"]), "--voc", str(data["voc"]),
            "--checkpoint", str(data["ckpt"])]
    sets = dict(dropout=0.0, max_iter=2)
    one = subprocess.run(base + flags(tiny(tmp_path / "one", **sets)), env=_subprocess_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "transfer.segmentation"] + base[3:] + flags(tiny(tmp_path / "two", **sets)),
                         env=_subprocess_env(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "colorization" / "checkpoint.pth")["model"]
    b = load_checkpoint(tmp_path / "two" / "colorization" / "checkpoint.pth")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    ra = json.loads((tmp_path / "one" / "colorization" / "results.json").read_text())
    rb = json.loads((tmp_path / "two" / "colorization" / "results.json").read_text())
    assert ra["hist"] == rb["hist"] and ra["images"] == rb["images"] == 6
