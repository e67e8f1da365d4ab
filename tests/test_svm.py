"""linear_probe.svm against a transcription of Goyal et al.'s released procedure
(facebookresearch/fair_self_supervision_benchmark: tools/svm/svm_helper.py, train_svm_kfold.py, test_svm.py) on
small synthetic feature sets, and end to end on a fixture VOCdevkit (with unreadable JPEGs and loader workers)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linear_probe import svm
from linear_probe.encoder import build_encoder
from linear_probe.heads import TapPools
from linear_probe.svm import GOYAL_COSTS, GOYAL_POOLING, SVMConfig, goyal_ap, normalize_features, resize_whole, train_class
from pretext.runtime import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TINY = ["--random-init", "alexnet_cc", "--set", "model_kwargs.fc_dim=8", "--set", "crop=67", "--set", "resize=72",
        "--set", "progress=false", "--set", "device=cpu", "--set", "batch_size=4", "--set", "taps=[conv2]",
        "--set", "pool=avg"]


# --------------------------------------------------------------------------------------------- transcription
def their_costs(costs: str) -> list[float]:
    """svm_helper.parse_cost_list: the comma-separated costs, then 0.5 ** num for num in range(4, 20)."""
    out = [float(c) for c in costs.split(",")]
    for num in range(4, 20):
        out.append(0.5 ** num)
    return out


# GETTING_STARTED.md, "Benchmark task 3": the costs given to train_svm_kfold.py / test_svm.py
THEIR_COST_ARG = "0.0000001,0.000001,0.00001,0.0001,0.001,0.01,0.1,1.0,10.0,100.0"


def their_calculate_ap(rec, prec):
    """svm_helper.calculate_ap, transcribed (a loop from the right, then a sum over the recall steps)."""
    rec, prec = rec.reshape(rec.size, 1), prec.reshape(prec.size, 1)
    z, o = np.zeros((1, 1)), np.ones((1, 1))
    mrec, mpre = np.vstack((z, rec, o)), np.vstack((z, prec, z))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    indices = np.where(mrec[1:] != mrec[0:-1])[0] + 1
    ap = 0
    for i in indices:
        ap = ap + (mrec[i] - mrec[i - 1]) * mpre[i]
    return float(np.asarray(ap).reshape(-1)[0])


def their_precision_recall_ap(targets, preds):
    """svm_helper.get_precision_recall, transcribed: binarise, rank by argsort reversed, P / R, calculate_ap."""
    targets = np.array(targets > 0, dtype=np.float32)
    tog = np.hstack((targets[:, np.newaxis].astype(np.float64), preds[:, np.newaxis].astype(np.float64)))
    ind = np.argsort(preds)[::-1]
    sortcounts = np.array([tog[i, 0] for i in ind])
    tp = sortcounts
    fp = sortcounts.copy()
    for i in range(sortcounts.shape[0]):
        fp[i] = 0.0 if sortcounts[i] >= 1 else 1.0
    P = np.cumsum(tp) / (np.cumsum(tp) + np.cumsum(fp))
    R = np.cumsum(tp) / np.sum(targets)
    return their_calculate_ap(R, P)


def their_procedure(features, targets, test_features, test_targets, costs, seed):
    """train_svm_kfold.train_svm + test_svm.get_chosen_costs / test_svm, transcribed for in-memory arrays.

    ``targets`` use their encoding (extra_scripts/create_voc_data_files.py): 1 present, 0 absent, -1 difficult.
    Their LinearSVC has no random_state; here both sides use ``seed`` so that the comparison is exact.
    """
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import LinearSVC

    features = features / (np.linalg.norm(features, axis=1) + 1e-5)[:, np.newaxis]
    test_features = test_features / (np.linalg.norm(test_features, axis=1) + 1e-5)[:, np.newaxis]
    out = []
    for cls in range(targets.shape[1]):
        cv_ap, models = [], []
        for cost in costs:
            clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, verbose=0, penalty="l2",
                            loss="squared_hinge", tol=0.0001, dual=True, max_iter=2000, random_state=seed)
            cls_labels = targets[:, cls].astype(dtype=np.int32, copy=True)
            cls_labels[np.where(cls_labels == 0)] = -1
            ap_scores = cross_val_score(clf, features, cls_labels, cv=3, scoring="average_precision")
            clf.fit(features, cls_labels)
            cv_ap.append(ap_scores.mean())
            models.append(clf)
        best = int(np.argmax(np.array(cv_ap)))
        prediction = models[best].decision_function(test_features)
        keep = test_targets[:, cls] != -1
        labels = test_targets[keep, cls].copy()
        labels[np.where(labels == 0)] = -1
        out.append((costs[best], their_precision_recall_ap(labels, prediction[keep]), cv_ap))
    return out


def _synthetic(n, d=12, classes=3, seed=0):
    """Features with a class signal and labels in crosschannel's encoding (1, 0 difficult-only, -1)."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, classes)) < 0.35
    X = rng.normal(0, 1, (n, d)) + 1.5 * y @ rng.normal(0, 1, (classes, d))
    lab = np.where(y, 1, -1).astype(np.int8)
    lab[rng.random((n, classes)) < 0.08] = 0  # difficult-only
    return X.astype(np.float32), lab


