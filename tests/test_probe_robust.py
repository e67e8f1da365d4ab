"""Issue 11 for ``crosschannel probe`` and ``crosschannel svm``: stop signals checkpoint and resume exactly, one run
per folder, --resume of another run's checkpoint, config changes on resume, logs after resume, unreadable validation
images counted honestly, and a table of bad settings each refused in one line before anything is created."""
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

from linear_probe import train
from pretext.runtime import UserError
from test_probe import CLASSES, TINY, heads_state, write_imagefolder

ROOT = Path(__file__).resolve().parents[1]
# one step per image: epochs long enough to stop in the middle of one
STEPS = ("--set", "batch_size=2", "--set", "taps=[conv2,pool5]", "--set", "lr_steps=[2]")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("imgs") / "data", per_class=6)


def probe_argv(folder, out, *extra):
    return [*TINY, "--set", f"data={folder}", "--set", "val_fraction=0.34", "--set", f"out_dir={out}", *extra]


def run_probe(folder, out, *extra):
    return train.main(train.get_args_parser().parse_args(probe_argv(folder, out, *extra)))


def cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pretext.cli", *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def epochs_logged(out) -> list[int]:
    return [json.loads(ln)["epoch"] for ln in (Path(out) / "log.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    sa, sb = heads_state(a), heads_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ra, rb = (json.loads((Path(d) / "results.json").read_text()) for d in (a, b))
    assert ra["taps"] == rb["taps"] and ra["num_val"] == rb["num_val"]


# --------------------------------------------------------------------------------------------- 1. stop signals
def test_sigterm_subprocess_checkpoints_then_resume_equals_uninterrupted(folder, tmp_path):
    """A real SIGTERM while the CLI trains: exit 143 with a line saying how to resume and a checkpoint; the
    resumed run's heads and results equal an uninterrupted run's."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = cli("probe", *probe_argv(folder, full, *STEPS, "--set", "epochs=4"))  # same threads as the others
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err
    p = cli("probe", *probe_argv(folder, cut, *STEPS, "--set", "epochs=4"))
    lines = []
    for line in p.stderr:  # the first epoch's evaluation line: training is under way
        lines.append(line)
        if "epoch 1/4" in line:
            p.send_signal(signal.SIGTERM)
            break
    err = "".join(lines) + p.stderr.read()
    assert p.wait(timeout=120) == 143, err
    assert "SIGTERM received" in err and "--resume" in err.splitlines()[-1] and "Traceback" not in err
    ck = torch.load(cut / "checkpoint.pth", weights_only=False)
    assert 1 <= ck["epoch"] < 4 and (ck["partial"] is None or ck["partial"]["steps"] >= 1)
    resume = cli("probe", *probe_argv(folder, cut, *STEPS, "--set", "epochs=4"), "--resume")
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    assert_same_run(full, cut)
    assert epochs_logged(cut) == [1, 2, 3, 4]


@pytest.mark.parametrize("sig,rc", [(signal.SIGUSR1, 138), (signal.SIGINT, 130)])
def test_signal_mid_epoch_checkpoints_the_step_and_resumes_exactly(folder, tmp_path, monkeypatch, sig, rc):
    """The signal arrives during step 8 (epoch 2, step 2 of 6): that step finishes, the checkpoint holds epoch 1 +
    2 steps, and the run resumed with 2 loader workers (augmentation does not depend on them) equals an
    uninterrupted one."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_probe(folder, full, *STEPS, "--set", "epochs=3") == 0
    calls = {"n": 0}
    real_loss = train.probe_loss

    def loss_then_signal(logits, y):
        calls["n"] += 1
        if calls["n"] == 8:
            os.kill(os.getpid(), sig)
        return real_loss(logits, y)

    monkeypatch.setattr(train, "probe_loss", loss_then_signal)
    assert run_probe(folder, cut, *STEPS, "--set", "epochs=3") == rc
    ck = torch.load(cut / "checkpoint.pth", weights_only=False)
    assert ck["epoch"] == 1 and ck["partial"]["epoch"] == 1 and ck["partial"]["steps"] == 2
    assert calls["n"] == 8  # the step in flight finished, no further one started
    monkeypatch.setattr(train, "probe_loss", real_loss)
    assert run_probe(folder, cut, *STEPS, "--set", "epochs=3", "--set", "workers=2", "--resume") == 0
    assert_same_run(full, cut)
    assert epochs_logged(cut) == [1, 2, 3]
    history = [json.loads(ln) for ln in (cut / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["changes"] == {"workers": {"old": 0, "new": 2}}  # not guarded, but recorded


# --------------------------------------------------------------------------------------------- 2. / 6. resume
def test_resume_other_checkpoint_refused_unless_force(folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run_probe(folder, out, *STEPS, "--set", "epochs=1") == 0
    before = (b / "checkpoint.pth").read_bytes()
    with pytest.raises(UserError, match="holds another run's checkpoint.*--force"):
        run_probe(folder, b, *STEPS, "--set", "epochs=2", "--resume", str(a / "checkpoint.pth"))
    assert (b / "checkpoint.pth").read_bytes() == before
    assert run_probe(folder, b, *STEPS, "--set", "epochs=2", "--resume", str(a / "checkpoint.pth"), "--force") == 0
    assert torch.load(b / "checkpoint.pth", weights_only=False)["epoch"] == 2


def test_resume_with_changed_config_refused_then_recorded(folder, tmp_path):
    out = tmp_path / "run"
    assert run_probe(folder, out, *STEPS, "--set", "epochs=1") == 0
    with pytest.raises(UserError, match=r"lr: 0.01 -> 0.02.*--allow-config-change"):
        run_probe(folder, out, *STEPS, "--set", "epochs=2", "--set", "lr=0.02", "--resume")
    assert not (out / "config_history.jsonl").exists()
    assert run_probe(folder, out, *STEPS, "--set", "epochs=2", "--set", "lr=0.02", "--resume",
                     "--allow-config-change") == 0
    rec = [json.loads(ln) for ln in (out / "config_history.jsonl").read_text().splitlines()]
    assert len(rec) == 1 and rec[0]["step"] == 1
    assert rec[0]["changes"]["lr"] == {"old": 0.01, "new": 0.02} and rec[0]["changes"]["epochs"] == {"old": 1, "new": 2}


# --------------------------------------------------------------------------------------------- 3. one run per folder
def test_two_processes_race_for_one_out_dir(folder, tmp_path, refused_in_one_line):
    out = tmp_path / "run"
    first = cli("probe", *probe_argv(folder, out, *STEPS, "--set", "epochs=200"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and f'"pid": {first.pid}' not in ((out / ".lock").read_text()
                                                                       if (out / ".lock").exists() else ""):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        refused_in_one_line(["probe", *probe_argv(folder, out, *STEPS, "--set", "epochs=200")],
                            expect=["is in use by another run", f"pid {first.pid}"])
        assert first.poll() is None  # the holder is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143


# --------------------------------------------------------------------------------------------- 10. logs on resume
def test_resume_drops_redone_log_records_torn_line_and_stale_tmp(folder, tmp_path):
    out = tmp_path / "run"
    assert run_probe(folder, out, *STEPS, "--set", "epochs=2") == 0
    with open(out / "log.jsonl", "a") as f:  # a crash after logging epoch 3, before its checkpoint, mid-line
        f.write(json.dumps({"epoch": 3, "lr": 1.0, "stale": True}) + "\n" + '{"epoch": 4, "lr"')
    tmp = out / ".checkpoint.pth.x1y2z3.tmp"
    tmp.write_bytes(b"half a checkpoint")
    assert run_probe(folder, out, *STEPS, "--set", "epochs=3", "--resume") == 0
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3] and not any(r.get("stale") for r in recs)
    assert not tmp.exists()


# --------------------------------------------------------------------------------------------- 12. unreadable val
@pytest.mark.parametrize("cache", [False, True])
def test_corrupt_validation_image_skipped_and_true_count(tmp_path, cache):
    root = tmp_path / "data"
    write_imagefolder(root / "train", per_class=4)
    write_imagefolder(root / "val", per_class=3, seed=1)
    bad = root / "val" / "green" / "green1.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "run"
    argv = [*TINY, "--set", f"data={root}", "--set", f"out_dir={out}", "--set", "epochs=1", "--set", "batch_size=4",
            "--set", "taps=[conv2]", "--set", f"cache_features={str(cache).lower()}"]
    with pytest.warns(UserWarning, match="green1.png"):
        assert train.main(train.get_args_parser().parse_args(argv)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["num_val"] == 3 * len(CLASSES) - 1 and res["skipped_unreadable_val"] == [str(bad)]
    assert res["num_train"] == 4 * len(CLASSES)
    assert "8 val images (1 unreadable val image(s) skipped" in (out / "results.md").read_text()
    log = (out / "log.txt").read_text()
    assert "1 of 9 images unreadable" in log and str(bad) in log and "8 val images evaluated, 1 unreadable" in log
    # the count is the true one: a top-1 over 8 images is a multiple of 1/8
    assert all(abs(t["top1"] * 8 / 100 - round(t["top1"] * 8 / 100)) < 1e-9 for t in res["taps"])


def test_unreadable_training_image_replaced_from_the_training_split_only(tmp_path):
    """With one folder split by val_fraction, an unreadable training image is replaced by the next readable
    *training* image (a validation image in its place would leak the validation set into training)."""
    from pretext.runtime import load_config

    root = write_imagefolder(tmp_path / "data", per_class=6)
    cfg = load_config(train.ProbeConfig, None, [f"data={root}", "val_fraction=0.34", "crop=67", "resize=72",
                                                "train_aug=none"])
    tf, _ = train.build_transforms(cfg)
    tr, va, _ = train.get_dataset(cfg, tf, tf)
    full = tr.dataset
    k = next(j for j, i in enumerate(tr.indices[:-1]) if tr.indices[j + 1] != i + 1)  # next folder sample is val
    bad = tr.indices[k]
    assert bad + 1 in va.indices
    Path(full.samples[bad][0]).write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped"):
        x, y = tr[k]
    want = full[tr.indices[k + 1]]
    assert torch.equal(x, want[0]) and y == want[1]


# --------------------------------------------------------------------------------------------- svm
def svm_devkit(base: Path, n: int = 24) -> Path:
    from test_svm import write_devkit

    names = ("cat", "dog", "person")
    imgs = {f"{i:06d}": [(names[i % 3], "0")] for i in range(n)}
    ids = sorted(imgs)
    return write_devkit(base, imgs, {"trainval": ids[: n // 2], "test": ids[n // 2:]})


def svm_argv(voc, out, *extra):
    from test_svm import TINY as SVM_TINY

    return [*SVM_TINY, "--set", f"data={voc}", "--set", "classes=[cat,dog,person]", "--set", "costs=[0.1,1.0]",
            "--set", "n_jobs=1", "--set", f"out_dir={out}", *extra]


def test_svm_corrupt_jpegs_with_workers_skipped_named_once_and_counted(tmp_path):
    """The CLI with 2 loader workers: a truncated JPEG in trainval and a text file named .jpg in test are skipped
    with one warning each naming the file, counted in results.json, and the run finishes (exit 0)."""
    voc = svm_devkit(tmp_path / "voc")
    jpg = voc / "VOC2007" / "JPEGImages"
    data = (jpg / "000004.jpg").read_bytes()
    (jpg / "000004.jpg").write_bytes(data[: len(data) // 2])
    (jpg / "000020.jpg").write_bytes(b"this is not a jpeg")
    out = tmp_path / "out"
    p = cli("svm", *svm_argv(voc, out, "--set", "workers=2"))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    for name in ("000004.jpg", "000020.jpg"):
        assert len([ln for ln in err.splitlines() if "WARNING skipped" in ln and name in ln]) == 1, err
    res = json.loads((out / "results.json").read_text())
    assert res["num_train"] == 11 and res["num_test"] == 11
    assert [Path(s.split(":")[0]).name for s in res["skipped_unreadable"]["train"]] == ["000004.jpg"]
    assert [Path(s.split(":")[0]).name for s in res["skipped_unreadable"]["test"]] == ["000020.jpg"]
    assert "Traceback" not in err


def svm_results(out) -> dict:
    res = json.loads((Path(out) / "results.json").read_text())
    return {t: {c: (r["cost"], r["ap"]) for c, r in v["classes"].items()} for t, v in res["taps"].items()}


@pytest.mark.parametrize("where", ["features", "svms"])
def test_svm_stop_signal_keeps_state_and_resume_finishes(tmp_path, monkeypatch, where):
    """SIGUSR1 during feature extraction (nothing kept) or after the first group of SVMs (features and finished SVMs
    kept): exit 138; --resume reuses what was kept and gives the uninterrupted run's results."""
    from linear_probe import svm

    voc = svm_devkit(tmp_path / "voc")
    run = lambda out, *extra: svm.main(svm.get_args_parser().parse_args(svm_argv(voc, out, "--set", "workers=0",  # noqa: E731
                                                                                 *extra)))
    assert run(tmp_path / "full") == 0
    real = svm.pool_features if where == "features" else svm.train_class
    calls = {"n": 0}

    def signal_then_call(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*a, **kw)

    monkeypatch.setattr(svm, "pool_features" if where == "features" else "train_class", signal_then_call)
    out = tmp_path / "cut"
    assert run(out) == 138
    assert (out / "features.npz").exists() == (where == "svms")
    if where == "svms":  # the group of 2 (n_jobs 1 x 2) in flight finished and was kept
        assert len((out / "svm_done.jsonl").read_text().splitlines()) == 2 and not (out / "results.json").exists()
    monkeypatch.setattr(svm, "pool_features" if where == "features" else "train_class", real)
    with pytest.raises(UserError, match="pass --resume") if where == "svms" else _no_error():
        assert run(out) == 0  # without --resume: refused when there is state to keep
    if where == "svms":
        assert run(out, "--resume") == 0
        assert "features: reusing" in (out / "log.txt").read_text()
    assert svm_results(out) == svm_results(tmp_path / "full")


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_svm_two_processes_race_for_one_out_dir(tmp_path, refused_in_one_line):
    from pretext.runtime import RunLock

    voc = svm_devkit(tmp_path / "voc", n=8)
    out = tmp_path / "out"
    with RunLock(out):  # this process holds the folder
        refused_in_one_line(["svm", *svm_argv(voc, out, "--set", "workers=0")],
                            expect=["is in use by another run", f"pid {os.getpid()}"])
    assert not (out / "config.yaml").exists()


# --------------------------------------------------------------------------------------------- 8. bad settings
def _pretext_checkpoint(path: Path) -> Path:
    from pretext.models import create_model

    torch.save({"model_name": "alexnet_cc", "model_kwargs": {"fc_dim": 8}, "model": create_model("alexnet_cc", fc_dim=8)
                .state_dict(), "step": 3}, path)
    return path


BAD_PROBE = [  # (settings, what the one line must say)
    (["--set", "lr=-0.1"], "config key 'lr': must be > 0"),
    (["--set", "lr=nan"], "config key 'lr': must be a finite number"),
    (["--set", "model_kwargs.fc_dim=-8"], "model_kwargs.fc_dim"),
    (["--set", "model_kwargs.fc_dim=100000000"], "model_kwargs.fc_dim"),
    (["--set", "crop=7"], "config key 'crop': must be >= 16"),
    (["--set", "crop=100000", "--set", "resize=100000"], "config key 'crop': must be <= 2048"),
    (["--set", "resize=60"], "resize must be >= crop"),
    (["--set", "workers=-1"], "config key 'workers'"),
    (["--set", "batch_size=1"], "config key 'batch_size': must be >= 2"),
    (["--set", "momentum=1.5"], "config key 'momentum'"),
    (["--set", "val_fraction=1.5"], "config key 'val_fraction'"),
    (["--set", "pool=max"], "config key 'pool': must be one of"),
    (["--set", "device=gpu0"], "config key 'device'"),
    (["--set", "lr_steps=[-1]"], "config key 'lr_steps'"),
    (["--set", "taps=[conv9]"], "unknown tap"),
    (["--set", "batch_size=64"], "fewer than one batch"),
    ("EMPTY_CLASS", "no valid file for the classes empty"),
    (["--set", "crop=16", "--set", "resize=16"], "crop 16 is too small for the taps of alexnet_cc"),
    ("PRETEXT_RESUME", "not a linear probe checkpoint (a pretext checkpoint)"),
    ("OTHER_ENCODER_RESUME", "was trained on a different encoder"),
    ("OUT_DIR_FILE", "is a file, not a folder"),
]


BAD_SVM = [
    (["--set", "costs=[1.0,-1]"], "config key 'costs'"),
    (["--set", "costs=[nan]"], "config key 'costs'"),
    (["--set", "cv_folds=1"], "config key 'cv_folds'"),
    (["--set", "workers=-1"], "config key 'workers'"),
    (["--set", "crop=7"], "config key 'crop'"),
    (["--set", "model_kwargs.fc_dim=-1"], "model_kwargs.fc_dim"),
    (["--set", "pool_kernels.conv2=[0,1]"], "pool_kernels"),
    (["--set", "n_jobs=0"], "config key 'n_jobs'"),
    (["--set", "dual=maybe"], "config key 'dual'"),
    (["--set", "ap=best"], "config key 'ap'"),
    (["--set", "fallback_test_fraction=1"], "config key 'fallback_test_fraction'"),
    ("OUT_DIR_FILE", "is a file, not a folder"),
]
CASES = [(kind, *row) for kind, rows in (("probe", BAD_PROBE), ("svm", BAD_SVM)) for row in rows]


@pytest.mark.parametrize("kind,settings,expect", CASES,
                         ids=[f"{k}:{s if isinstance(s, str) else s[-1]}" for k, s, _ in CASES])
def test_bad_settings_refused_in_one_line(kind, settings, expect, folder, tmp_path, refused_in_one_line):
    out = tmp_path / "out"
    if kind == "probe":
        args = ["probe", *probe_argv(folder, out, *STEPS, "--set", "epochs=1")]
    else:
        from test_svm import TINY as SVM_TINY, write_devkit

        imgs = {f"{i:06d}": [(("cat", "dog")[i % 2], "0")] for i in range(8)}
        voc = write_devkit(tmp_path / "voc", imgs, {"trainval": sorted(imgs)[:4], "test": sorted(imgs)[4:]})
        args = ["svm", *SVM_TINY, "--set", f"data={voc}", "--set", "classes=[cat,dog]", "--set", "workers=0",
                "--set", f"out_dir={out}"]
    if settings == "EMPTY_CLASS":
        data = tmp_path / "data"
        write_imagefolder(data, per_class=3)
        (data / "empty").mkdir()
        args += ["--set", f"data={data}"]
    elif settings == "PRETEXT_RESUME":
        args += ["--resume", str(_pretext_checkpoint(tmp_path / "pretext.pth"))]
    elif settings == "OTHER_ENCODER_RESUME":
        torch.save({"format": train.FORMAT, "encoder_fingerprint": "0123456789abcdef"}, tmp_path / "other.pth")
        args += ["--resume", str(tmp_path / "other.pth")]
    elif settings == "OUT_DIR_FILE":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out"
        args += ["--set", f"out_dir={out}"]
    else:
        args += settings
    refused_in_one_line(args, expect=expect, must_not_exist=[out])
