"""linear_probe.train / heads / cache / encoder / compare on tiny ImageFolder trees written here (CPU, seconds)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from linear_probe import compare, train
from linear_probe.cache import FeatureCache, build_cache, cache_key
from linear_probe.encoder import build_encoder, check_unchanged, snapshot
from linear_probe.heads import (
    PoolSpec,
    ProbeHeads,
    TapPool,
    TapPools,
    caffe_resize,
    fig7_kernel,
    pooled_side,
    probe_loss,
    topk_correct,
)
from pretext.runtime import UserError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--random-init", "alexnet_cc", "--set", "model_kwargs.fc_dim=8", "--set", "crop=67", "--set", "resize=72",
        "--set", "workers=0", "--set", "progress=false", "--set", "device=cpu", "--set", "lr_steps=[1]"]
CLASSES = {"blue": (40, 60, 200), "green": (50, 170, 60), "red": (210, 50, 40)}


def write_imagefolder(root: Path, per_class: int, seed: int = 0) -> Path:
    """Classes of noisy images whose lightness pattern differs (the encoder sees L only)."""
    rng = np.random.default_rng(seed)
    for k, (name, rgb) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (64, 80, 3)), 0, 255)
            img[:, (k * 20):(k * 20 + 20)] *= 0.3  # a dark band at a class-specific position
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{name}{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("imgs") / "data", per_class=6)


def run_probe(folder, out, *extra, resume=False):
    argv = [*TINY, "--set", f"data={folder}", "--set", "val_fraction=0.34", "--set", f"out_dir={out}", *extra]
    if resume:
        argv.append("--resume")
    return train.main(train.get_args_parser().parse_args(argv))


def heads_state(out) -> dict:
    return torch.load(Path(out) / "checkpoint.pth", weights_only=False)["heads"]


# --------------------------------------------------------------------------------------------- units
def test_pooled_shapes_match_fig7_alexnet_227():
    """The issue's table: conv1 k6 -> 10x10x96, conv2 k5 -> 6x6x256, conv3/conv4 k3 -> 5x5x384, conv5 k3 -> 5x5x256,
    pool5 as it is (6x6x256), on the standard (transfer) AlexNet geometry at 227."""
    enc, spec = build_encoder(None, random_init="alexnet_cc", model_kwargs={"fc_dim": 8})
    assert spec.extra["geometry"] == "transfer"
    shapes = enc.tap_shapes(227)
    assert shapes["conv1"] == (96, 55, 55) and shapes["conv5"] == (256, 13, 13) and shapes["pool5"] == (256, 6, 6)
    fig7 = {"conv1": (6, (96, 10, 10)), "conv2": (5, (256, 6, 6)), "conv3": (3, (384, 5, 5)), "conv4": (3, (384, 5, 5)),
            "conv5": (3, (256, 5, 5)), "pool5": (1, (256, 6, 6)), "pool1": (3, (96, 9, 9)), "pool2": (3, (256, 5, 5))}
    heads = ProbeHeads({t: shapes[t] for t in fig7}, 10)
    feats = enc(torch.rand(2, 3, 227, 227), taps=list(fig7))
    pooled = heads.pool(feats)
    for t, (k, out) in fig7.items():
        d = heads.pooler.describe()[t]
        assert (d["kernel"], d["stride"], tuple(d["out"])) == (k, k, out), t
        assert pooled[t].shape == (2, out[0] * out[1] * out[2]) and heads.dims[t] < 10000
        # the smallest such kernel: one less gives 10k or more
        if k > 1:
            c, h, w = shapes[t]
            assert c * caffe_out(h, k - 1, k - 1) * caffe_out(w, k - 1, k - 1) >= 10000
    assert torch.equal(pooled["pool5"], feats["pool5"].flatten(1))  # as it is
    # the released variant's sizes (bilinear) and adaptive pooling to the same sizes
    released = {"conv1": 10, "pool1": 10, "conv2": 6, "pool2": 6, "conv3": 5, "conv4": 5, "conv5": 6, "pool5": 6}
    for mode in ("bilinear", "adaptive"):
        p = TapPools({t: shapes[t] for t in released}, mode)
        assert {t: d["out"][1:] for t, d in p.describe().items()} == {t: [s, s] for t, s in released.items()}
    assert pooled_side(4096) == 1 and pooled_side(20000) == 1 and pooled_side(96, 9600) == 10
    assert fig7_kernel((4096,) + (1, 1)) == 1 and fig7_kernel((20000, 2, 2)) == 2  # one value per channel at worst


def caffe_out(n: int, k: int, s: int, pad: int = 0) -> int:
    """Caffe's pooling output size, transcribed from caffe/src/caffe/layers/pooling_layer.cpp (Reshape):
    pooled = ceil((n + 2 pad - k) / s) + 1; if pad > 0 and (pooled - 1) * s >= n + pad: pooled -= 1."""
    pooled = int(math.ceil(float(n + 2 * pad - k) / s)) + 1
    if pad > 0 and (pooled - 1) * s >= n + pad:
        pooled -= 1
    return pooled


def caffe_avg_pool(x: np.ndarray, k: int, s: int, pad: int = 0) -> np.ndarray:
    """Caffe's AVE pooling forward (pooling_layer.cpp, Forward_cpu), transcribed: the divisor counts the window up
    to the padded border, then the window is clipped to the input."""
    n_, c_, h, w = x.shape
    ph, pw = caffe_out(h, k, s, pad), caffe_out(w, k, s, pad)
    out = np.zeros((n_, c_, ph, pw))
    for i in range(ph):
        for j in range(pw):
            hs, ws = i * s - pad, j * s - pad
            he, we = min(hs + k, h + pad), min(ws + k, w + pad)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            out[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / size
    return out


def test_avg_pooling_is_caffe_ceil_pooling():
    """Fig. 7 pooling == F.avg_pool2d(x, k, k, ceil_mode=True) == Caffe's AVE pooling (transcribed), sizes and
    values, for every map size and kernel = stride; the last, partial window averages the elements it covers."""
    g = torch.Generator().manual_seed(0)
    for h in range(1, 30):
        for k in range(1, h + 1):
            assert F.avg_pool2d(torch.zeros(1, 1, h, h), k, k, ceil_mode=True).shape[-1] == caffe_out(h, k, k), (h, k)
    for h, w, k in ((55, 55, 6), (27, 27, 5), (13, 13, 3), (13, 17, 4), (7, 5, 2)):
        x = torch.rand(2, 3, h, w, generator=g)
        ref = torch.from_numpy(caffe_avg_pool(x.double().numpy(), k, k)).float()
        torch.testing.assert_close(F.avg_pool2d(x, k, k, ceil_mode=True), ref)
        spec = PoolSpec("avg", (3, ref.shape[-2], ref.shape[-1]), k, k, True)
        torch.testing.assert_close(TapPool(spec)(x), ref.flatten(1))
    # conv1 at 227: the 10th window starts at 54 and covers one row / column of the 55
    x = torch.rand(1, 1, 55, 55, generator=g)
    assert torch.isclose(F.avg_pool2d(x, 6, 6, ceil_mode=True)[0, 0, 9, 9], x[0, 0, 54, 54])


def test_torch_ceil_mode_drops_windows_that_start_past_the_input():
    """Where torch and Caffe differ: with stride > kernel and no padding, Caffe keeps a last window that starts past
    the input (it covers nothing); torch drops it. With kernel = stride (the Fig. 7 rule) no window starts past
    the input (the last starts at ceil((n - k) / k) * k <= n - 1), so the two agree there (checked above)."""
    assert caffe_out(5, 1, 3) == 3 and F.avg_pool2d(torch.zeros(1, 1, 5, 5), 1, 3, ceil_mode=True).shape[-1] == 2
    for n in range(1, 60):
        for k in range(1, n + 1):
            assert (caffe_out(n, k, k) - 1) * k <= n - 1


def resize_layer_reference(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """caffe-colorization/src/caffe/layers/resize_layer.cpp (Reshape + Forward_cpu), transcribed: per axis
    scale = (out - 1) / (in - 1); if scale < 1 a tent filter of radius R = 1 / scale (weights R - r for r < R,
    edge replicated, normalised by (2 iR + 1) R - iR (iR + 1)); then x = i / scale, id0 = int(x),
    id1 = min(id0 + 1, n - 1), w = id1 - x, out = w in[id0] + (1 - w) in[id1]. x first, then y."""
    def tent(a, R):
        iR = int(R)
        norm = (2 * iR + 1) * R - iR * (iR + 1)
        n = a.shape[-1]
        out = np.empty_like(a)
        for i in range(n):
            acc = R * a[..., i]
            r = 1
            while r < R:
                acc = acc + (R - r) * (a[..., max(i - r, 0)] + a[..., min(i + r, n - 1)])
                r += 1
            out[..., i] = acc / norm
        return out

    def lerp(a, out_n):
        n = a.shape[-1]
        scale = (out_n - 1.0) / (n - 1)
        if scale < 1:
            a = tent(a, 1.0 / max(scale, 0.01))
        res = np.empty(a.shape[:-1] + (out_n,))
        for i in range(out_n):
            xx = min(max(i / scale, 0), n - 1)
            i0 = int(xx)
            i1 = min(i0 + 1, n - 1)
            wt = i1 - xx
            res[..., i] = wt * a[..., i0] + (1 - wt) * a[..., i1]
        return res

    y = lerp(x, ow)
    return np.swapaxes(lerp(np.swapaxes(y, -1, -2), oh), -1, -2)


def test_bilinear_is_the_released_resize_layer():
    g = torch.Generator().manual_seed(1)
    for (h, w), (oh, ow) in (((55, 55), (10, 10)), ((27, 27), (6, 6)), ((13, 13), (5, 5)), ((13, 13), (6, 6)),
                             ((13, 9), (5, 7)), ((3, 4), (6, 6))):
        x = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64)
        ref = resize_layer_reference(x.numpy(), oh, ow)
        assert np.allclose(caffe_resize(x, (oh, ow)).numpy(), ref, atol=1e-10), ((h, w), (oh, ow))
    x = torch.rand(1, 2, 6, 6, generator=g)
    assert torch.equal(caffe_resize(x, (6, 6)), x)
    # a constant map stays constant (the blur and the interpolation both preserve it)
    assert torch.allclose(caffe_resize(torch.full((1, 1, 27, 27), 3.0), (6, 6)), torch.full((1, 1, 6, 6), 3.0))


def test_transfer_geometry_is_the_exported_alexnet(tmp_path):
    """A cross-channel AlexNet is probed as transfer uses it: export_alexnet_transfer (BatchNorm folded, pool5 max
    3/2); geometry=pretext keeps the dense pool5."""
    from pretext.models import create_model
    from pretext.models.alexnet_cc import AlexNetTransfer, export_alexnet_transfer

    torch.manual_seed(5)
    m = create_model("alexnet_cc", fc_dim=8).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding matters
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "pretext.pth"
    torch.save({"model_name": "alexnet_cc", "model_kwargs": {"fc_dim": 8}, "model": m.state_dict(), "step": 3}, path)
    enc, spec = build_encoder(["conv1", "conv5", "pool5"], checkpoint=str(path))
    assert isinstance(enc.model, AlexNetTransfer) and spec.extra["geometry"] == "transfer"
    rgb = torch.rand(2, 3, 227, 227)
    feats = enc(rgb)
    ref = export_alexnet_transfer(m)
    from pretext.color import rgb_to_l
    from pretext.models import extract_taps

    want = extract_taps(ref, rgb_to_l(rgb), ["conv1", "conv5", "pool5"])
    for t in feats:
        torch.testing.assert_close(feats[t], want[t])
    assert feats["pool5"].shape[-2:] == (6, 6)
    # the pretext geometry: the BN model itself, dense pool5 (15x15 at 227 in the released geometry: conv1 pad 5, padded pools rounding up)
    enc2, spec2 = build_encoder(["conv5", "pool5"], checkpoint=str(path), geometry="pretext")
    assert spec2.extra["geometry"] == "pretext" and enc2(rgb)["pool5"].shape[-2:] == (15, 15)
    # the pretext geometry is the BN model itself (its own taps; the two geometries differ in conv1's padding)
    mine = extract_taps(m, rgb_to_l(rgb), ["conv5", "pool5"])
    for t in ("conv5", "pool5"):
        torch.testing.assert_close(enc2(rgb)[t], mine[t], rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="geometry"):
        build_encoder(None, checkpoint=str(path), geometry="dense")


def test_solver_param_groups_and_zero_init():
    """The released solver: bias lr x2 and no weight decay on biases; InnerProduct weights start at 0."""
    heads = ProbeHeads({"conv1": (4, 6, 6), "fc": (8,)}, 3)
    g = heads.param_groups(0.01, 5e-4, 2.0, 0.0)
    assert [x["lr"] for x in g] == [0.01, 0.02] and [x["weight_decay"] for x in g] == [5e-4, 0.0]
    assert all(p.dim() == 2 for p in g[0]["params"]) and all(p.dim() == 1 for p in g[1]["params"])
    assert all(float(p.detach().abs().sum()) == 0 for p in heads.parameters())
    assert heads.heads["conv1"].bn.momentum is None  # running statistics: the plain average over training batches
    normal = ProbeHeads({"conv1": (4, 6, 6)}, 3, init="normal")
    assert 0.005 < float(normal.heads["conv1"].fc.weight.detach().std()) < 0.02


from pretext.models import list_models  # noqa: E402

SMALL = {"zhang_vgg": ({}, 32), "alexnet_cc": ({"fc_dim": 8}, 67), "timm:resnet18": ({}, 64),
         "vgg16_hypercolumn": ({"width_mult": 0.125, "fc_dim": 32, "hidden": 32}, 64)}


@pytest.mark.parametrize("name", [*list_models(), "timm:resnet18"])
def test_every_model_probes_every_tap(name):
    kw, size = SMALL.get(name, ({}, 64))
    enc, spec = build_encoder(None, random_init=name, model_kwargs=kw)
    assert enc.taps == [f["module"] for f in enc.model.feature_info] and enc.input_mode == "L"
    shapes = enc.tap_shapes(size)
    heads = ProbeHeads(shapes, 3)
    logits = heads(heads.pool(enc(torch.rand(2, 3, size, size))))
    assert all(v.shape == (2, 3) for v in logits.values()) and all(d <= 10000 for d in heads.dims.values())


def test_tap_pool_modes():
    x = torch.randn(2, 4, 13, 13)
    p = TapPools({"a": (4, 13, 13), "fc": (5,)}, "adaptive", max_dims=144)
    assert torch.allclose(p({"a": x, "fc": x[:, :, 0, 0]})["a"], F.adaptive_avg_pool2d(x, 6).flatten(1))
    fixed = TapPools({"a": (4, 13, 13)}, "fixed", kernels={"a": (8, 1)})
    assert torch.allclose(fixed({"a": x})["a"], F.avg_pool2d(x, 8, 1).flatten(1)) and fixed.dims["a"] == 4 * 36
    assert TapPools({"fc": (5,)}, "avg")({"fc": torch.randn(3, 5)})["fc"].shape == (3, 5)  # vector taps as they are
    with pytest.raises(ValueError, match="no \\(kernel, stride\\)"):
        TapPools({"a": (4, 13, 13)}, "fixed")


def test_topk_and_loss():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
    assert topk_correct(logits, torch.tensor([1, 2])) == [1, 2]  # k=5 clipped to 3 classes
    total, per = probe_loss({"a": logits, "b": logits * 2}, torch.tensor([0, 2]))
    assert torch.allclose(total, per["a"] + per["b"])


def test_frozen_encoder_sanity_check_fails_when_perturbed():
    enc, _ = build_encoder(["conv1", "conv2"], random_init="alexnet_cc", model_kwargs={"fc_dim": 8})
    before = snapshot(enc)
    enc.train()  # must stay in eval mode: BatchNorm running statistics may not move
    assert not enc.training and not enc.model.training
    enc(torch.rand(4, 3, 67, 67))
    check_unchanged(enc, before)
    with torch.no_grad():
        enc.model.conv2[0].weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(RuntimeError, match="frozen encoder changed"):
        check_unchanged(enc, before)
    enc2, _ = build_encoder(["conv1"], random_init="alexnet_cc", model_kwargs={"fc_dim": 8}, geometry="pretext")
    before2 = snapshot(enc2)
    enc2.model.conv1[1].running_mean.add_(1.0)  # a buffer, not a parameter
    with pytest.raises(RuntimeError, match="conv1.1.running_mean"):
        check_unchanged(enc2, before2)


def test_encoder_stops_after_last_tap():
    enc, _ = build_encoder(["conv1"], random_init="alexnet_cc", model_kwargs={"fc_dim": 8})
    ran = []
    enc.model.conv2.register_forward_hook(lambda *a: ran.append(1))
    out = enc(torch.rand(1, 3, 67, 67))
    assert list(out) == ["conv1"] and not ran


def test_stratified_split():
    targets = [0] * 10 + [1] * 5 + [2] * 2
    tr, va = train.stratified_split(targets, 0.3, seed=1)
    assert sorted(tr + va) == list(range(17)) and not set(tr) & set(va)
    assert [sum(targets[i] == c for i in va) for c in range(3)] == [3, 2, 1]
    assert train.stratified_split(targets, 0.3, seed=1) == (tr, va)


def test_encoder_source_errors(tmp_path):
    with pytest.raises(UserError, match="exactly one encoder"):
        build_encoder(None)
    with pytest.raises(UserError, match="unknown tap"):
        build_encoder(["conv9"], random_init="alexnet_cc", model_kwargs={"fc_dim": 8})
    with pytest.raises(UserError, match="checkpoint not found"):
        build_encoder(None, checkpoint=str(tmp_path / "nope.pth"))


def test_checkpoint_encoder(tmp_path):
    from pretext.models import create_model

    torch.manual_seed(3)
    m = create_model("alexnet_cc", fc_dim=8)
    path = tmp_path / "pretext.pth"
    torch.save({"model_name": "alexnet_cc", "model_kwargs": {"fc_dim": 8}, "model": m.state_dict(), "step": 7,
                "target": "ab313"}, path)
    enc, spec = build_encoder(["conv5"], checkpoint=str(path), geometry="pretext")
    assert spec.kind == "checkpoint" and "step 7" in spec.label
    assert torch.equal(enc.model.conv5[0].weight, m.conv5[0].weight)


# --------------------------------------------------------------------------------------------- end to end
def test_probe_end_to_end_outputs(folder, tmp_path):
    out = tmp_path / "run"
    assert run_probe(folder, out, "--set", "epochs=2", "--set", "batch_size=4", "--set", "taps=[conv1,conv5]") == 0
    res = json.loads((out / "results.json").read_text())
    assert [t["tap"] for t in res["taps"]] == ["conv1", "conv5"] and res["geometry"] == "transfer"
    # crop 67: conv1 15x15x96 -> k2 -> 8x8x96 (6144 < 10k); conv5 3x3x256 = 2304 as it is
    c1, c5 = res["taps"]
    assert c1["shape"] == [96, 15, 15] and c1["pooled_shape"] == [96, 8, 8] and c1["dims"] == 6144
    assert (c1["pooling"]["mode"], c1["pooling"]["kernel"], c1["pooling"]["stride"], c1["pooling"]["ceil_mode"]) == \
        ("avg", 2, 2, True)
    assert c5["pooled_shape"] == [256, 3, 3] and c5["pooling"]["kernel"] == 1
    assert "| conv1 | 96x15x15 | avg k2/s2 ceil | 8x8x96 | 6144 |" in (out / "results.md").read_text()
    assert res["num_train"] + res["num_val"] == 18 and res["num_val"] == 6
    assert all(0 <= t["top1"] <= 100 and t["top5"] == 100.0 for t in res["taps"])  # 3 classes: top-5 is trivial
    assert (out / "accuracy_per_layer.png").stat().st_size > 1000 and "| conv1 |" in (out / "results.md").read_text()
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["lr"] == pytest.approx(0.001)  # x0.1 at epoch 1
    with pytest.raises(UserError, match="pass --resume"):
        run_probe(folder, out, "--set", "epochs=2", "--set", "batch_size=4", "--set", "taps=[conv1,conv5]")


def test_single_pass_equals_separate_runs(folder, tmp_path):
    """One encoder pass training 3 heads == 3 runs of one head each (same seed): identical weights after 1 step."""
    common = ("--set", "epochs=1", "--set", "batch_size=12")  # 12 train images: exactly one step
    taps = ["conv1", "conv3", "pool5"]
    run_probe(folder, tmp_path / "all", *common, "--set", f"taps=[{','.join(taps)}]")
    joint = heads_state(tmp_path / "all")
    for t in taps:
        run_probe(folder, tmp_path / t, *common, "--set", f"taps=[{t}]")
        alone = heads_state(tmp_path / t)
        for k, v in alone.items():
            assert torch.allclose(joint[k], v, rtol=0, atol=1e-7), k
    assert float(joint["heads.conv3.fc.weight"].abs().sum()) > 0  # the step did change the (zero) initial weights


def test_resume_equals_uninterrupted(folder, tmp_path):
    common = ("--set", "batch_size=4", "--set", "taps=[conv2,pool5]")
    run_probe(folder, tmp_path / "full", *common, "--set", "epochs=2")
    run_probe(folder, tmp_path / "cut", *common, "--set", "epochs=1")  # "interrupted" after epoch 1
    run_probe(folder, tmp_path / "cut", *common, "--set", "epochs=2", resume=True)
    a, b = heads_state(tmp_path / "full"), heads_state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text())["taps"] for d in ("full", "cut"))
    assert ra == rb


def test_feature_cache_roundtrip(folder, tmp_path):
    enc, _ = build_encoder(["conv1", "conv4"], random_init="alexnet_cc", model_kwargs={"fc_dim": 8})
    cfg = load_config(train.ProbeConfig, None, [f"data={folder}", "val_fraction=0.34", "crop=67", "resize=72"])
    _, val_tf = train.build_transforms(cfg)
    tr, _, classes = train.get_dataset(cfg, val_tf, val_tf)
    heads = ProbeHeads(enc.tap_shapes(67), len(classes))
    key = cache_key(samples=train._samples(tr), taps=heads.taps)
    cache = build_cache(tmp_path / "c", key, enc, heads.pooler, tr, batch_size=5, workers=0, device=torch.device("cpu"),
                        amp_dtype=None)
    assert isinstance(cache.feats["conv1"], np.memmap) and len(cache) == len(tr)
    x = torch.stack([tr[i][0] for i in range(len(tr))])
    ref = train.pool_features(enc, heads.pooler, x, None)
    seen = []
    for feats, y in cache.batches(range(len(tr)), 7):
        assert set(feats) == set(heads.taps) and all(len(f) == len(y) <= 7 for f in feats.values())
        seen += y.tolist()
    assert sorted(seen) == sorted(tr[i][1] for i in range(len(tr)))
    got = FeatureCache(tmp_path / "c", heads.taps)
    for t in heads.taps:
        assert np.allclose(got.feats[t], ref[t].numpy(), atol=1e-5)
    assert (got.labels == np.array([tr[i][1] for i in range(len(tr))])).all()
    mtime = (tmp_path / "c" / "conv1.npy").stat().st_mtime_ns
    build_cache(tmp_path / "c", key, enc, heads.pooler, tr, 5, 0, torch.device("cpu"), None)  # reused, not rebuilt
    assert (tmp_path / "c" / "conv1.npy").stat().st_mtime_ns == mtime
    # shuffled batches come back in the requested order
    feats, y = next(cache.batches([5, 0, 3], 3))
    assert torch.equal(feats["conv4"], torch.from_numpy(np.asarray(got.feats["conv4"][[5, 0, 3]])))


def test_probe_from_cache(folder, tmp_path):
    out = tmp_path / "cached"
    run_probe(folder, out, "--set", "epochs=2", "--set", "batch_size=4", "--set", "taps=[conv2,conv5]",
              "--set", "cache_features=true")
    res = json.loads((out / "results.json").read_text())
    assert res["cache_features"] and (out / "cache" / "train" / "meta.json").is_file()
    assert (out / "cache" / "val" / "conv5.npy").is_file()


def test_supervised_torchvision_ceiling(folder, tmp_path):
    import torchvision

    torch.manual_seed(0)
    w = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), w)
    enc, spec = build_encoder(["conv1", "conv5", "fc6"], supervised=f"alexnet:{w}")
    assert enc.input_mode == "rgb" and spec.label == "supervised (alexnet)"
    shapes = enc.tap_shapes(67)
    assert shapes["conv1"][0] == 64 and shapes["fc6"] == (4096,)
    argv = ["--supervised", f"alexnet:{w}", "--set", f"data={folder}", "--set", "val_fraction=0.34", "--set", "crop=67",
            "--set", "resize=72", "--set", "workers=0", "--set", "progress=false", "--set", "device=cpu",
            "--set", "epochs=1", "--set", "batch_size=4", "--set", "taps=[conv1,conv3,pool5]", "--set", f"out_dir={tmp_path / 's'}"]
    assert train.main(train.get_args_parser().parse_args(argv)) == 0
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="do not match"):
        build_encoder(None, supervised=f"alexnet:{bad}")


def test_compare_plot(folder, tmp_path):
    for name, taps in (("a", "[conv1,conv2]"), ("b", "[conv2,conv3]")):
        run_probe(folder, tmp_path / name, "--set", "epochs=1", "--set", "batch_size=6", "--set", f"taps={taps}",
                  "--set", f"label=run {name}")
    png = tmp_path / "cmp.png"
    args = compare.get_args_parser().parse_args([str(tmp_path / "a"), str(tmp_path / "b" / "results.json"), "-o", str(png)])
    assert compare.main(args) == 0
    assert png.stat().st_size > 1000
    table = png.with_suffix(".md").read_text()
    assert "| run (top1) | conv1 | conv2 | conv3 |" in table and "| run b |  |" in table
    assert "Published figures" in table and "3 classes, so they only give a scale" in table
    with pytest.raises(UserError, match="no results.json"):
        compare.main(compare.get_args_parser().parse_args([str(tmp_path), "-o", str(png)]))


def test_reference_lines_are_dashed():
    """probe-compare draws published figures as dashed lines: per-tap rows at their taps, others across the plot."""
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    rows = [dict(method="m", setting="conv1", metric="top1", value=10.0), dict(method="m", setting="conv3", metric="top1",
            value=20.0), dict(method="v", setting="layer not stated", metric="top1", value=30.0),
            dict(method="m", setting="conv2", metric="top5", value=50.0)]
    compare._draw_references(ax, ["conv1", "conv2", "conv3"], rows, "top1")
    lines = ax.get_lines()
    assert len(lines) == 2 and all(ln.get_linestyle() == "--" for ln in lines)
    assert list(lines[0].get_xdata()) == [0, 2] and list(lines[0].get_ydata()) == [10.0, 20.0]
    assert list(lines[1].get_ydata()) == [30.0, 30.0]
    # the shipped table's ImageNet rows are what the probe reports use
    from pretext.published import published

    assert compare.reference_rows() == published("in1k_linear") and compare.reference_rows(None) == []


def test_cli_registered():
    from pretext.cli import main as cli

    with pytest.raises(SystemExit) as e:
        cli(["probe", "--help"])
    assert e.value.code == 0


def test_configs_load():
    """Every probe config carries the released solver (feature_learning_tests/linear/solver.prototxt)."""
    for name in ("alexnet_cc_in1k_avgpool", "alexnet_cc_in1k_bilinear", "quick_gcompris"):
        cfg = load_config(train.ProbeConfig, ROOT / "configs" / "probe" / f"{name}.yaml")
        assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.bias_lr_mult, cfg.bias_decay_mult) == (0.01, 0.9, 5e-4, 2.0, 0.0)
        assert cfg.crop == 227 and cfg.geometry == "transfer" and cfg.head_init == "zeros"
    cfg = load_config(train.ProbeConfig, ROOT / "configs/probe/alexnet_cc_in1k_avgpool.yaml")
    assert cfg.pool == "avg" and cfg.epochs == 28 and list(cfg.lr_steps) == [8, 16, 24]
    # 140k iterations of 4 x 64 images, x0.1 every 40k: epochs of ImageNet-1k's 1,281,167 training images
    assert round(140_000 * 256 / 1_281_167) == 28 and [round(i * 40_000 * 256 / 1_281_167) for i in (1, 2, 3)] == [8, 16, 24]
    assert train.ProbeConfig() == load_config(train.ProbeConfig, None)  # defaults: the same solver
    d = train.ProbeConfig()
    assert (d.lr, d.weight_decay, d.bias_lr_mult, d.bias_decay_mult, d.epochs, d.pool) == (0.01, 5e-4, 2.0, 0.0, 28, "avg")


@pytest.mark.slow
def test_ddp_two_process_gloo(folder, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "linear_probe.train",
           *TINY, "--set", f"data={folder}", "--set", "val_fraction=0.34", "--set", f"out_dir={out}", "--set", "epochs=2",
           "--set", "batch_size=3", "--set", "taps=[conv1,conv4]", "--set", "cache_features=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["num_val"] == 6
    assert "sanity check passed" in (out / "log.txt").read_text()