def _theirs(lab):
    """crosschannel's labels (1 / 0 difficult / -1) -> theirs (1 / -1 difficult / 0)."""
    return np.select([lab == 1, lab == 0], [1, -1], 0)


def test_costs_are_theirs():
    assert GOYAL_COSTS == their_costs(THEIR_COST_ARG) and len(GOYAL_COSTS) == 26
    cfg = load_config(SVMConfig, ROOT / "configs" / "svm" / "voc07_alexnet_cc.yaml")
    assert list(cfg.costs) == GOYAL_COSTS and list(SVMConfig().costs) == GOYAL_COSTS
    assert cfg.cv_folds == 3 and cfg.pos_weight == 2.0 and cfg.ap == "goyal" and cfg.dual == "true"
    assert cfg.max_iter == 2000 and cfg.tol == 1e-4 and cfg.resize_mode == "whole" and cfg.crop == 227
    assert {t: list(v) for t, v in cfg.pool_kernels.items()} == GOYAL_POOLING and list(cfg.taps) == list(GOYAL_POOLING)


def test_train_class_equals_their_procedure():
    """Same chosen cost, same cross-validated APs and same test AP as the transcription, class by class."""
    X, lab = _synthetic(60)
    Xt, lab_t = _synthetic(40, seed=1)
    cfg = SVMConfig(seed=0)
    theirs = their_procedure(X.astype(np.float64), _theirs(lab), Xt.astype(np.float64), _theirs(lab_t), GOYAL_COSTS, 0)
    Xn, Xtn = normalize_features(X), normalize_features(Xt)
    for c, (cost, ap, cv) in enumerate(theirs):
        r = train_class(Xn, lab[:, c], Xtn, lab_t[:, c], cfg)
        assert r["cost"] == cost
        assert [r["cv_ap"][repr(k)] for k in GOYAL_COSTS] == pytest.approx(cv, abs=1e-12)
        assert r["ap"] == pytest.approx(ap, abs=1e-12)
        assert r["n_difficult_test"] == int((lab_t[:, c] == 0).sum())
    assert len({r for r, _, _ in theirs}) >= 1


def test_cost_ties_go_to_the_first_in_their_list():
    """Separable data: many costs reach the same CV AP; theirs (np.argmax) and ours take the first in list order."""
    rng = np.random.default_rng(7)
    y = np.where(np.arange(45) % 3 == 0, 1, -1)
    X = rng.normal(0, 1, (45, 8))
    X[:, 0] += 4 * y
    lab = y[:, None].astype(np.int8)
    theirs = their_procedure(X, _theirs(lab), X, _theirs(lab), GOYAL_COSTS, 0)
    cost, ap, cv = theirs[0]
    assert sum(v == max(cv) for v in cv) >= 2  # a tie to break
    r = train_class(normalize_features(X), lab[:, 0], normalize_features(X), lab[:, 0], SVMConfig())
    assert r["cost"] == cost == GOYAL_COSTS[int(np.argmax(cv))] and r["ap"] == pytest.approx(ap)


def test_goyal_ap_equals_their_ap_with_ties():
    rng = np.random.default_rng(3)
    for trial in range(200):
        n = int(rng.integers(2, 30))
        labels = np.where(rng.random(n) < 0.4, 1, -1)
        labels[rng.integers(n)] = 1
        scores = rng.integers(0, 5, n).astype(float) if trial % 2 else rng.normal(size=n)  # ties in half the trials
        assert goyal_ap(scores, labels) == pytest.approx(their_precision_recall_ap(labels, scores), abs=1e-12)
    assert goyal_ap([3, 2, 1], [1, -1, 1]) == pytest.approx((1 + 2 / 3) / 2)  # by hand: P = 1, 1/2, 2/3


def test_train_class_edge_cases():
    X, lab = _synthetic(30)
    Xn = normalize_features(X)
    none = train_class(Xn, -np.ones(30, int), Xn, lab[:, 0], SVMConfig())
    assert np.isnan(none["ap"]) and "no positives" in none["note"]
    few = lab[:, 0].copy()
    few[:] = -1
    few[:2] = 1  # two positives: no 3-fold CV
    r = train_class(Xn, few, Xn, lab[:, 0], SVMConfig())
    assert r["cv_ap"] is None and "without CV" in r["note"] and r["cost"] == GOYAL_COSTS[13]
    assert np.allclose(np.linalg.norm(Xn, axis=1), np.linalg.norm(X, axis=1) / (np.linalg.norm(X, axis=1) + 1e-5))


