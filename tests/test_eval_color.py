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
from pretext.eval_color import (
    NETWORK_SIZE,
    evaluate,
    folder_labels,
    get_args_parser,
    main,
    markdown_table,
    random_training_picks,
)
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
    assert len(r["skipped_grey"]) == 1 and "shipped prior" in r["prior_source"]  # no prior given: the shipped one
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
    assert rec[a.name]["random_from"] == str(b) and rec[b.name]["random_from"] == str(a)
    assert "another test image" in r["random_source"] and "Random (ab of another test image)" in markdown_table(r)


def test_random_baseline_from_training_images(tiny, photos, tmp_path, shared_data):
    """Zhang et al.'s random baseline: the colours of a random training image (seeded), resized to the test image;
    an unreadable training image falls back to the next one."""
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    train = [bad, *sorted((shared_data / "photos" / "enlightenment").glob("*.jpg"))[:3]]
    tests = photos[:3]
    seed = next(s for s in range(50) if any(p[0] == 0 for p in random_training_picks(len(tests), len(train), s)))
    picks = random_training_picks(len(tests), len(train), seed)
    r = evaluate(tiny, "ab313", load_bins(), tests, None, size=SIZE, eval_size=EVAL, random_from=train, seed=seed)
    assert "random training image" in r["random_source"] and "Random (ab of a random training image)" in markdown_table(r)
    for i, im in enumerate(r["images"]):  # images are listed in path order, as ``tests``
        expected = next(train[k] for k in picks[i] if train[k] != bad)
        assert im["random_from"] == str(expected)
        gt, src = _lab_at(im["path"], EVAL), _lab_at(expected, EVAL)
        ab = F.interpolate(src[None, 1:], size=gt.shape[-2:], mode="bilinear", align_corners=False)[0]
        assert im["random"]["auc"] == pytest.approx(ab_auc(ab, gt[1:]), abs=1e-6)
    assert any(train[p[0]] == bad for p in picks)  # the fallback was exercised


class _Recorder(torch.nn.Module):
    """A colorizer that records the shape of every network input and predicts uniform logits at 1/4 resolution."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, L):
        self.shapes.append(tuple(L.shape))
        return torch.zeros(L.shape[0], 313, L.shape[-2] // 4, L.shape[-1] // 4)


def test_network_input_is_256_for_every_model(photos):
    """The network sees L at 256x256 by default whatever the photo's size; ab is resized back to the photo."""
    rec = _Recorder()
    r = evaluate(rec, "ab313", load_bins(), photos[:2], None, eval_size=EVAL, batch_size=1)
    assert NETWORK_SIZE == 256 and r["size"] == 256 and rec.shapes == [(1, 1, 256, 256)] * 2
    # uniform logits: the annealed mean is the mean of the bins, everywhere in the photo (float32 softmax vs an
    # exact mean: a few pixels may fall on the other side of an integer threshold)
    const = load_bins().double().mean(0)
    for im in r["images"]:
        gt = _lab_at(im["path"], EVAL)
        assert im["model"]["auc"] == pytest.approx(ab_auc(const.view(2, 1, 1).expand_as(gt[1:]), gt[1:]), abs=1e-3)
    args = get_args_parser().parse_args(["--checkpoint", "c", "--data", "d"])
    assert args.size == 256 and args.gamut == "clip"
    assert "network input 256x256" in markdown_table(r) and "clipped, as the release" in markdown_table(r)


