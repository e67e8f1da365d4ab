"""The pretext trainer: a real short CPU run, exact resume after SIGKILL, DDP (gloo) equivalence, bad data."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pretext.data import is_grey, pil_to_tensor, read_image
from pretext.runtime import load_checkpoint, read_jsonl
from pretext.train import ShardedSampler

REPO = Path(__file__).resolve().parents[1]

# a tiny AlexNet without BatchNorm where exact cross-process equality is asserted (per-rank BN statistics are a
# legitimate difference under DDP; SyncBatchNorm exists only on GPU)
TINY = ["model=alexnet_cc", "model_kwargs.fc_dim=32", "size=96", "workers=0", "tensorboard=false",
        "progress=false", "log_every=1", "lr=1e-3", "loss=ce", "image_every=0", "init=default", "crop=rrc"]

# crash injection for the resume tests: the trainer itself has no hook; this wrapper kills the process (SIGKILL, as a
# scheduler or the OOM killer would) when train_step is called for step FAULT_AT_STEP + 1, i.e. after that many steps
_FAULT_WRAPPER = """
import os, signal, sys
import pretext.train as t
from pretext.runtime import run_entry
fault, calls, orig = int(os.environ["FAULT_AT_STEP"]), [0], t.train_step
def train_step(*a, **k):
    calls[0] += 1
    if calls[0] == fault + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(*a, **k)
