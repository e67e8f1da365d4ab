"""linear_probe.train / heads / cache / encoder / compare on tiny ImageFolder trees written here (CPU, seconds)."""
import json
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
    ProbeHeads,
    TapPool,
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
def test_pooled_dims_match_paper_alexnet_227():
    enc, _ = build_encoder(None, random_init="alexnet_cc", model_kwargs={"fc_dim": 8})
    shapes = enc.tap_shapes(227)
    assert shapes["conv1"] == (96, 55, 55) and shapes["conv5"] == (256, 13, 13)
    paper = {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216, "pool5": 9216}
    feats = enc(torch.rand(1, 3, 227, 227), taps=list(paper))
    for pool in ("avg", "bilinear"):
        heads = ProbeHeads({t: shapes[t][0] for t in paper}, 10, pool)
        assert heads.dims == paper
        pooled = heads.pool(feats)
        assert all(pooled[t].shape == (1, paper[t]) for t in paper)
    assert pooled_side(4096) == 1 and pooled_side(20000) == 1 and pooled_side(96, 9600) == 10


from pretext.models import list_models  # noqa: E402

SMALL = {"zhang_vgg": ({}, 32), "alexnet_cc": ({"fc_dim": 8}, 67), "timm:resnet18": ({}, 64),
         "vgg16_hypercolumn": ({"width_mult": 0.125, "fc_dim": 32, "hidden": 32}, 64)}


@pytest.mark.parametrize("name", [*list_models(), "timm:resnet18"])
def test_every_model_probes_every_tap(name):
    kw, size = SMALL.get(name, ({}, 64))
    enc, spec = build_encoder(None, random_init=name, model_kwargs=kw)
    assert enc.taps == [f["module"] for f in enc.model.feature_info] and enc.input_mode == "L"
    shapes = enc.tap_shapes(size)
    heads = ProbeHeads({t: s[0] for t, s in shapes.items()}, 3)
    logits = heads(heads.pool(enc(torch.rand(2, 3, size, size))))
    assert all(v.shape == (2, 3) for v in logits.values()) and all(d <= 10000 for d in heads.dims.values())


def test_tap_pool_modes():
    x = torch.randn(2, 4, 13, 13)
    assert torch.allclose(TapPool(6, "avg")(x), F.adaptive_avg_pool2d(x, 6).flatten(1))
    assert torch.allclose(TapPool(6, "bilinear")(x), F.interpolate(x, (6, 6), mode="bilinear").flatten(1))
    assert TapPool(2, "avg")(torch.randn(3, 5)).shape == (3, 20)  # fc taps


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
    enc2, _ = build_encoder(["conv1"], random_init="alexnet_cc", model_kwargs={"fc_dim": 8})
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
    enc, spec = build_encoder(["conv5"], checkpoint=str(path))
    assert spec.kind == "checkpoint" and "step 7" in spec.label
    assert torch.equal(enc.model.conv5[0].weight, m.conv5[0].weight)


# --------------------------------------------------------------------------------------------- end to end
def test_probe_end_to_end_outputs(folder, tmp_path):
    out = tmp_path / "run"
    assert run_probe(folder, out, "--set", "epochs=2", "--set", "batch_size=4", "--set", "taps=[conv1,conv5]") == 0
    res = json.loads((out / "results.json").read_text())
    assert [t["tap"] for t in res["taps"]] == ["conv1", "conv5"]
    assert res["num_train"] + res["num_val"] == 18 and res["num_val"] == 6
    assert all(0 <= t["top1"] <= 100 and t["top5"] == 100.0 for t in res["taps"])  # 3 classes: top-5 is trivial
    assert (out / "accuracy_per_layer.png").stat().st_size > 1000 and "| conv1 |" in (out / "results.md").read_text()
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["lr"] == pytest.approx(0.001)  # x0.1 at epoch 1
    with pytest.raises(UserError, match="pass --resume"):
        run_probe(folder, out)


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
    init = ProbeHeads({"conv3": 384}, 3, seed=0).heads["conv3"].fc.weight
    assert not torch.allclose(joint["heads.conv3.fc.weight"], init)  # the step did change the weights


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
    heads = ProbeHeads({t: s[0] for t, s in enc.tap_shapes(67).items()}, len(classes))
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
    with pytest.raises(UserError, match="no results.json"):
        compare.main(compare.get_args_parser().parse_args([str(tmp_path), "-o", str(png)]))


def test_cli_registered():
    from pretext.cli import main as cli

    with pytest.raises(SystemExit) as e:
        cli(["probe", "--help"])
    assert e.value.code == 0


def test_configs_load():
    for name in ("alexnet_cc_in1k_avgpool", "quick_gcompris"):
        cfg = load_config(train.ProbeConfig, ROOT / "configs" / "probe" / f"{name}.yaml")
        assert cfg.lr == 0.01 and cfg.momentum == 0.9 and cfg.weight_decay == 5e-4 and cfg.pool == "avg"
    assert load_config(train.ProbeConfig, ROOT / "configs/probe/alexnet_cc_in1k_avgpool.yaml").crop == 227


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