def test_cli_uses_256_not_the_training_size(tiny, tmp_path, photos):
    """A checkpoint trained at 64 px is still evaluated at 256 (every AlexNetCC forward is recorded)."""
    from pretext.models.alexnet_cc import AlexNetCC

    ck = tmp_path / "tiny.pt"
    torch.save(dict(model_name="alexnet_cc", model_kwargs=dict(fc_dim=64), model=tiny.state_dict(), target="ab313",
                    bins=load_bins(), prior=None, input_size=SIZE, config={}, step=0), ck)
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: seen.append(tuple(a[0].shape[-2:])) if isinstance(m, AlexNetCC) else None)
    try:
        rc = run_entry(main, get_args_parser(), ["--checkpoint", str(ck), "--data", str(photos[0]), "--eval-size",
                                                 str(EVAL), "--workers", "0", "--no-progress", "-o", str(tmp_path / "r")])
    finally:
        hook.remove()
    assert rc == 0 and seen and set(seen) == {(256, 256)}


def test_table_shows_both_auc_integrations_when_they_differ(tiny, photos):
    r = evaluate(tiny, "ab313", load_bins(), photos[:2], None, size=SIZE, eval_size=EVAL)
    for m in ("model", "gray", "random"):
        assert r[m]["auc_trapz"] - r[m]["auc"] == pytest.approx((2 * r[m]["auc"] / 100 - r[m]["cmf"][0] - r[m]["cmf"][-1]) / 3)
    close = {k: dict(v) if isinstance(v, dict) else v for k, v in r.items()}
    for m in ("model", "gray", "random"):
        close[m]["auc_trapz"], close[m]["auc_rebal_trapz"] = close[m]["auc"] + 0.05, close[m]["auc_rebal"] - 0.05
    assert "trapezoid (%)" not in markdown_table(close) and "within 0.1" in markdown_table(close)
    close["gray"]["auc_rebal_trapz"] = close["gray"]["auc_rebal"] + 0.2
    table = markdown_table(close)
    assert "AuC rebal, trapezoid (%)" in table and "differs by more than 0.1" in table


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


# --------------------------------------------------------------------------------------------- rebalancing prior (issue 11)
def _noise_image(path: Path, size=(96, 128), seed=0) -> Path:
    import numpy as np

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _gray_rebal_auc_by_hand(paths, probs, bins, eval_size, max_weight=None) -> float:
    """Zhang et al.'s rebalanced AuC of the all-gray prediction, by brute force: every pixel's ground-truth bin is
    its nearest bin (full distance table), its weight 1/p of that bin (normalised to mean 1 under the prior,
    capped), each image's pixels share a mass of 1, and the CMF is read at t = 0..150 from the sorted errors."""
    import numpy as np

    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum()
    w = np.where(p > 0, 1 / np.where(p > 0, p, 1), 0.0)
    w = np.where(p > 0, w, w.max())
    w = w / (p * w).sum()
    if max_weight is not None:
        w = np.minimum(w, max_weight)
    errs, mass = [], []
    for path in paths:
        ab = _lab_at(path, eval_size)[1:].reshape(2, -1).T.double().numpy()
        q = ((ab[:, None, :] - np.asarray(bins, dtype=np.float64)[None]) ** 2).sum(-1).argmin(1)
        errs.append(np.ceil(np.sqrt((ab.astype(np.float32) ** 2).sum(1))))  # gray: the error is |ab|
        mass.append(w[q] / len(q))
    e, m = np.concatenate(errs), np.concatenate(mass)
    return float(100 * np.mean([m[e <= t].sum() / m.sum() for t in range(151)]))