t.train_step = train_step
sys.exit(run_entry(t.main, t.get_args_parser()))
"""


def _colour_images(sample_dir: Path, n: int, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    k = 0
    for p in sorted((sample_dir / "train").iterdir()):
        if k < n and not is_grey(pil_to_tensor(read_image(p))):
            shutil.copy(p, dest / p.name)
            k += 1
    return dest


def _train(args, env=None, nproc=1, check=True, fault_at=0, tmp=None):
    if fault_at:  # run the trainer through the crash-injecting wrapper
        script = Path(tmp) / "fault_train.py"
        script.write_text(_FAULT_WRAPPER)
        env = {**(env or {}), "FAULT_AT_STEP": str(fault_at), "PYTHONPATH": str(REPO)}
        entry = [str(script)]
    else:
        entry = ["-m", "pretext.train"]
    base = [sys.executable, *entry] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry]
    cmd = base + [a for kv in args for a in ("--set", kv) if not kv.startswith("--")] + [a for a in args if a.startswith("--")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoint.pth")["model"]


def test_sampler_shards_are_the_single_process_batches():
    one = ShardedSampler(40, batch=4, rank=0, world=1, seed=3)
    two = [ShardedSampler(40, batch=2, rank=r, world=2, seed=3) for r in range(2)]
    a = [i for i, _ in one]
    b0, b1 = [[i for i, _ in s] for s in two]
    for k in range(len(a) // 4):
        assert sorted(a[4 * k: 4 * k + 4]) == sorted(b0[2 * k: 2 * k + 2] + b1[2 * k: 2 * k + 2])
    # per-sample augmentation seeds agree too, and resuming mid-epoch continues the same stream
    seeds1 = dict(iter(one))
    assert all(seeds1[i] == s for smp in two for i, s in smp)
    one.set_epoch(0, start_batch=3)
    assert [i for i, _ in one] == a[12:]
    one.set_epoch(1)
    assert sorted(i for i, _ in one) == sorted(a) and [i for i, _ in one] != a


def test_short_run_writes_everything_and_skips_bad_images(tmp_path, sample_dir):
    data = _colour_images(sample_dir, 6, tmp_path / "data")
    Image.open(data / sorted(os.listdir(data))[0]).convert("L").save(data / "grey.png")
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    run = tmp_path / "run"
    r = _train([f"data={data}", f"val_data={data}", f"out_dir={run}", "max_steps=4", "batch_size=4", "checkpoint_every=2",
                *TINY, "image_every=2", "tensorboard=true"])
    for name in ("checkpoint.pth", "config.yaml", "log.jsonl", "log.txt", "loss.png", "images/step_0000004.png"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    recs = [x for x in read_jsonl(run / "log.jsonl") if x["kind"] == "train"]
    assert [x["step"] for x in recs] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in recs)
    assert recs[-1]["skipped"] >= 1 and recs[-1]["grey"] >= 1  # 8 images, 2 epochs of 2 batches of 4
    assert "corrupt.jpg" in r.stderr
    ck = load_checkpoint(run / "checkpoint.pth")
    assert ck["step"] == 4 and ck["target"] == "ab313" and ck["bins"].shape == (313, 2)
    # an existing run is not silently overwritten
    r2 = _train([f"data={data}", f"out_dir={run}", "max_steps=2", *TINY], check=False)
    assert r2.returncode == 2 and "pass --resume" in r2.stderr


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, sample_dir):
    data = _colour_images(sample_dir, 12, tmp_path / "data")
    common = [f"data={data}", "max_steps=7", "batch_size=4", "checkpoint_every=2", *TINY, "model_kwargs.norm=bn"]
    _train(common + [f"out_dir={tmp_path / 'full'}"])
    crashed = _train(common + [f"out_dir={tmp_path / 'crash'}"], fault_at=5, tmp=tmp_path, check=False)
    assert crashed.returncode == -9  # SIGKILL after step 5; last checkpoint is step 4
    assert load_checkpoint(tmp_path / "crash" / "checkpoint.pth")["step"] == 4
    _train(common + [f"out_dir={tmp_path / 'crash'}", "--resume"])
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "crash")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path, sample_dir):
    data = _colour_images(sample_dir, 8, tmp_path / "data")
    # SGD, not Adam: Adam's first steps are ~lr x sign(gradient), which turns the float noise of a near-zero gradient
    # element (summed in another order across processes) into a full step (see test_gradient_accumulation...)
    common = [f"data={data}", "max_steps=3", "checkpoint_every=100", *TINY, "model_kwargs.norm=none", "optimizer=sgd"]
    _train(common + ["batch_size=4", f"out_dir={tmp_path / 'one'}"])
    _train(common + ["batch_size=2", f"out_dir={tmp_path / 'two'}"], nproc=2)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert not any(k.startswith("module.") for k in b)  # the unwrapped model is checkpointed
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    from pretext.models import create_model
    from pretext.runtime import seed_everything

    seed_everything(0)  # the trainer's initialisation: the weights moved by far more than the tolerance
    init = create_model("alexnet_cc", out_dim=313, fc_dim=32, norm="none").state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3


@pytest.mark.parametrize("model,kwargs,loss,points", [
    ("zhang_vgg", {}, "rebal", 0),
    ("vgg16_hypercolumn", {"width_mult": 0.125, "fc_dim": 32, "hidden": 32}, "hue_chroma", 16),
    ("vgg16_hypercolumn", {"width_mult": 0.125, "fc_dim": 32, "hidden": 32}, "rebal", 16),
    ("timm:resnet18", {}, "l2", 0),
    ("alexnet_cc", {"fc_dim": 32}, "hue_chroma", 0),
])
def test_every_network_and_loss_trains(tmp_path, sample_dir, model, kwargs, loss, points):
    from pretext.encoding import load_bins
    from pretext.models import model_from_checkpoint
    from pretext.predict import predict_ab
    from pretext.prior import compute_prior, save_prior
    from pretext.train import PretextConfig, run

    data = _colour_images(sample_dir, 4, tmp_path / "data")
    save_prior(compute_prior(sorted(data.iterdir()), load_bins(), size=48, workers=0, progress=False), tmp_path / "p.npz", "t")
    size = 96 if model == "alexnet_cc" else 64
    cfg = PretextConfig(data=[str(data)], model=model, model_kwargs=kwargs, loss=loss, points_per_image=points,
                        prior=str(tmp_path / "p.npz"), size=size, batch_size=2, max_steps=2, workers=0, lr=1e-4,
                        out_dir=str(tmp_path / "run"), tensorboard=False, progress=False, log_every=1, image_every=2,
                        checkpoint_every=2, init="default", crop="rrc")
    assert run(cfg) == 0
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    net = model_from_checkpoint(ck).eval()
    L = torch.rand(1, 1, 40, 56) * 100
    ab = predict_ab(net, L, ck["target"], ck["bins"], size=size)
    assert ab.shape == (1, 2, 40, 56) and torch.isfinite(ab).all()
    assert (tmp_path / "run" / "images" / "step_0000002.png").exists()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, sample_dir):
    from pretext.train import PretextConfig, run

    data = _colour_images(sample_dir, 10, tmp_path / "data")
    # SGD: linear in the gradient. (Adam's first steps are ~lr * sign(gradient), which turns the summation-order noise
    # of a near-zero gradient element into a full step; the released loss normalisation, a sum over pixels divided
    # by the batch size, makes the accumulated gradient equal the large batch's exactly otherwise.)
    common = dict(data=[str(data)], model="alexnet_cc", model_kwargs={"fc_dim": 32, "norm": "none"}, size=96,
                  loss="ce", max_steps=3, workers=0, optimizer="sgd", lr=1e-3, tensorboard=False, progress=False,
                  image_every=0, checkpoint_every=100, init="default", crop="rrc")
    run(PretextConfig(**common, batch_size=4, accum_steps=1, out_dir=str(tmp_path / "big")))
    run(PretextConfig(**common, batch_size=2, accum_steps=2, out_dir=str(tmp_path / "accum")))
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "accum")
    from pretext.models import create_model
    from pretext.runtime import seed_everything

    seed_everything(0)  # the trainer's initialisation: the weights moved by far more than the tolerance
    init = create_model("alexnet_cc", out_dim=313, fc_dim=32, norm="none").state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-2
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k


@pytest.mark.slow
def test_ddp_sigkill_then_resume_equals_uninterrupted(tmp_path, sample_dir):
    # sparse pixel sampling draws from per-rank generators: their states must be saved per rank
    data = _colour_images(sample_dir, 8, tmp_path / "data")
    common = [f"data={data}", "max_steps=5", "batch_size=2", "checkpoint_every=2", "size=64", "workers=0",
              "tensorboard=false", "progress=false", "log_every=1", "lr=1e-3", "loss=ce", "image_every=0",
              "init=default", "crop=rrc", "model=vgg16_hypercolumn", "model_kwargs.width_mult=0.125", "model_kwargs.fc_dim=16",
              "model_kwargs.hidden=16", "model_kwargs.bn=false", "points_per_image=8"]
    _train(common + [f"out_dir={tmp_path / 'full'}"], nproc=2)
    crashed = _train(common + [f"out_dir={tmp_path / 'crash'}"], nproc=2, fault_at=3, tmp=tmp_path, check=False)
    assert crashed.returncode != 0
    ck = load_checkpoint(tmp_path / "crash" / "checkpoint.pth")
    assert ck["step"] == 2 and len(ck["rng_per_rank"]) == 2
    assert not torch.equal(ck["rng_per_rank"][0]["points_rng"], ck["rng_per_rank"][1]["points_rng"])
    _train(common + [f"out_dir={tmp_path / 'crash'}", "--resume"], nproc=2)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "crash")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------- the released recipes
def _caffe_lr(solvers, it):
    """Caffe's learning rate at iteration ``it`` for a chain of solvers, each (base_lr, policy, gamma, stepsize,
    max_iter), a solver resuming at its predecessor's max_iter (train_alexnet/train_model.sh)."""
    for base_lr, policy, gamma, stepsize, max_iter in solvers:
        if it < max_iter:
            return base_lr if policy == "fixed" else base_lr * gamma ** (it // stepsize)
    raise ValueError(it)


# transcribed from the solver files (the values, not the files)
ALEXNET_SOLVERS = [(3e-5, "fixed", 0.1, 100000, 240000), (1e-5, "fixed", 0.1, 100000, 300000),  # solver0, solver1
                   (3e-6, "fixed", 0.1, 100000, 400000), (1e-6, "fixed", 0.1, 100000, 450000)]  # solver2, solver3
VGG_SOLVER = [(3.16e-5, "step", 0.316, 215000, 500000)]  # train/solver.prototxt
PAPER_SCHEDULE = [(3e-5, "fixed", 0, 1, 200000), (1e-5, "fixed", 0, 1, 375000), (3e-6, "fixed", 0, 1, 450000)]


@pytest.mark.parametrize("name,solvers,released", [
    ("alexnet_cc_rebal_in1k_180px", ALEXNET_SOLVERS, dict(
        size=180, model="alexnet_cc", batch_size=80, betas=(0.9, 0.999), weight_decay=1e-3, bias_lr_mult=2.0,
        bias_decay_mult=0.0, k=10, sigma=5.0, lam=0.5, grey_thresh=5.0, target_sampling="point", loss="rebal",
        loss_norm="batch", init="kmeans", init_images=800)),
    ("zhang_vgg_rebal_in1k_176px", VGG_SOLVER, dict(
        size=176, model="zhang_vgg", batch_size=40, betas=(0.9, 0.99), weight_decay=1e-3, bias_lr_mult=1.0,
        bias_decay_mult=1.0, k=10, sigma=5.0, lam=0.5, grey_thresh=5.0, target_sampling="point", loss="rebal",
        loss_norm="batch", init="kmeans")),
    ("zhang_vgg_rebal_in1k_176px_paper_schedule", PAPER_SCHEDULE, dict(size=176, model="zhang_vgg", batch_size=40,
                                                                       betas=(0.9, 0.99), weight_decay=1e-3)),
])
def test_configs_follow_the_released_solvers(name, solvers, released):
    from pretext.runtime import load_config
    from pretext.train import PretextConfig, check_config, lr_at

    cfg = load_config(PretextConfig, REPO / "configs" / "pretext" / f"{name}.yaml")
    check_config(cfg)
    assert cfg.max_steps == solvers[-1][-1]
    for k, v in released.items():
        assert getattr(cfg, k) == (tuple(v) if isinstance(v, tuple) else v), k
    # every iteration where Caffe's rate changes, and either side of it
    edges = {0, cfg.max_steps - 1} | {e + d for *_, stepsize, max_iter in solvers for e in (stepsize, max_iter)
                                      for d in (-1, 0, 1) if 0 <= e + d < cfg.max_steps}
    edges |= {m * 215000 + d for m in (1, 2) for d in (-1, 0, 1)}
    for it in sorted(edges):
        assert lr_at(cfg, it) == pytest.approx(_caffe_lr(solvers, it), rel=1e-9), it
    # the dataclass defaults are the released VGG recipe
    if name == "zhang_vgg_rebal_in1k_176px":
        default = PretextConfig()
        for k in ("lr", "lr_steps", "lr_gamma", "max_steps", "betas", "weight_decay", "k", "batch_size", "size"):
            assert getattr(default, k) == getattr(cfg, k), k


def test_parameter_groups_mirror_caffe_lr_mult_and_decay_mult():
    from pretext.models import create_model
    from pretext.runtime import load_config
    from pretext.train import PretextConfig, build_optimizer, optimizer_step

    cfg = load_config(PretextConfig, REPO / "configs" / "pretext" / "alexnet_cc_rebal_in1k_180px.yaml")
    model = create_model("alexnet_cc", fc_dim=16)
    opt = build_optimizer(cfg, model)
    weights, biases = opt.param_groups
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and {id(p) for p in biases["params"]} == {id(c.bias) for c in convs}
    assert {id(p) for p in weights["params"]} == {id(c.weight) for c in convs}  # no BatchNorm parameters
    assert (weights["weight_decay"], biases["weight_decay"]) == (1e-3, 0.0)  # decay_mult 1 / 0
    assert opt.defaults["betas"] == (0.9, 0.999)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer_step(model, opt, None, cfg, lr_at_0 := 3e-5)
    assert (weights["lr"], biases["lr"]) == (lr_at_0, 2 * lr_at_0)  # lr_mult 1 / 2
    # the VGG net: no param {} in colorization_train_val_v2.prototxt, Caffe's default 1 / 1 for every blob
    vgg = build_optimizer(PretextConfig(), create_model("zhang_vgg"))
    assert [g["weight_decay"] for g in vgg.param_groups] == [1e-3, 1e-3]
    assert [g["lr_mult"] for g in vgg.param_groups] == [1.0, 1.0]


def test_alexnet_targets_point_sampled_and_logits_resized_as_released():
    """180 px: 12x12 logits resized (bilinear, corners aligned: the Resize layer) to the 23x23 stride-8 targets."""
    from pretext.models import create_model
    from pretext.train import PretextConfig, output_and_targets

    model = create_model("alexnet_cc", fc_dim=8).eval()
    L = torch.rand(2, 1, 180, 180) * 100
    ab = torch.randn(2, 2, 180, 180) * 30
    with torch.no_grad():
        logits = model(L)
        out, ab_t = output_and_targets(model, L, ab, PretextConfig(), None)
        _, ab_area = output_and_targets(model, L, ab, PretextConfig(target_sampling="area"), None)
    assert logits.shape[-2:] == (12, 12) and out.shape[-2:] == ab_t.shape[-2:] == ab_area.shape[-2:] == (23, 23)
    assert torch.equal(ab_t, ab[..., ::8, ::8])
    assert torch.allclose(ab_area[..., 1, 1], ab[..., 8:16, 8:16].mean((-2, -1)), atol=1e-4)
    # Resize: output i samples input i * (12 - 1) / (23 - 1) = i / 2
    torch.testing.assert_close(out[..., ::2, ::2], logits)
    torch.testing.assert_close(out[..., 1, 1], logits[..., :2, :2].mean((-2, -1)))
    # the VGG net: 44x44 logits and targets at 176 px, no resize
    vgg = create_model("zhang_vgg").eval()
    with torch.no_grad():
        out, ab_t = output_and_targets(vgg, L[..., :176, :176], ab[..., :176, :176], PretextConfig(), None)
    assert out.shape[-2:] == ab_t.shape[-2:] == (44, 44) and torch.equal(ab_t, ab[..., :176:4, :176:4])


def test_data_dependent_init_runs_once_at_step_0_and_never_on_resume(tmp_path, sample_dir, monkeypatch):
    import pretext.init
    from pretext.train import PretextConfig, run

    calls = []
    real = pretext.init.data_dependent_init

    def spy(model, x, mode="kmeans", **kw):
        calls.append((type(model).__name__, tuple(x.shape), float(x.min()), float(x.max()), mode))
        return real(model, x, mode=mode, **kw)

    monkeypatch.setattr(pretext.init, "data_dependent_init", spy)
    data = _colour_images(sample_dir, 6, tmp_path / "data")
    common = dict(data=[str(data)], model="alexnet_cc", model_kwargs={"fc_dim": 32}, size=96, loss="ce", workers=0,
                  lr=1e-3, tensorboard=False, progress=False, image_every=0, checkpoint_every=1, crop="rrc",
                  batch_size=2, init_images=5, out_dir=str(tmp_path / "run"))
    run(PretextConfig(**common, max_steps=1, init="kmeans"))
    assert len(calls) == 1
    name, shape, lo, hi, mode = calls[0]
    assert (name, mode) == ("AlexNetCC", "kmeans")  # the unwrapped model, the configured mode
    assert shape == (5, 1, 96, 96) and 0 <= lo < hi <= 100  # init_images training crops, the model input (L)
    run(PretextConfig(**common, max_steps=2, init="kmeans"), resume="auto")
    assert len(calls) == 1  # resumed: weights come from the checkpoint, no init
    run(PretextConfig(**{**common, "out_dir": str(tmp_path / "plain")}, max_steps=1, init="default"))
    assert len(calls) == 1  # init: default keeps PyTorch's initialisation
