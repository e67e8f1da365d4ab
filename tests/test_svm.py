"""linear_probe.svm: per-class LinearSVC with cross-validated cost, on synthetic features, a fixture VOCdevkit
written by tests/test_voc.py's helper, and ../shared/data/voc_sample."""
import json
from pathlib import Path

import numpy as np
import pytest
from test_voc import SHARED, write_vocdevkit

from linear_probe import svm
from linear_probe.svm import SVMConfig, l2_normalize, train_class
from pretext.runtime import load_config

TINY = ["--random-init", "alexnet_cc", "--set", "model_kwargs.fc_dim=8", "--set", "crop=67", "--set", "resize=72",
        "--set", "workers=0", "--set", "progress=false", "--set", "device=cpu", "--set", "batch_size=8"]


def _blobs(n, d=16, seed=0):
    rng = np.random.default_rng(seed)
    y = np.where(np.arange(n) % 3 == 0, 1, -1)
    X = rng.normal(0, 1, (n, d))
    X[:, 0] += 3 * y  # separable along the first axis
    return l2_normalize(X), y


def test_train_class_separable_and_difficult():
    X, y = _blobs(30)
    Xt, yt = _blobs(12, seed=1)
    lab = y.copy()
    lab[1] = 0  # a difficult-only image in training: a negative
    yt = yt.copy()
    yt[1] = 0  # in test: excluded from the AP
    cfg = SVMConfig(costs=[0.01, 1.0], cv_folds=3)
    r = train_class(X, lab, Xt, yt, cfg)
    assert r["ap"] == pytest.approx(1.0) and r["cost"] in (0.01, 1.0) and set(r["cv_ap"]) == {"0.01", "1.0"}
    assert r["n_pos_train"] == 10 and r["n_difficult_test"] == 1
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0)
    none = train_class(X, -np.ones(30, int), Xt, yt, cfg)
    assert np.isnan(none["ap"]) and "no positives" in none["note"]
    r_area = train_class(X, lab, Xt, yt, SVMConfig(costs=[1.0], ap="area"))
    assert r_area["ap"] == pytest.approx(1.0)


def test_svm_on_fixture_vocdevkit(tmp_path):
    rng = np.random.default_rng(0)
    names = ("cat", "dog", "person")
    imgs = {}
    for i in range(24):
        objs = [(names[i % 3], "0")]
        if i % 5 == 0:
            objs.append((names[(i + 1) % 3], "1"))  # difficult-only instances of another class
        imgs[f"{i:06d}"] = objs
    ids = list(imgs)
    rng.shuffle(ids)
    devkit = write_vocdevkit(tmp_path, imgs, {"trainval": sorted(ids[:15]), "test": sorted(ids[15:])})
    for ap in ("area",):  # both AP definitions are checked by hand in test_voc.py
        out = tmp_path / f"out_{ap}"
        argv = [*TINY, "--set", f"data={devkit}", "--set", "classes=[cat,dog,person]", "--set", "tap=conv2",
                "--set", "costs=[0.1,1.0,10.0]", "--set", f"ap={ap}", "--set", f"out_dir={out}"]
        assert svm.main(svm.get_args_parser().parse_args(argv)) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["ap_type"] == ap and res["dims"] == 6 * 6 * 256 and res["num_train"] == 15 and res["num_test"] == 9
        assert res["num_evaluated"] == 3 and 0 <= res["mAP"] <= 1
        assert res["mAP"] == pytest.approx(np.mean([r["ap"] for r in res["classes"].values()]))
        assert all(r["cost"] in (0.1, 1.0, 10.0) for r in res["classes"].values())
        assert "| **mAP** (3 classes) |" in (out / "results.md").read_text()


@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
def test_svm_on_shared_voc_sample(tmp_path):
    argv = [*TINY, "--set", f"data={SHARED / 'voc_sample' / 'bbox_detection'}", "--set", "fallback_split=all",
            "--set", f"out_dir={tmp_path}"]
    assert svm.main(svm.get_args_parser().parse_args(argv)) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_train"] == res["num_test"] == 3 and any("train = test" in n for n in res["notes"])
    assert res["classes"]["person"]["ap"] is not None and res["classes"]["cat"]["ap"] is None
    assert res["num_evaluated"] >= 1 and res["mAP"] is not None


def test_svm_config_loads():
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(SVMConfig, root / "configs" / "svm" / "voc07_alexnet_cc_conv5.yaml")
    assert cfg.tap == "conv5" and cfg.cv_folds == 3 and cfg.pos_weight == 2.0 and cfg.ap == "area"