def test_goyal_pooling_shapes_at_227():
    """Their fixed kernels on the transfer AlexNet at 227: conv1 10x10x96, conv2 6x6x256, conv3/4 5x5x384, conv5 6x6x256."""
    enc, _ = build_encoder(list(GOYAL_POOLING), random_init="alexnet_cc", model_kwargs={"fc_dim": 8})
    p = TapPools(enc.tap_shapes(227), "fixed", kernels=GOYAL_POOLING)
    out = {t: d["out"] for t, d in p.describe().items()}
    assert out == {"conv1": [96, 10, 10], "conv2": [256, 6, 6], "conv3": [384, 5, 5], "conv4": [384, 5, 5],
                   "conv5": [256, 6, 6]}
    x = enc(torch.rand(1, 3, 227, 227))
    assert torch.allclose(p(x)["conv1"], torch.nn.functional.avg_pool2d(x["conv1"], 19, 4).flatten(1))


def test_resize_whole_keeps_the_whole_image():
    """Shorter side to 256, then the whole image to 227x227: nothing is cropped away."""
    img = torch.zeros(3, 200, 500)
    img[:, :, :20] = 1.0  # a bright band at the left edge (a 227 centre crop of a 256-high resize would lose it)
    out = resize_whole(img)
    assert out.shape == (3, 227, 227)
    assert out[:, :, :5].mean() > 0.9 and out[:, :, 20:].max() < 1e-6
    assert torch.allclose(resize_whole(torch.full((3, 300, 256), 0.25)), torch.full((3, 227, 227), 0.25))


# --------------------------------------------------------------------------------------------- end to end
def write_devkit(base: Path, images: dict, splits: dict, size=(80, 64), seed=0) -> Path:
    """A VOCdevkit/VOC2007 tree: ``images`` id -> [(class, difficult '0'/'1')], ``splits`` name -> ids."""
    root = base / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = sorted({n for objs in images.values() for n, _ in objs})
    for i, objs in images.items():
        img = rng.normal(128, 20, (size[1], size[0], 3))
        for n, _ in objs:
            k = classes.index(n)
            img[:, 8 * k:8 * k + 8] = 240 if k % 2 else 20
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        objs_xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objs)
        (root / "Annotations" / f"{i}.xml").write_text(f"<annotation>{objs_xml}</annotation>")
    for name, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return base / "VOCdevkit"


@pytest.fixture(scope="module")
def devkit(tmp_path_factory):
    names = ("cat", "dog", "person")
    imgs = {}
    for i in range(30):
        objs = [(names[i % 3], "0")]
        if i % 5 == 0:
            objs.append((names[(i + 1) % 3], "1"))  # difficult-only instances of another class
        imgs[f"{i:06d}"] = objs
    ids = sorted(imgs)
    return write_devkit(tmp_path_factory.mktemp("voc"), imgs, {"trainval": ids[:18], "test": ids[18:]})


def test_svm_end_to_end_with_unreadable_images_and_workers(devkit, tmp_path):
    """A truncated JPEG and a non-image in trainval, read by 2 loader workers: skipped and counted, the run goes on."""
    jpg = devkit / "VOC2007" / "JPEGImages"
    data = (jpg / "000001.jpg").read_bytes()
    (jpg / "000001.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    (jpg / "000002.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    argv = [*TINY, "--set", f"data={devkit}", "--set", "classes=[cat,dog,person]", "--set", "workers=2",
            "--set", "costs=[0.1,1.0,10.0]", "--set", f"out_dir={out}"]
    assert svm.main(svm.get_args_parser().parse_args(argv)) == 0
    res = json.loads((out / "results.json").read_text())
    skipped = res["skipped_unreadable"]
    assert len(skipped["train"]) == 2 and skipped["test"] == [] and res["num_train"] == 16 and res["num_test"] == 12
    assert any("000001.jpg" in s for s in skipped["train"]) and any("2 unreadable" in n for n in res["notes"])
    tap = res["taps"]["conv2"]
    assert tap["shape"] == [256, 7, 7] and tap["pooled_shape"] == [256, 4, 4] and tap["pooling"]["kernel"] == 2
    assert tap["num_evaluated"] == 3 and 0 <= tap["mAP"] <= 1
    assert tap["mAP"] == pytest.approx(np.mean([r["ap"] for r in tap["classes"].values()]))
    assert all(r["cost"] in (0.1, 1.0, 10.0) for r in tap["classes"].values())
    md = (out / "results.md").read_text()
    assert "| conv2 | 256x7x7 | avg k2/s2 ceil | 4x4x256 | 4096 |" in md and "Published figures" in md
    assert res["published"] == svm.published_rows()


@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
def test_svm_on_shared_voc_sample(tmp_path):
    argv = [*TINY, "--set", f"data={SHARED / 'voc_sample' / 'bbox_detection'}", "--set", "fallback_split=all",
            "--set", "workers=0", "--set", f"out_dir={tmp_path}"]
    assert svm.main(svm.get_args_parser().parse_args(argv)) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_train"] == res["num_test"] == 3 and any("train = test" in n for n in res["notes"])
    classes = res["taps"]["conv2"]["classes"]
    assert classes["person"]["ap"] is not None and classes["cat"]["ap"] is None