def test_noise_image_and_the_rebalancing_prior_by_brute_force(tiny, photos, tmp_path):
    """One random-noise image among photos: with the prior estimated from the evaluated images (the old default)
    the noise's saturated bins get a tiny prior and a huge weight; the default is now a prior that does not depend
    on the evaluated images (shipped or the training data's), and the weights can be capped. Every number is checked
    against a brute-force computation."""
    from pretext.prior import load_shipped_prior

    noise = _noise_image(tmp_path / "noise.png")
    shipped = load_shipped_prior()
    with_noise = photos + [noise]
    r_ship = evaluate(tiny, "ab313", load_bins(), with_noise, None, size=SIZE, eval_size=EVAL, max_weight=None)
    assert "shipped prior" in r_ship["prior_source"] and "shipped prior" in r_ship["rebalancing"]["prior"]
    assert r_ship["gray"]["auc_rebal"] == pytest.approx(
        _gray_rebal_auc_by_hand(with_noise, shipped["probs"], shipped["bins"], EVAL), abs=1e-3)
    r_cap = evaluate(tiny, "ab313", load_bins(), with_noise, None, size=SIZE, eval_size=EVAL)  # default: cap 10
    assert r_cap["rebalancing"]["max_weight"] == 10.0 and r_cap["rebalancing"]["max_weight_used"] <= 10.0
    assert r_cap["gray"]["auc_rebal"] == pytest.approx(
        _gray_rebal_auc_by_hand(with_noise, shipped["probs"], shipped["bins"], EVAL, max_weight=10.0), abs=1e-3)
    assert r_cap["gray"]["auc"] == r_ship["gray"]["auc"]  # the cap touches the rebalanced AuC only
    # the old behaviour: the prior estimated from the evaluated images themselves, noise included
    r_eval = evaluate(tiny, "ab313", load_bins(), with_noise, "evaluated", size=SIZE, eval_size=EVAL, max_weight=None)
    assert "evaluated images" in r_eval["prior_source"]
    r_clean = evaluate(tiny, "ab313", load_bins(), photos, "evaluated", size=SIZE, eval_size=EVAL, max_weight=None)
    assert r_eval["gray"]["auc_rebal"] < r_clean["gray"]["auc_rebal"] - 5  # one noise image drags it down
    # a fixed prior (given or shipped) does not move when the evaluated set changes: the photos' own scores agree
    r_ship_clean = evaluate(tiny, "ab313", load_bins(), photos, None, size=SIZE, eval_size=EVAL, max_weight=None)
    assert r_ship_clean["gray"]["auc_rebal"] == pytest.approx(
        _gray_rebal_auc_by_hand(photos, shipped["probs"], shipped["bins"], EVAL), abs=1e-3)
    # uncapped (the paper's metric), the noise's saturated pixels, rare under a prior of photographs, carry most of
    # the weight: the report says so; capped weights keep the score near the photos' own
    assert r_ship["rebalancing"]["rare_weight_share"] > 0.5 > r_ship_clean["rebalancing"]["rare_weight_share"]
    assert "**Note:**" in markdown_table(r_ship) and "**Note:**" not in markdown_table(r_ship_clean)
    r_cap_clean = evaluate(tiny, "ab313", load_bins(), photos, None, size=SIZE, eval_size=EVAL)
    assert abs(r_cap["gray"]["auc_rebal"] - r_cap_clean["gray"]["auc_rebal"]) < abs(
        r_ship["gray"]["auc_rebal"] - r_ship_clean["gray"]["auc_rebal"])


def test_rebalanced_weight_stats_by_hand():
    from pretext.metrics import inverse_prior_weights, rebalanced_weight_stats

    prior = torch.tensor([0.6, 0.399, 0.001, 0.0])  # Q = 4: rare below 1 / 400 = 0.0025: the last two bins
    w = inverse_prior_weights(prior)  # 1 / p normalised: sum p w = 1; the empty bin gets the largest finite weight
    assert float((prior * w).sum()) == pytest.approx(1.0) and w[3] == w[2] == pytest.approx(1 / 0.001 / 3)
    mass = torch.tensor([0.5, 0.3, 0.2, 0.0])
    st = rebalanced_weight_stats(mass, prior)
    total = 0.5 / 0.6 + 0.3 / 0.399 + 0.2 / 0.001
    assert st["rare_weight_share"] == pytest.approx((0.2 / 0.001) / total)
    assert st["rare_mass_share"] == pytest.approx(0.2) and st["top_bin"] == 2
    capped = rebalanced_weight_stats(mass, prior, max_weight=2.0)
    wc = [min(x, 2.0) for x in (1 / 0.6 / 3, 1 / 0.399 / 3, 1 / 0.001 / 3)]
    assert capped["rare_weight_share"] == pytest.approx(0.2 * wc[2] / (0.5 * wc[0] + 0.3 * wc[1] + 0.2 * wc[2]))
    assert capped["max_weight_used"] == 2.0


