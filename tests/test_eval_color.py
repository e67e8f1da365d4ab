"""``crosschannel eval-color`` on real photos: report files, baselines, prior sources, classifier column."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pretext.color import rgb_to_lab
from pretext.data import pil_to_tensor, read_image
from pretext.encoding import load_bins
from pretext.eval_color import evaluate, folder_labels, get_args_parser, main
from pretext.metrics import ab_auc
from pretext.models import create_model
from pretext.runtime import run_entry

SIZE, EVAL = 64, 96


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("alexnet_cc", fc_dim=64).eval()


@pytest.fixture(scope="module")
def photos(shared_data):
    return sorted((shared_data / "photos" / "skimage").glob("*.jpg"))[:4]


def _lab_at(path, eval_size):
    img = read_image(path, min_size=eval_size)  # eval-color's decoding (JPEG draft scale, shorter side >= eval_size)
    s = eval_size / min(img.size)
    if s < 1:
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
    return rgb_to_lab(pil_to_tensor(img))


def _load_json(path: Path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))


def test_evaluate_report(tiny, photos, tmp_path, shared_data):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    paths = photos + [bad, shared_data / "legacy_bw" / "coins.png"]
    r = evaluate(tiny, "ab313", load_bins(), paths, None, size=SIZE, out_dir=tmp_path / "rep", eval_size=EVAL, batch_size=3)
    assert r["num_images"] == len(photos)
    assert len(r["failed"]) == 1 and "broken.jpg" in r["failed"][0]
    assert len(r["skipped_grey"]) == 1 and "computed from the evaluated images" in r["prior_source"]
    for m in ("model", "gray", "random"):
        for k in ("auc", "auc_rebal", "psnr", "rmse"):
            assert math.isfinite(r[m][k]), (m, k)
        assert 0 < r[m]["auc"] <= 100 and len(r[m]["cmf"]) == 151
    # the gray baseline of every image equals the hand computation (ab = 0 against the ground truth)
    for im in r["images"]:
        lab = _lab_at(im["path"], EVAL)
        assert im["gray"]["auc"] == pytest.approx(ab_auc(torch.zeros_like(lab[1:]), lab[1:]), abs=1e-6)
    # the dataset AuC is the mean of the per-image ones (each image weighs the same)
    assert r["gray"]["auc"] == pytest.approx(sum(im["gray"]["auc"] for im in r["images"]) / len(photos), abs=1e-6)
    # random baseline = ab of the previous image in a derangement: never the image's own ab
    assert all(im["random"] is not None for im in r["images"])
    for name in ("report.json", "report.md", "cmf.png", "best_worst.png"):
        assert (tmp_path / "rep" / name).is_file()
    js = _load_json(tmp_path / "rep" / "report.json")
    assert js["ground_truth"]["psnr"] == "inf" and js["num_images"] == len(photos)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| Gray (ab = 0) |" in md and "| Random" in md and "AuC rebal" in md
    # a prior given explicitly is used and named
    r2 = evaluate(tiny, "ab313", load_bins(), photos[:2], torch.full((313,), 1 / 313), size=SIZE, eval_size=EVAL,
                  prior_source="uniform")
    assert r2["prior_source"] == "uniform"
    assert r2["model"]["auc_rebal"] == pytest.approx(r2["model"]["auc"], abs=1e-6)  # uniform prior: no reweighting


def test_random_baseline_by_hand(tiny, photos):
    a, b = photos[:2]
    r = evaluate(tiny, "ab313", load_bins(), [a, b], None, size=SIZE, eval_size=EVAL)
    la, lb = _lab_at(a, EVAL), _lab_at(b, EVAL)
    b_on_a = F.interpolate(lb[None, 1:], size=la.shape[-2:], mode="bilinear", align_corners=False)[0]
    rec = {Path(im["path"]).name: im for im in r["images"]}
    assert rec[a.name]["random"]["auc"] == pytest.approx(ab_auc(b_on_a, la[1:]), abs=1e-6)


def test_cli_with_prior_and_classifier(tiny, tmp_path, shared_data, capsys):
    import torchvision

    from pretext.prior import compute_prior, save_prior

    ck = tmp_path / "tiny.pt"
    torch.save(dict(model_name="alexnet_cc", model_kwargs=dict(fc_dim=64), model=tiny.state_dict(), target="ab313",
                    bins=load_bins(), prior=None, input_size=SIZE, config={}, step=0), ck)
    # an ImageNet-layout folder (class folders named by class index) of real ImageNet validation images
    data = tmp_path / "val"
    for f in sorted((shared_data / "imagenet_sample").glob("*.jpg"))[:4]:
        label = f.stem.split("_")[-1]
        (data / label).mkdir(parents=True, exist_ok=True)
        (data / label / f.name).write_bytes(f.read_bytes())
    paths = sorted(data.rglob("*.jpg"))
    assert folder_labels([str(data)], paths) == [int(p.parent.name) for p in paths]
    prior_file = save_prior(compute_prior(paths, load_bins(), size=64, workers=0, progress=False), tmp_path / "prior.npz", "t")
    torch.manual_seed(0)
    clf = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    torch.save(clf.state_dict(), tmp_path / "clf.pth")
    out = tmp_path / "rep"
    argv = ["--checkpoint", ck, "--data", data, "--prior", prior_file, "--eval-size", EVAL, "--workers", 0, "--no-progress",
            "-o", out, "--classifier", "mobilenet_v3_small", "--classifier-weights", tmp_path / "clf.pth"]
    rc = run_entry(main, get_args_parser(), [str(a) for a in argv])
    assert rc == 0
    js = _load_json(out / "report.json")
    assert js["num_labelled"] == 4 and str(prior_file) in js["prior_source"]
    for m in ("ground_truth", "gray", "model"):
        assert 0 <= js[m]["top1"] <= js[m]["top5"] <= 100
    assert "Top-1" in (out / "report.md").read_text()
    # a classifier without weights is a user error naming the flag, not a download
    rc = run_entry(main, get_args_parser(), ["--checkpoint", str(ck), "--data", str(data), "--classifier", "resnet18"])
    assert rc == 2 and "--classifier-weights" in capsys.readouterr().err
