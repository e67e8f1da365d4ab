"""The pretext trainer under a demanding user (issue 11): stop signals sent to a real training process, two processes
racing for one run folder, resuming into another run's folder or with a changed config, bad configs refused in one
line before anything is created, a full disk, and the logs of a resumed run."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretext.runtime import load_checkpoint, read_jsonl
from test_train import _colour_images

REPO = Path(__file__).resolve().parents[1]

# a tiny AlexNet (a few seconds per run on a CPU); init=default keeps startup short
TINY = ["model=alexnet_cc", "model_kwargs.fc_dim=32", "size=64", "workers=0", "tensorboard=false", "progress=false",
        "log_every=1", "lr=1e-3", "loss=ce", "image_every=0", "init=default", "crop=rrc", "batch_size=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cmd(settings, flags=(), entry=("-m", "pretext.train")):
    return [sys.executable, *entry, *[a for kv in settings for a in ("--set", kv)], *flags]


def _train(settings, flags=(), check=True, **kw):
    r = subprocess.run(_cmd(settings, flags), capture_output=True, text=True, env=ENV, timeout=300, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "log.jsonl") if r.get("kind") == "train"]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a / "checkpoint.pth")["model"], load_checkpoint(b / "checkpoint.pth")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> int:
    """Poll log.jsonl until a step >= ``step`` is logged; returns the last step seen."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"training ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}"
        if (run / "log.jsonl").is_file():
            steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines() if ln.endswith("}")]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_dir) -> Path:
    return _colour_images(sample_dir, 12, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """An uninterrupted run of 10 steps (the truth the interrupted runs are compared with)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    _train([f"data={data}", f"out_dir={run}", "max_steps=10", "checkpoint_every=3", *TINY])
    return run


# --------------------------------------------------------------------------------------------- 1. stop signals
@pytest.mark.parametrize("sig,workers,rc", [(signal.SIGTERM, 1, 143), (signal.SIGINT, 0, 130), (signal.SIGUSR1, 0, 138)])
def test_stop_signal_checkpoints_the_last_step_and_resume_is_exact(tmp_path, data, reference, sig, workers, rc):
    run = tmp_path / "run"
    settings = [f"data={data}", f"out_dir={run}", "max_steps=10", "checkpoint_every=3", *TINY, f"workers={workers}"]
    # its own session: the signal goes to the whole process group (loader workers too), as a terminal's Ctrl-C or
    # a scheduler's SIGTERM does; the workers ignore it, the trainer finishes its step
    proc = subprocess.Popen(_cmd(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        _wait_for_step(proc, run, 4)  # past the checkpoint of step 3
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == rc, err[-3000:]
    steps = _steps(run)
    ck = load_checkpoint(run / "checkpoint.pth")
    assert 4 <= ck["step"] == steps[-1] < 10, (ck["step"], steps)  # the step in progress was finished and saved
    assert steps == list(range(1, ck["step"] + 1))
    name = signal.Signals(sig).name
    line = [ln for ln in err.splitlines() if f"stopped by {name} at step {ck['step']}" in ln]
    assert len(line) == 1, err[-3000:]
    assert "Traceback" not in err
    # the printed command continues the run, to the same weights as the uninterrupted run
    cmd = shlex.split(line[0].split("resume with: ", 1)[1])
    assert cmd[-1] == "--resume"
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(run) == list(range(1, 11))
    _same_weights(reference, run)


@pytest.mark.slow
def test_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, data):
    """torchrun, 2 processes (gloo): SIGUSR1 reaches rank 1 only; rank 0 stops at the same step (one all-reduce per
    step), the checkpoint holds that step, and the printed command (torchrun's own) resumes the run."""
    run = tmp_path / "run"
    settings = [f"data={data}", f"out_dir={run}", "max_steps=9", "checkpoint_every=3", *TINY, "model_kwargs.norm=none"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_cmd(settings)[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_step(proc, run, 4)
        workers = [int(x) for x in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        rank = {}
        for w in workers:
            env = dict(e.split("=", 1) for e in Path(f"/proc/{w}/environ").read_text().split("\0") if "=" in e)
            rank[env["RANK"]] = w
        os.kill(rank["1"], signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "failed (exitcode: 138) local_rank: 1" in err, err[-3000:]  # torchrun's report of rank 1
    ck = load_checkpoint(run / "checkpoint.pth")
    steps = _steps(run)
    assert 4 <= ck["step"] == steps[-1] < 9 and len(ck["rng_per_rank"]) == 2, (ck["step"], steps)
    line = [ln for ln in err.splitlines() if f"at step {ck['step']}" in ln and "resume with: " in ln]
    assert len(line) == 1, err[-3000:]
    cmd = shlex.split(line[0].split("resume with: ", 1)[1])
    # the interpreter as 'python' where that is this interpreter on PATH, else its full path
    assert os.path.samefile(shutil.which(cmd[0]) or cmd[0], sys.executable), cmd
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], cmd
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(run) == list(range(1, 10))


# --------------------------------------------------------------------------------------------- 3. one run per folder
def test_two_processes_racing_for_one_folder(tmp_path, data):
    run = tmp_path / "run"
    settings = [f"data={data}", f"out_dir={run}", "max_steps=6", "checkpoint_every=3", *TINY]
    procs = [subprocess.Popen(_cmd(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    rcs = sorted(p.returncode for p in procs)
    assert rcs == [0, 2], [o[1][-1500:] for o in outs]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    err = [ln for ln in outs[loser][1].splitlines() if ln.strip()]
    assert len(err) == 1 and "is in use by another run" in err[0], err
    assert f"pid {procs[winner].pid} on " in err[0]  # names the holder
    assert _steps(run) == [1, 2, 3, 4, 5, 6]  # every step once, one learning rate: the loser wrote nothing
    assert load_checkpoint(run / "checkpoint.pth")["step"] == 6
    # the lock is released on exit: the folder is free for --resume
    _train(settings[:2] + ["max_steps=7", *settings[3:]], ["--resume"])
    assert _steps(run) == [1, 2, 3, 4, 5, 6, 7]


# --------------------------------------------------------------------------------------------- 2, 6: resuming
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data):
    """Two finished 2-step runs of the tiny net, a and b (lr 1e-3 and 2e-3)."""
    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("a", "1e-3"), ("b", "2e-3")):
        _train([f"data={data}", f"out_dir={root / name}", "max_steps=2", "checkpoint_every=2", *TINY, f"lr={lr}"])
    return root


def _snapshot(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name not in ("log.txt", ".lock")}


def test_resume_another_checkpoint_into_a_run_folder_needs_force(tmp_path, data, two_runs, refused_in_one_line):
    b = tmp_path / "b"
    shutil.copytree(two_runs / "b", b)
    before = _snapshot(b)
    a_ckpt = two_runs / "a" / "checkpoint.pth"
    common = ["pretrain", "--set", f"data={data}", "--set", f"out_dir={b}", "--set", "max_steps=3",
              *[x for kv in TINY for x in ("--set", kv)]]
    refused_in_one_line([*common, "--resume", a_ckpt], expect=["holds another run's checkpoint", "--force"])
    assert _snapshot(b) == before  # nothing written
    # --force: a's run continues in b's folder (same lr as a: no config change); b's old log is put aside
    r = _train([f"data={data}", f"out_dir={b}", "max_steps=3", *TINY], ["--resume", str(a_ckpt), "--force"])
    assert load_checkpoint(b / "checkpoint.pth")["step"] == 3
    assert _steps(b) == [3]  # the steps 1-2 were a's, logged in a's folder
    assert len(list(b.glob("log.replaced-*.jsonl"))) == 1, r.stderr[-1500:]


def _refused_here(capsys, argv, expect) -> str:
    """The CLI in this process (no torch import per case): exit 2 and one stderr line holding ``expect``."""
    from pretext import cli

    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for e in [expect] if isinstance(expect, str) else expect:
        assert e in lines[0], err
    return lines[0]


def test_config_change_on_resume_is_refused_then_recorded(tmp_path, data, two_runs, capsys):
    run = tmp_path / "a"
    shutil.copytree(two_runs / "a", run)
    before = _snapshot(run)
    settings = [*TINY, f"data={data}", f"out_dir={run}", "checkpoint_every=2"]
    base = ["pretrain", *[x for kv in settings for x in ("--set", kv)]]
    more = tmp_path / "more"
    shutil.copytree(data, more)
    for change, shown in (("lr=5e-4", "lr: 0.001 -> 0.0005"), ("batch_size=4", "batch_size: 2 -> 4"),
                          (f"data={more}", f"data: ['{data}'] -> ['{more}']"), ("k=5", "k: 10 -> 5"),
                          ("lam=0.2", "lam: 0.5 -> 0.2"), ("lr_steps=[5]", "lr_steps: "),
                          ("accum_steps=2", "accum_steps: 1 -> 2"), ("loss=l2", "holds a alexnet_cc network")):
        _refused_here(capsys, [*base, "--set", change, "--set", "max_steps=3", "--resume"], shown)
        assert _snapshot(run) == before  # config.yaml is not rewritten, no history, no log line
    # another network: its weights cannot be loaded, even with --allow-config-change
    _refused_here(capsys, [*base, "--set", "model_kwargs.fc_dim=16", "--resume", "--allow-config-change"],
                  ["holds a alexnet_cc network", "'fc_dim': 32", "'fc_dim': 16", "cannot be loaded"])
    assert _snapshot(run) == before
    # extending max_steps is an ordinary resume: recorded (with the moved out_dir), not refused
    _train([*settings, "max_steps=3"], ["--resume"])
    hist = read_jsonl(run / "config_history.jsonl")
    assert len(hist) == 1 and hist[0]["step"] == 2 and set(hist[0]["changes"]) == {"max_steps", "out_dir"}
    assert hist[0]["changes"]["max_steps"] == {"old": 2, "new": 3}
    # a guarded change with --allow-config-change: runs, recorded with the step, config.yaml says so
    _train([*settings, "max_steps=4", "lr=5e-4"], ["--resume", "--allow-config-change"])
    hist = read_jsonl(run / "config_history.jsonl")
    assert hist[-1]["step"] == 3 and hist[-1]["changes"] == {"lr": {"old": 0.001, "new": 0.0005},
                                                             "max_steps": {"old": 3, "new": 4}}
    text = (run / "config.yaml").read_text()
    assert text.startswith("# resumed at step 3 with changes to lr, max_steps") and "lr: 0.0005" in text
    assert _steps(run) == [1, 2, 3, 4]
    assert [r["lr"] for r in read_jsonl(run / "log.jsonl")] == [1e-3, 1e-3, 1e-3, 5e-4]


# --------------------------------------------------------------------------------------------- 8, 9: bad configs
@pytest.fixture(scope="module")
def other_checkpoints(tmp_path_factory, two_runs) -> Path:
    """A checkpoint of another kind (a probe's format) and the tiny net's checkpoint."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.save({"format": "crosschannel/probe-v1", "model": {}}, d / "probe.pth")
    (d / "garbage.pth").write_bytes(b"not a checkpoint")
    return d


A_FILE = "file.txt"
S = True  # also run as a real `python -m pretext.cli pretrain` subprocess (the cases of issue 11; ~5 s each)
BAD = [  # (settings / flags, what the one line says, subprocess?); {data}, {tmp}, {ckpt}, {runs} are filled in
    (["lr=-1"], "'lr': must be > 0", S),
    (["lr=nan"], "'lr': must be a finite number", S),
    (["betas=0.9"], "'betas': expected a pair", S),
    (["betas=[0.9, 1.5]"], "'betas': must be < 1", False),
    (["size=7"], "'size': must be >= 32", S),
    (["size=16"], "'size': must be >= 32", S),
    (["size=100000"], "'size': must be <= 4096", S),
    (["model=zhang_vgg", "model_kwargs={}", "size=180"], "zhang_vgg needs a multiple of 8", False),
    (["crop_scale_min=2"], "'crop_scale_min': must be <= 1", S),
    (["crop_scale_min=0"], "'crop_scale_min': must be > 0", False),
    (["model_kwargs.fc_dim=-8"], "negative dimension", S),
    (["model_kwargs.fc_dim=0"], "has no weights", False),
    (["model_kwargs.fcdim=8"], "unexpected keyword argument 'fcdim'", False),
    (["model=alexnet"], "unknown model 'alexnet'", False),
    (["model=vgg16_hypercolumn", "model_kwargs={}", "size=16"], "'size': must be >= 32", False),
    (["points_per_image=8"], "alexnet_cc does not train on sampled points", False),
    (["points_margin=40"], "'points_margin' must leave a window", False),
    (["k=1000"], "'k': must be <= 313", S),
    (["k=0"], "'k': must be >= 1", False),
    (["lam=2"], "'lam': must be <= 1", S),
    (["sigma=0"], "'sigma': must be > 0", False),
    (["temperature=-1"], "'temperature': must be > 0", S),
    (["workers=-1"], "'workers': must be >= 0", S),
    (["batch_size=0"], "'batch_size': must be >= 1", False),
    (["max_steps=0"], "'max_steps': must be >= 1", False),
    (["log_every=0"], "'log_every': must be >= 1", False),
    (["lr_steps=[300, 100]"], "'lr_steps' must be strictly increasing", False),
    (["lr_values=[0.001, 0.0001]"], "lr_values needs one lr per segment", False),
    (["lr_gamma=0"], "'lr_gamma': must be > 0", False),
    (["weight_decay=-1e-4"], "'weight_decay': must be >= 0", False),
    (["optimizer=lamb"], "'optimizer': must be one of adam, adamw, sgd", False),
    (["amp=fp8"], "'amp': must be one of", False),
    (["crop=centre"], "'crop': must be one of", False),
    (["loss=rebal"], "needs a prior", False),
    (["loss=rebal", "prior={tmp}/missing.npz"], "prior file not found", False),
    (["device=gpu0"], "'device'", False),
    (["lamda=0.5"], "did you mean 'lam'", False),
    (["data={tmp}/no_such_folder"], "no_such_folder: no such file or folder", False),
    (["out_dir={tmp}/" + A_FILE], "is a file", S),
    (["out_dir={tmp}/" + A_FILE + "/run"], "is a file, not a folder", S),
    (["--resume", "{ckpt}/probe.pth"], "not a crosschannel pretext checkpoint", S),
    (["--resume", "{ckpt}/garbage.pth"], "not a readable checkpoint", False),
    (["--resume", "{runs}/a/checkpoint.pth", "model_kwargs.fc_dim=16"], "cannot be loaded", S),
    (["--resume", "{runs}/a/checkpoint.pth", "lr=5e-4"], "--allow-config-change", False),
]


def _bad_argv(bad, tmp_path, data, two_runs, other_checkpoints):
    (tmp_path / A_FILE).write_text("a file where a folder is expected")
    fill = dict(data=data, tmp=tmp_path, ckpt=other_checkpoints, runs=two_runs)
    for key, value in fill.items():
        bad = [b.replace("{" + key + "}", str(value)) for b in bad]
    settings = [*TINY, f"data={data}", f"out_dir={tmp_path / 'run'}", "max_steps=2"]
    settings += [b for b in bad if not b.startswith("--") and "=" in b]
    flags = [b for b in bad if b.startswith("--") or "=" not in b]
    argv = ["pretrain", *[x for kv in settings for x in ("--set", kv)], *flags]
    return argv, [tmp_path / "run", tmp_path / A_FILE / "run"]


@pytest.mark.parametrize("bad,message", [(b, m) for b, m, sub in BAD if sub],
                         ids=[" ".join(b) for b, _, sub in BAD if sub])
def test_bad_pretrain_config_is_refused_in_one_line_before_anything(tmp_path, data, two_runs, other_checkpoints,
                                                                    refused_in_one_line, bad, message):
    """A real CLI process: exit 2, one line, no traceback, no run folder (refused before the network is built:
    size=100000 never allocates its crops)."""
    argv, folders = _bad_argv(bad, tmp_path, data, two_runs, other_checkpoints)
    t0 = time.time()
    refused_in_one_line(argv, expect=message, must_not_exist=folders)
    assert time.time() - t0 < 60


@pytest.mark.parametrize("bad,message", [(b, m) for b, m, _ in BAD], ids=[" ".join(b) for b, _, _ in BAD])
def test_every_bad_pretrain_setting_is_refused_in_one_line(tmp_path, data, two_runs, other_checkpoints, capsys, bad,
                                                           message):
    """The whole table in this process (fast): the CLI's exit code 2, one line, no run folder."""
    from pretext import cli

    argv, folders = _bad_argv(bad, tmp_path, data, two_runs, other_checkpoints)
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert lines[0].startswith("crosschannel pretrain: error: ")
    assert not any(f.exists() for f in folders)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir_is_one_line(tmp_path, data, refused_in_one_line):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused_in_one_line(["pretrain", *[x for kv in [*TINY, f"data={data}", f"out_dir={ro / 'run'}"]
                                           for x in ("--set", kv)]], expect="cannot create it",
                            must_not_exist=[ro / "run"])
        refused_in_one_line(["pretrain", *[x for kv in [*TINY, f"data={data}", f"out_dir={ro}"]
                                           for x in ("--set", kv)]], expect="not writable")
    finally:
        ro.chmod(0o755)


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk's ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # logs fit, the checkpoint (~8 MB) does not
import pretext.train as t
from pretext.runtime import run_entry
sys.exit(run_entry(t.main, t.get_args_parser()))
"""


def test_full_disk_while_writing_a_checkpoint_is_one_line(tmp_path, data):
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK)
    run = tmp_path / "run"
    r = subprocess.run(_cmd([f"data={data}", f"out_dir={run}", "max_steps=2", "checkpoint_every=2", *TINY],
                            entry=(str(script),)), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pretext.train: error: ") and "checkpoint.pth: cannot write the checkpoint" in last, last
    assert not list(run.glob(".*.tmp"))  # the partial file is gone


# --------------------------------------------------------------------------------------------- 10. logs on resume
def test_resume_drops_redone_steps_torn_line_and_stale_tmp(tmp_path, data, reference):
    """A run killed after step 5 (checkpoint of step 3) while writing a log line and a checkpoint: the resumed run
    logs every step once, plots loss.png, removes the temporary file, and ends with the reference's weights."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    # the state a SIGKILL after step 5 leaves: the checkpoint of step 3, records of steps 4-5, a torn line, a tmp
    ck = load_checkpoint(run / "checkpoint.pth")
    assert ck["step"] == 10
    _train([f"data={data}", f"out_dir={tmp_path / 'three'}", "max_steps=3", "checkpoint_every=3", *TINY])
    shutil.copy(tmp_path / "three" / "checkpoint.pth", run / "checkpoint.pth")
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[:5]) + '\n{"kind": "train", "step": 6, "lo')
    (run / ".checkpoint.pth.k1ll3d.tmp").write_bytes(b"\0" * 1000)
    (run / "loss.png").unlink()
    _train([f"data={data}", f"out_dir={run}", "max_steps=10", "checkpoint_every=3", *TINY], ["--resume"])
    assert _steps(run) == list(range(1, 11))
    assert not (run / ".checkpoint.pth.k1ll3d.tmp").exists()
    assert (run / "loss.png").is_file()
    _same_weights(reference, run)


def test_attempt_killed_before_its_first_checkpoint_leaves_no_log_behind(tmp_path, data, reference):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference / "log.jsonl", run / "log.jsonl")  # steps 1-10 of an attempt that wrote no checkpoint
    _train([f"data={data}", f"out_dir={run}", "max_steps=2", "checkpoint_every=2", *TINY], ["--resume"])
    assert _steps(run) == [1, 2]