def _ckpt(tmp_path, tiny, prior=None) -> Path:
    ck = tmp_path / ("tiny_prior.pt" if prior is not None else "tiny.pt")
    torch.save(dict(model_name="alexnet_cc", model_kwargs=dict(fc_dim=64), model=tiny.state_dict(), target="ab313",
                    bins=load_bins(), prior=prior, input_size=SIZE, config={}, step=0), ck)
    return ck


def test_cli_report_names_the_prior_and_the_weight_shares(tiny, photos, tmp_path):
    base = ["--data", *map(str, photos[:2]), "--eval-size", str(EVAL), "--size", "64", "--workers", "0", "--no-progress"]
    cases = [([], _ckpt(tmp_path, tiny), "shipped prior"),
             (["--prior-source", "evaluated"], _ckpt(tmp_path, tiny), "evaluated images"),
             ([], _ckpt(tmp_path, tiny, prior=torch.full((313,), 1 / 313)), "stored in the checkpoint"),
             (["--max-weight", "5"], _ckpt(tmp_path, tiny), "shipped prior"),
             (["--max-weight", "0"], _ckpt(tmp_path, tiny), "shipped prior")]
    for k, (extra, ck, name) in enumerate(cases):
        out = tmp_path / f"r{k}"
        assert run_entry(main, get_args_parser(), ["--checkpoint", str(ck), *base, "-o", str(out), *extra]) == 0
        js = _load_json(out / "report.json")
        md = (out / "report.md").read_text()
        assert name in js["prior_source"] and name in js["rebalancing"]["prior"] and name in md
        assert 0 <= js["rebalancing"]["rare_weight_share"] <= 1 and "of the rebalanced weight" in md
        if extra[-2:] == ["--max-weight", "0"]:  # the paper's uncapped weights
            assert js["rebalancing"]["max_weight"] is None and "uncapped, as the paper" in md
        else:  # the default cap 10, or the one given
            cap = 5 if "--max-weight" in extra else 10
            assert js["rebalancing"]["max_weight"] == cap and f"capped at {cap} x" in md


@pytest.mark.parametrize("bad, expect", [
    (["--size", "7"], "--size 7"),
    (["--size", "-5"], "--size -5"),
    (["--eval-size", "-1"], "--eval-size -1"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--workers", "-1"], "--workers -1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--max-images", "-3"], "--max-images -3"),
    (["--max-weight", "-1"], "--max-weight -1"),
    (["--max-weight", "nan"], "--max-weight nan"),
    (["--prior-source", "imagenet"], "--prior-source imagenet"),
    (["--prior-source", "checkpoint"], "holds no prior"),
    (["--prior", "PRIOR", "--prior-source", "evaluated"], "give one of them"),
    (["--prior", "MISSING"], "prior file not found"),
    (["--prior", "GARBAGE"], "not a prior file"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_are_refused_in_one_line(tiny, photos, tmp_path, refused_in_one_line, bad, expect):
    from pretext.prior import shipped_prior_path

    (tmp_path / "garbage.npz").write_bytes(b"zzz")
    subst = {"PRIOR": str(shipped_prior_path()), "MISSING": str(tmp_path / "none.npz"),
             "GARBAGE": str(tmp_path / "garbage.npz")}
    out = tmp_path / "report"
    refused_in_one_line(["eval-color", "--checkpoint", _ckpt(tmp_path, tiny), "--data", photos[0], "-o", out,
                         "--no-progress", *[subst.get(a, a) for a in bad]], expect=expect, must_not_exist=[out])
