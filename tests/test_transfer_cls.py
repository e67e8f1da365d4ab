"""transfer.classification: philkr/voc-classification's protocol (loss, crops, AP) against transcriptions and hand
cases; fine-tuning a pretext checkpoint at each freeze level in both input modes on a VOCdevkit fixture and on
../shared/data/voc_sample; frozen layers bit-identical; exact resume after a crash; DDP (gloo, 2 processes)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_transfer_backbone import write_pretext_checkpoint, write_torchvision_alexnet
from test_voc import SHARED, write_vocdevkit

from pretext.runtime import UserError, load_checkpoint, load_config
from transfer import classification as C
from transfer.backbone import build_backbone
from transfer.sampling import IterationSampler
from transfer.voc import VOC_CLASSES

REPO = Path(__file__).resolve().parents[1]


def voc_fixture(base: Path, n_train: int = 8, n_test: int = 4, size=(260, 240), seed: int = 0) -> Path:
    """A 20-class VOCdevkit/VOC2007 with per-class ImageSets files; some labels difficult-only."""
    rng = np.random.default_rng(seed)
    imgs = {}
    for i in range(n_train + n_test):
        objs = [(VOC_CLASSES[int(k)], "1" if rng.random() < 0.2 else "0") for k in rng.choice(20, 2, replace=False)]
        objs.append(("person", "0") if i % 2 else ("dog", "0"))  # every test class with a positive has a negative
        imgs[f"{i:06d}"] = objs
    ids = sorted(imgs)
    return write_vocdevkit(base, imgs, {"trainval": ids[:n_train], "test": ids[n_train:]}, size=size,
                           class_files=VOC_CLASSES)


def tiny(voc, out, **kw) -> list[str]:
    sets = dict(voc=voc, out_dir=out, max_iter=2, batch_size=4, workers=0, eval_passes=1, progress="false",
                tensorboard="false", rescale="false", log_every=1, checkpoint_every=1, device="cpu")
    sets.update(kw)
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _run(argv) -> int:
    return C.main(C.get_args_parser().parse_args(argv))


# --------------------------------------------------------------------------------------------- the protocol
def _philkr_sigmoid_ce(f: np.ndarray, t: np.ndarray, ignore_label=255):
    """Transcription of philkr/voc-classification src/python_layers.py SigmoidCrossEntropyLoss (forward, diff)."""
    N = f.shape[0]
    mask = t != ignore_label
    lZ = np.log(1 + np.exp(-np.abs(f))) * mask
    dlZ = np.exp(np.minimum(f, 0)) / (np.exp(np.minimum(f, 0)) + np.exp(-np.maximum(f, 0))) * mask
    loss = np.sum(lZ + ((f > 0) - t) * f * mask) / N
    return loss, (dlZ - t * mask) / N


def test_sigmoid_cross_entropy_matches_philkr_layer():
    rng = np.random.default_rng(0)
    f = rng.normal(0, 3, (6, 20))
    ours = rng.choice([1, -1, 0], size=(6, 20), p=[0.3, 0.6, 0.1])  # 1 present, -1 absent, 0 difficult
    theirs = np.where(ours == 1, 1, np.where(ours == -1, 0, 255)).astype(np.float64)  # src/data.py's relabelling
    ref_loss, ref_grad = _philkr_sigmoid_ce(f, theirs)
    x = torch.tensor(f, requires_grad=True)
    loss = C.sigmoid_cross_entropy(x, torch.tensor(ours, dtype=torch.int8))
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=1e-9, atol=1e-12)


def test_ap_table_by_hand():
    labels = -np.ones((5, 20), np.int8)
    scores = np.zeros((5, 20))
    # aeroplane: ranked + - - + + -> sklearn AP (1 + 2/4 + 3/5) / 3 = 0.7; 11-point: recall >= 0..0.3 -> 1,
    # 0.4..0.6 -> 3/5 (max precision at recall >= t), 0.7..1 -> 3/5 => (4 + 7 * 0.6) / 11
    scores[:, 0], labels[:, 0] = [5, 4, 3, 2, 1], [1, -1, -1, 1, 1]
    # bicycle: a difficult image ranked first is ignored; the positive ranks first among the rest -> 1
    scores[:, 1], labels[:, 1] = [9, 8, 1, 1, 1], [0, 1, -1, -1, -1]
    r = C.ap_table(scores, labels)  # the other 18 classes have no positive: not evaluated
    assert r["ap"]["aeroplane"] == pytest.approx(0.7) and r["ap"]["bicycle"] == pytest.approx(1.0)
    assert r["ap_voc07_11pt"]["aeroplane"] == pytest.approx((4 + 7 * 0.6) / 11)
    assert r["num_classes_evaluated"] == 2 and r["ap"]["dog"] is None
    assert r["mAP"] == pytest.approx(0.85) and r["mAP_voc07_11pt"] == pytest.approx(((4 + 4.2) / 11 + 1) / 2)


def test_crop_params_follow_the_caffe_layer():
    g = torch.Generator().manual_seed(0)
    for h, w in ((375, 500), (500, 333), (200, 150)):
        smax = min(2.0, h / 227, w / 227)
        sides = []
        for _ in range(300):
            side, cx, cy, flip = C.crop_params(h, w, 227, 0.5, 2.0, True, g)
            s = side / 227
            assert min(0.5, smax) - 1e-9 <= s <= smax + 1e-9
            assert cx - min(side, w) / 2 >= -1e-6 and cx + min(side, w) / 2 <= w + 1e-6  # inside the image
            assert cy - min(side, h) / 2 >= -1e-6 and cy + min(side, h) / 2 <= h + 1e-6
            sides.append(s)
        if smax > 0.5:
            assert min(sides) < 0.5 + 0.1 * (smax - 0.5) and max(sides) > smax - 0.1 * (smax - 0.5)  # uniform range
        else:  # image smaller than the crop: always the whole short side
            assert np.allclose(sides, smax)
    side, cx, cy, flip = C.crop_params(375, 500, 227, 0.5, 2.0, True, None, center=True)
    assert side == pytest.approx(227 * (0.5 + 375 / 227) / 2) and (cx, cy, flip) == (250, 187.5, False)


def _caffe_transform(img: np.ndarray, side, cx, cy, flip, crop) -> np.ndarray:
    """Transcription of philkr/caffe (future) TransformationLayer::Forward_cpu for one image, no rotation, scale
    side/crop, translation (cx, cy): bilinear, the second neighbour clamped to the last pixel, 0 outside."""
    C_, bH, bW = img.shape
    s = side / crop
    out = np.zeros((C_, crop, crop))
    for y in range(crop):
        for x in range(crop):
            xx = (-s if flip else s) * (x - 0.5 * crop) + cx
            yy = s * (y - 0.5 * crop) + cy
            if 0 <= yy < bH and 0 <= xx < bW:
                x0, y0 = int(xx), int(yy)
                x1, y1 = min(x0 + 1, bW - 1), min(y0 + 1, bH - 1)
                wx, wy = x0 + 1 - xx, y0 + 1 - yy
                out[:, y, x] = (wx * wy * img[:, y0, x0] + (1 - wx) * wy * img[:, y0, x1]
                                + wx * (1 - wy) * img[:, y1, x0] + (1 - wx) * (1 - wy) * img[:, y1, x1])
    return out


@pytest.mark.parametrize("side, cx, cy, flip", [(13.0, 10.0, 8.0, False), (9.5, 9.3, 7.6, True), (17.0, 10.5, 9.0, False)])
def test_square_crop_matches_a_transcription_of_the_caffe_layer(side, cx, cy, flip):
    img = torch.rand(3, 17, 21, generator=torch.Generator().manual_seed(1))
    ours = C.square_crop(img, side, cx, cy, flip, 11).numpy()
    ref = _caffe_transform(img.numpy().astype(np.float64), side, cx, cy, flip, 11)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_iteration_sampler_ranks_union_and_resume():
    single = IterationSampler(10, 4, 0, 1, seed=3)
    single.set_range(0, 6)
    s = list(single)
    ranks = []
    for r in range(2):
        sm = IterationSampler(10, 2, r, 2, seed=3)
        sm.set_range(0, 6)
        ranks.append(list(sm))
    for it in range(6):  # every iteration: rank 0's half then rank 1's half is the single-process batch
        assert s[4 * it:4 * it + 4] == ranks[0][2 * it:2 * it + 2] + ranks[1][2 * it:2 * it + 2]
    assert sorted(i for i, _ in s[:10]) == list(range(10)) and sorted(i for i, _ in s[10:20]) == list(range(10))
    assert s[:10] != s[10:20] and len({seed for _, seed in s}) == 24  # a new permutation per pass, seeds per position
    resumed = IterationSampler(10, 4, 0, 1, seed=3)
    resumed.set_range(3, 6)
    assert list(resumed) == s[12:]


def test_freeze_levels_and_bad_settings(tmp_path):
    write_pretext_checkpoint(tmp_path / "z.pth", "zhang_vgg")
    model = C.Classifier(build_backbone(str(tmp_path / "z.pth"), rescale=False))
    assert len(C.freeze(model, "fc8")) == 2
    with pytest.raises(UserError, match="'fc6-8' needs fc6/fc7; zhang_vgg has none"):
        C.freeze(model, "fc6-8")
    model.train()
    assert not model.backbone.conv1[4].training  # frozen BatchNorm keeps its statistics
    for kv, msg in [("lr=-1", "'lr': must be > 0"), ("lr=nan", "'lr': must be a finite number"),
                    ("batch_size=0", "'batch_size': must be >= 1"), ("freeze=[fc7]", "'freeze': must be one of"),
                    ("input=rgb", "'input': must be one of"), ("min_scale=3", "min_scale <= max_scale"),
                    ("rows=[supervised]", "needs torchvision weights"), ("workers=-1", "'workers': must be >= 0")]:
        with pytest.raises(UserError, match=msg):  # refused while the config is read
            load_config(C.ClsConfig, None, ["voc=x", "checkpoint=c", kv])
    with pytest.raises(UserError, match="batch_size 6 \\(global\\) is not divisible by the 4 processes"):
        C.check_config(load_config(C.ClsConfig, None, ["voc=x", "checkpoint=c", "batch_size=6"]), world=4)
    out = tmp_path / "never"
    with pytest.raises(UserError, match="not a VOC folder"):
        _run(["--voc", str(tmp_path / "nowhere"), "--checkpoint", str(tmp_path / "z.pth"), "--set", f"out_dir={out}"])
    assert not out.exists()  # refused before the run folder is created


def test_config_files_load():
    for f in sorted((REPO / "configs" / "transfer").glob("voc07_cls_*.yaml")):
        cfg = load_config(C.ClsConfig, f, ["voc=x", "checkpoint=c", "supervised=alexnet:w"])
        assert (cfg.lr, cfg.batch_size, cfg.max_iter, cfg.weight_decay, cfg.grad_clip) == (1e-3, 16, 80_000, 1e-6, 10.0)
        assert (cfg.eval_passes, cfg.crop, cfg.min_scale, cfg.max_scale) == (10, 227, 0.5, 2.0) and cfg.out_dir.endswith(f.stem)


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("input_mode", ["gray", "color"])
def test_finetune_each_freeze_level(tmp_path, input_mode):
    voc = voc_fixture(tmp_path)
    write_pretext_checkpoint(tmp_path / "c.pth")
    out = tmp_path / "out"
    rescale = input_mode == "gray"  # the default (rescaled on 4 training crops) once, the plain export once
    argv = ["--checkpoint", str(tmp_path / "c.pth"), *tiny(voc, out, input=input_mode, freeze="[fc8,fc6-8,all]",
                                                           rescale=str(rescale).lower(), init_images=4)]
    assert _run(argv) == 0
    cfg = load_config(C.ClsConfig, None, [f"checkpoint={tmp_path / 'c.pth'}", *(a for a in argv[2:] if a != "--set")])
    images = C._init_batch(C.get_dataset(cfg)[0], 4, cfg.seed) if rescale else None
    torch.manual_seed(cfg.seed)
    start = C.Classifier(build_backbone(str(tmp_path / "c.pth"), rescale=rescale, images=images,
                                        input=input_mode)).state_dict()
    summary = json.loads((out / "results.json").read_text())
    trained_prefix = {"fc8": ("fc8.",), "fc6-8": ("fc8.", "backbone.fc6.", "backbone.fc7."), "all": ("",)}
    for level in ("fc8", "fc6-8", "all"):
        run = out / f"colorization_{level}"
        res = json.loads((run / "results.json").read_text())
        assert res == summary["runs"][f"colorization_{level}"]
        assert res["iterations"] == 2 and res["input"] == input_mode and "bit-identical" in res["frozen_check"]
        assert (res["backbone"]["rescale"]["images"] == 4) if rescale else res["backbone"]["rescale"] == "off"
        assert 0 <= res["mAP"] <= 1 and res["num_classes_evaluated"] >= 2
        evaluated = [v for v in res["ap"].values() if v is not None]
        assert res["mAP"] == pytest.approx(np.mean(evaluated))
        # frozen weights equal the pretext checkpoint's (independently rebuilt), trained ones moved
        sd = load_checkpoint(run / "checkpoint.pth")["model"]
        for k, v in sd.items():
            if k.startswith("fc8."):
                continue
            trained = any(k.startswith(p) for p in trained_prefix[level])
            assert torch.equal(v, start[k]) != trained, (level, k)
        lines = (run / "scores.csv").read_text().splitlines()
        assert lines[0] == "image_id," + ",".join(VOC_CLASSES) and len(lines) == 5
        assert [ln.split(",")[0] for ln in lines[1:]] == ["000008", "000009", "000010", "000011"]
        assert (run / "ap_per_class.png").stat().st_size > 0 and (run / "log.jsonl").is_file()
    md = (out / "results.md").read_text()
    assert (out / "ap_per_class.png").is_file() and "| colorization | all |" in md
    if input_mode == "gray":
        assert "| 52.4 |" in md and "| 61.5 |" in md and "| 65.9 |" in md  # Table 2 beside ours
    else:
        assert "| 65.6 |" in md


def test_scores_csv_recomputes_the_ap(tmp_path):
    voc = voc_fixture(tmp_path)
    write_pretext_checkpoint(tmp_path / "c.pth")
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(tmp_path / "c.pth"), *tiny(voc, out, freeze="[fc8]", eval_passes=2, eval_every=1)]) == 0
    log = [json.loads(ln) for ln in (out / "colorization_fc8" / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in log] == ["train", "eval", "train"] and 0 <= log[1]["mAP"] <= 1  # eval_every=1
    rows = [ln.split(",") for ln in (out / "colorization_fc8" / "scores.csv").read_text().splitlines()[1:]]
    scores = np.array([[float(v) for v in r[1:]] for r in rows])
    from transfer.voc import load_voc_split

    _, labels, _ = load_voc_split(voc, "test", labels="imagesets")
    res = json.loads((out / "colorization_fc8" / "results.json").read_text())
    assert C.ap_table(scores, labels)["mAP"] == pytest.approx(res["mAP"], abs=1e-6)


def test_baseline_rows_in_one_command(tmp_path):
    voc = voc_fixture(tmp_path)
    write_torchvision_alexnet(tmp_path / "alexnet.pth")
    out = tmp_path / "out"
    assert _run(tiny(voc, out, rows="[random,supervised]", freeze="[fc8]", supervised=f"alexnet:{tmp_path / 'alexnet.pth'}",
                     input="color", max_iter=1, eval_crop="center", eval_passes=10)) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert set(runs) == {"random_fc8", "supervised_fc8"} and runs["random_fc8"]["eval"].startswith("1 x center")
    assert runs["random_fc8"]["backbone"]["init"] == "gaussian" and runs["supervised_fc8"]["backbone"]["source"] == "supervised"
    assert "| supervised | fc8 | color |" in (out / "results.md").read_text() and "| 76.8 |" in (out / "results.md").read_text()


@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
def test_shared_voc_sample(tmp_path):
    write_pretext_checkpoint(tmp_path / "c.pth")
    out = tmp_path / "out"
    voc = SHARED / "voc_sample" / "bbox_detection"
    for inp in ("gray", "color"):
        argv = ["--checkpoint", str(tmp_path / "c.pth"),
                *tiny(voc, out / inp, freeze="[fc8,all]", labels="xml", fallback_split="all", input=inp, max_iter=1,
                      batch_size=3)]
        assert _run(argv) == 0
        res = json.loads((out / inp / "results.json").read_text())["runs"]
        assert set(res) == {"colorization_fc8", "colorization_all"}
        # 3 real VOC2012 images: person in two, bus and car in the third; the other 17 classes have no positive
        r = res["colorization_all"]
        assert r["num_test"] == 3 and r["num_classes_evaluated"] == 3 and r["ap"]["cat"] is None
        assert all(r["ap"][c] is not None for c in ("person", "bus", "car"))


def test_cli_group(tmp_path, capsys):
    from pretext import cli

    voc = voc_fixture(tmp_path, 4, 2)
    write_pretext_checkpoint(tmp_path / "c.pth")
    assert cli.main(["transfer", "cls", "--checkpoint", str(tmp_path / "c.pth"),
                     *tiny(voc, tmp_path / "out", freeze="[fc8]", max_iter=1)]) == 0
    assert (tmp_path / "out" / "results.md").is_file()
    assert cli.main(["transfer", "cls", "--voc", str(voc)]) == 2  # one line, no traceback
    assert "error: row 'colorization' needs a pretext checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["transfer", "--help"])
    assert "cls" in capsys.readouterr().out


def _subprocess(args, env_extra=None, cwd=REPO):
    # the same thread count as this process: CPU kernels sum in a thread-dependent order (bit-identity tests)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()), **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_exact_resume_after_a_crash(tmp_path):
    voc = voc_fixture(tmp_path)
    write_pretext_checkpoint(tmp_path / "c.pth")
    common = ["--checkpoint", str(tmp_path / "c.pth")]
    kw = dict(freeze="[all]", max_iter=4, checkpoint_every=2)
    assert _run(common + tiny(voc, tmp_path / "straight", **kw)) == 0
    crashed = _subprocess(["-m", "transfer.classification", *common, *tiny(voc, tmp_path / "crash", **kw)],
                          {"CROSSCHANNEL_FAULT_AT_STEP": "2"})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert load_checkpoint(tmp_path / "crash" / "colorization_all" / "checkpoint.pth")["iter"] == 2
    again = _subprocess(["-m", "transfer.classification", *common, *tiny(voc, tmp_path / "crash", **kw)])
    assert again.returncode == 2 and "pass --resume" in again.stderr
    assert _run(common + tiny(voc, tmp_path / "crash", **kw) + ["--resume"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "colorization_all" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "crash" / "colorization_all" / "checkpoint.pth")
    assert a["iter"] == b["iter"] == 4
    for k in a["model"]:  # bit-identical: data order, crops and dropout masks continue exactly
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())["runs"]["colorization_all"]
    rb = json.loads((tmp_path / "crash" / "results.json").read_text())["runs"]["colorization_all"]
    assert ra["ap"] == rb["ap"]
    assert _run(common + tiny(voc, tmp_path / "crash", **kw) + ["--resume"]) == 0  # finished: kept, not redone


@pytest.mark.slow
def test_ddp_two_processes_gloo_equals_one_process(tmp_path):
    voc = voc_fixture(tmp_path)
    write_pretext_checkpoint(tmp_path / "c.pth")
    # dropout off: then two processes with half the batch each compute exactly the single-process update
    kw = dict(freeze="[fc6-8]", max_iter=3, dropout=0.0)
    common = ["--checkpoint", str(tmp_path / "c.pth")]
    assert _run(common + tiny(voc, tmp_path / "one", **kw)) == 0
    r = _subprocess(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                     "transfer.classification", *common, *tiny(voc, tmp_path / "two", **kw)])
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "colorization_fc6-8" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "two" / "colorization_fc6-8" / "checkpoint.pth")
    assert len(b["rng_per_rank"]) == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    ra = json.loads((tmp_path / "one" / "results.json").read_text())["runs"]["colorization_fc6-8"]
    rb = json.loads((tmp_path / "two" / "results.json").read_text())["runs"]["colorization_fc6-8"]
    assert ra["mAP"] == pytest.approx(rb["mAP"], abs=1e-6) and rb["num_test"] == 4


def test_checkpoint_written_by_pretext_train(tmp_path):
    """A checkpoint as ``pretext.train`` writes it (two steps on the embedded sample), fine-tuned end to end."""
    from pretext import train

    args = [f"data=[{REPO / 'pretext' / 'sample' / 'train'}]", "size=96", "model=alexnet_cc", "model_kwargs={fc_dim: 16}",
            "loss=ce", "init=default", "batch_size=4", "max_steps=2", "max_images=8", "workers=0", "device=cpu",
            "progress=false", "image_every=0", "tensorboard=false", f"out_dir={tmp_path / 'pretext'}"]
    assert train.main(train.get_args_parser().parse_args([a for kv in args for a in ("--set", kv)])) == 0
    voc = voc_fixture(tmp_path, 4, 2)
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(tmp_path / "pretext" / "checkpoint.pth"),
                 *tiny(voc, out, freeze="[all]", max_iter=1, rescale="true", init_images=2)]) == 0
    res = json.loads((out / "colorization_all" / "results.json").read_text())
    assert res["backbone"]["model_name"] == "alexnet_cc" and res["backbone"]["step"] == 2
    assert len(res["backbone"]["rescale"]["ratios"]) == 8


# --------------------------------------------------------------------------------------------- signals, lock, resume
def _sample_cmd(ckpt: Path, out: Path, *extra, **kw) -> list[str]:
    """A real subprocess on ../shared/data/voc_sample (3 VOC2012 images, labels from the XML) with a small
    random-init pretext AlexNet (fc6/fc7 32 wide)."""
    sets = dict(labels="xml", fallback_split="all", freeze="[all]", batch_size=3, max_iter=40, checkpoint_every=1000)
    sets.update(kw)
    return [sys.executable, "-m", "pretext.cli", "transfer", "cls", "--voc", str(SHARED / "voc_sample" / "bbox_detection"),
            "--checkpoint", str(ckpt), *tiny(SHARED / "voc_sample" / "bbox_detection", out, **sets), *extra]


def _env1() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _start_and_wait(cmd: list[str], log_file: Path, records: int = 2) -> subprocess.Popen:
    """Start ``cmd`` and return once its log holds ``records`` lines (it is training)."""
    p = subprocess.Popen(cmd, env=_env1(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (
            log_file.is_file() and len(log_file.read_text().splitlines()) >= records):
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-2000:]
    return p


def _train_iters(log_file: Path) -> list[int]:
    return [r["iter"] for r in map(json.loads, log_file.read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
def test_sigterm_checkpoints_exits_143_and_resume_equals_an_uninterrupted_run(tmp_path):
    write_pretext_checkpoint(tmp_path / "c.pth")
    ref = subprocess.run(_sample_cmd(tmp_path / "c.pth", tmp_path / "ref"), env=_env1(), capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "cut"
    run_dir = out / "colorization_all"
    p = _start_and_wait(_sample_cmd(tmp_path / "c.pth", out), run_dir / "log.jsonl")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "SIGTERM received" in err and "continue with: python -m pretext.cli transfer cls" in last
    assert last.endswith("--resume") and str(out) in last
    cut = load_checkpoint(run_dir / "checkpoint.pth")["iter"]
    assert 2 <= cut < 40 and not (run_dir / "results.json").exists()
    # resuming with another learning rate is another experiment: refused in one line, nothing recorded
    changed = subprocess.run(_sample_cmd(tmp_path / "c.pth", out, "--resume", lr=0.01), env=_env1(),
                             capture_output=True, text=True, timeout=600)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-2000:]
    assert "resuming with a changed config (lr: 0.001 -> 0.01); pass --allow-config-change" in changed.stderr
    assert not (run_dir / "config_history.jsonl").exists()
    # the printed command continues the run, to the weights and AP of the uninterrupted run
    done = subprocess.run(shlex.split(last.split("continue with: ", 1)[1].replace("python", sys.executable, 1)),
                          env=_env1(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_checkpoint(tmp_path / "ref" / "colorization_all" / "checkpoint.pth")
    b = load_checkpoint(run_dir / "checkpoint.pth")
    assert a["iter"] == b["iter"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra = json.loads((tmp_path / "ref" / "colorization_all" / "results.json").read_text())
    rb = json.loads((run_dir / "results.json").read_text())
    assert ra["ap"] == rb["ap"] and rb["iterations"] == 40
    assert _train_iters(run_dir / "log.jsonl") == list(range(1, 41))  # the redone steps are not logged twice


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 130), (signal.SIGUSR1, 138)])
def test_sigint_and_sigusr1_also_stop_at_a_checkpoint(tmp_path, sig, rc):
    write_pretext_checkpoint(tmp_path / "c.pth")
    out = tmp_path / "out"
    p = _start_and_wait(_sample_cmd(tmp_path / "c.pth", out, max_iter=400), out / "colorization_all" / "log.jsonl")
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == rc, err[-2000:]
    assert f"{signal.Signals(sig).name} received" in err and err.strip().splitlines()[-1].endswith("--resume")
    assert "Traceback" not in err
    ck = load_checkpoint(out / "colorization_all" / "checkpoint.pth")
    assert 2 <= ck["iter"] < 400 and _train_iters(out / "colorization_all" / "log.jsonl")[-1] == ck["iter"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
def test_two_processes_on_one_out_dir(tmp_path):
    """The second run into a folder in use is refused in one line naming the holder; once the holder is killed
    (SIGKILL: no clean-up at all), its lock is gone with it and the folder can be resumed."""
    write_pretext_checkpoint(tmp_path / "c.pth")
    out = tmp_path / "out"
    first = _start_and_wait(_sample_cmd(tmp_path / "c.pth", out, max_iter=100_000), out / "colorization_all" / "log.jsonl")
    try:
        second = subprocess.run(_sample_cmd(tmp_path / "c.pth", out, "--resume", max_iter=2), env=_env1(),
                                capture_output=True, text=True, timeout=600)
    finally:
        first.kill()
        first.communicate(timeout=60)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert f"{out} is in use by another run (pid {first.pid} on " in lines[0]
    assert _train_iters(out / "colorization_all" / "log.jsonl")[0] == 1  # the holder's log, untouched
    again = subprocess.run(_sample_cmd(tmp_path / "c.pth", out, "--resume", max_iter=2), env=_env1(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "colorization_all" / "results.json").is_file()


def test_resume_from_another_runs_checkpoint_needs_force(tmp_path):
    voc = voc_fixture(tmp_path, 4, 2)
    write_pretext_checkpoint(tmp_path / "c.pth")
    common = ["--checkpoint", str(tmp_path / "c.pth")]
    assert _run(common + tiny(voc, tmp_path / "a", freeze="[fc8]", max_iter=1)) == 0
    assert _run(common + tiny(voc, tmp_path / "b", freeze="[fc8]", max_iter=2, seed=1)) == 0
    own = tmp_path / "a" / "colorization_fc8" / "checkpoint.pth"
    other = tmp_path / "b" / "colorization_fc8" / "checkpoint.pth"
    before = own.read_bytes()
    with pytest.raises(UserError, match="holds another run's checkpoint; resuming from .* would overwrite it"):
        _run(common + tiny(voc, tmp_path / "a", freeze="[fc8]", max_iter=3, seed=1) + ["--resume", str(other)])
    assert own.read_bytes() == before
    assert _run(common + tiny(voc, tmp_path / "a", freeze="[fc8]", max_iter=3, seed=1) + ["--resume", str(own)]) == 0
    assert own.read_bytes() == before  # its own checkpoint of a finished run: results kept, nothing redone
    assert _run(common + tiny(voc, tmp_path / "a", freeze="[fc8]", max_iter=3, seed=1) +
                ["--resume", str(other), "--force"]) == 0
    ck = load_checkpoint(own)
    assert ck["iter"] == 3 and ck["config"]["seed"] == 1
    assert json.loads((tmp_path / "a" / "colorization_fc8" / "results.json").read_text())["iterations"] == 3


def test_config_change_on_resume_is_refused_unless_allowed_then_recorded(tmp_path):
    voc = voc_fixture(tmp_path, 4, 2)
    write_pretext_checkpoint(tmp_path / "c.pth")
    common = ["--checkpoint", str(tmp_path / "c.pth")]
    out = tmp_path / "out"
    assert _run(common + tiny(voc, out, freeze="[fc8]", max_iter=2)) == 0
    run_dir = out / "colorization_fc8"
    (run_dir / "results.json").unlink()  # as if stopped right after its last checkpoint
    config_before = (out / "config.yaml").read_text()
    for kv, what in (("lr=0.01", "lr: 0.001 -> 0.01"), ("batch_size=2", "batch_size: 4 -> 2"),
                     (f"voc={tmp_path}", "voc: ")):
        with pytest.raises(UserError, match=f"resuming with a changed config \\({what}"):
            _run(common + tiny(voc, out, freeze="[fc8]", max_iter=3) + ["--set", kv, "--resume"])
    assert (out / "config.yaml").read_text() == config_before and not (run_dir / "config_history.jsonl").exists()
    assert _run(common + tiny(voc, out, freeze="[fc8]", max_iter=3, lr=0.01) + ["--resume", "--allow-config-change"]) == 0
    hist = [json.loads(ln) for ln in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert len(hist) == 1 and hist[0]["step"] == 2
    assert hist[0]["changes"] == {"lr": {"old": 0.001, "new": 0.01}, "max_iter": {"old": 2, "new": 3}}
    assert load_checkpoint(run_dir / "checkpoint.pth")["iter"] == 3


def test_resume_drops_redone_log_records_a_torn_line_and_stale_tmp_files(tmp_path):
    voc = voc_fixture(tmp_path, 4, 2)
    write_pretext_checkpoint(tmp_path / "c.pth")
    common = ["--checkpoint", str(tmp_path / "c.pth")]
    out = tmp_path / "out"
    assert _run(common + tiny(voc, out, freeze="[fc8]", max_iter=2)) == 0
    run_dir = out / "colorization_fc8"
    (run_dir / "results.json").unlink()
    # a killed run had logged steps 3 and 4 after its checkpoint at 2, died mid-line and mid-checkpoint-write
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(dict(kind="train", iter=3, loss=9.0)) + "\n" + json.dumps(dict(kind="train", iter=4)) + "\n")
        f.write('{"kind": "train", "it')
    tmp_files = [run_dir / ".checkpoint.pth.x1y2.tmp", out / ".config.yaml.abc.tmp"]
    for t in tmp_files:
        t.write_bytes(b"half")
    assert _run(common + tiny(voc, out, freeze="[fc8]", max_iter=4) + ["--resume"]) == 0
    assert _train_iters(run_dir / "log.jsonl") == [1, 2, 3, 4]
    assert all(r.get("loss") != 9.0 for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()))
    assert not any(t.exists() for t in tmp_files)


@pytest.mark.parametrize("argv, expected", [
    (["/x/pretext/cli.py", "transfer", "cls", "--voc", "my data/VOC2007"],
     "python -m pretext.cli transfer cls --voc 'my data/VOC2007' --resume"),
    (["/x/transfer/classification.py", "--resume", "/r/a b.pth", "--force", "--set", "lr=0.1"],
     "python -m transfer.classification --force --set lr=0.1 --resume"),
    (["/usr/bin/crosschannel", "transfer", "cls", "--resume=/r/c.pth", "--resume"], "crosschannel transfer cls --resume"),
])
def test_resume_command_continues_from_the_run_folder(monkeypatch, argv, expected):
    monkeypatch.setattr(sys, "argv", argv)
    assert C.resume_command() == expected
