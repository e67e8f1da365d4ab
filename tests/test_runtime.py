import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from pretext.runtime import (
    JsonlLogger,
    UserError,
    load_checkpoint,
    load_config,
    read_jsonl,
    save_checkpoint,
    save_config,
    select_device,
)


@dataclasses.dataclass(frozen=True)
class Cfg:
    lr: float = 0.1
    steps: int = 10
    name: str = "x"
    amp: bool = False
    taps: list[str] = dataclasses.field(default_factory=lambda: ["conv1"])
    betas: tuple[float, float] = (0.9, 0.99)
    kwargs: dict = dataclasses.field(default_factory=dict)
    prior: str | None = None


def test_yaml_and_overrides_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.5\nsteps: 3\ntaps: [conv1, conv5]\nkwargs: {fc_dim: 64}\n")
    cfg = load_config(Cfg, p, ["steps=7", "amp=true", "taps=conv2,conv3", "betas=[0.5, 0.6]", "kwargs.width=2",
                               "prior=none"])
    assert cfg == Cfg(lr=0.5, steps=7, amp=True, taps=["conv2", "conv3"], betas=(0.5, 0.6),
                      kwargs={"fc_dim": 64, "width": 2}, prior=None)
    assert isinstance(cfg.steps, int) and isinstance(cfg.lr, float)


@pytest.mark.parametrize("override,message", [
    (["stpes=3"], "unknown config key 'stpes' (did you mean 'steps'?)"),
    (["steps=abc"], "config key 'steps': expected an integer, got 'abc'"),
    (["lr=fast"], "config key 'lr': expected a number"),
    (["amp=maybe"], "config key 'amp': expected true/false"),
    (["steps"], "--set expects key=value"),
    (["name.x=1"], "'name' is not a mapping"),
])
def test_bad_overrides_give_one_line_errors(override, message):
    with pytest.raises(UserError) as e:
        load_config(Cfg, None, override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(UserError, match="bad.yaml: invalid YAML"):
        load_config(Cfg, bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: {a: 1}\n")
    with pytest.raises(UserError, match="is nested"):
        load_config(Cfg, nested)


def test_save_config_roundtrip(tmp_path):
    cfg = Cfg(lr=0.25, taps=["a"], kwargs={"k": 1})
    path = save_config(cfg, tmp_path)
    assert load_config(Cfg, path) == cfg


def test_checkpoint_atomic_and_errors(tmp_path):
    path = tmp_path / "ck.pth"
    save_checkpoint({"a": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temporary file left behind
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_interrupted_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.pth"
    save_checkpoint({"v": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint({"v": 2, "x": Boom()}, path)
    assert load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]


def test_jsonl(tmp_path):
    lg = JsonlLogger(tmp_path / "log.jsonl")
    lg.log(step=1, loss=torch.tensor(0.5))
    lg.log(step=2, loss=0.25)
    recs = read_jsonl(tmp_path / "log.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and recs[0]["loss"] == 0.5
    JsonlLogger(tmp_path / "off.jsonl", enabled=False).log(step=1)
    assert not (tmp_path / "off.jsonl").exists()


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            select_device("cuda")


def test_cli_usage_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "pretext"], capture_output=True, text=True)
    assert out.returncode == 0 and "prior" in out.stdout and "pretrain" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pretext", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


def test_cli_user_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pretext", "pretrain", "--set", "stpes=3"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unknown config key 'stpes'" in out.stderr


def test_atomic_files_get_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        save_checkpoint({"a": 1}, tmp_path / "ck.pth")
    finally:
        os.umask(mask)
    assert (tmp_path / "ck.pth").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------------------------- limits, run folders
import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from pretext.runtime import (  # noqa: E402
    GracefulStop,
    RunLock,
    build_config,
    check_resume_config,
    param,
    remove_stale_tmp,
    resolve_resume,
    run_entry,
    truncate_jsonl,
)


@dataclasses.dataclass(frozen=True)
class Limited:
    size: int = param(176, ge=32, le=4096)
    lr: float = param(0.1, gt=0)
    lam: float = param(0.5, ge=0, le=1)
    betas: tuple[float, float] = param((0.9, 0.99), ge=0, lt=1)
    amp: str = param("auto", choices=("auto", "none"))
    taps: list[str] = param(default_factory=lambda: ["conv1"], choices=("conv1", "conv5"))

    def validate(self):
        if self.size % 2:
            raise UserError("config key 'size': must be even")


@pytest.mark.parametrize("values,message", [
    ({"size": 7}, "config key 'size': must be >= 32, got 7"),
    ({"size": 100000}, "config key 'size': must be <= 4096, got 100000"),
    ({"lr": -1}, "config key 'lr': must be > 0, got -1.0"),
    ({"lr": "nan"}, "config key 'lr': must be a finite number, got nan"),
    ({"lam": 2}, "config key 'lam': must be <= 1, got 2.0"),
    ({"betas": [0.9, 1.0]}, "config key 'betas': must be < 1, got 1.0"),
    ({"amp": "fp8"}, "config key 'amp': must be one of auto, none; got 'fp8'"),
    ({"taps": ["conv1", "fc9"]}, "config key 'taps': must be one of conv1, conv5; got 'fc9'"),
    ({"size": 33}, "config key 'size': must be even"),
])
def test_declared_limits_refuse_bad_values(values, message):
    with pytest.raises(UserError) as e:
        build_config(Limited, values)
    assert str(e.value) == message
    assert build_config(Limited, {"size": 64, "lr": 1e-3}).size == 64  # in range: accepted


def test_graceful_stop_turns_signals_into_a_request():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.name == "SIGTERM" and stop.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)


_HOLDER = """
import sys, time
from pretext.runtime import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_run_lock_excludes_a_second_process_and_frees_on_death(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            RunLock(run).acquire()
        assert f"is in use by another run (pid {p.pid} on " in str(e.value) and "\n" not in str(e.value)
    finally:
        p.kill()
        p.wait()
    with RunLock(run):  # the dead holder's lock is not stale: the kernel released it
        pass


def test_run_dir_errors_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        RunLock(tmp_path / "afile").acquire()
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        RunLock(tmp_path / "afile" / "run").acquire()


def test_stale_tmp_files_are_removed(tmp_path):
    (tmp_path / ".checkpoint.pth.abc123.tmp").write_bytes(b"half")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / ".step_1.png.x.tmp").write_bytes(b"half")
    (tmp_path / "checkpoint.pth").write_bytes(b"keep")
    assert len(remove_stale_tmp(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["checkpoint.pth"]


def test_jsonl_resume_drops_redone_steps_and_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) for s in (10, 20, 30)]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "st')  # killed mid-write
    assert [r["step"] for r in read_jsonl(path)] == [10, 20, 30]
    assert truncate_jsonl(path, max_step=20) == 1
    assert [r["step"] for r in read_jsonl(path)] == [10, 20] and path.read_text().endswith("}\n")
    path.write_text('{"step": 1}\n{broken\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_jsonl(path)


def test_resume_into_another_runs_folder_is_refused(tmp_path):
    own = tmp_path / "run" / "checkpoint.pth"
    own.parent.mkdir()
    own.write_bytes(b"x")
    other = tmp_path / "other.pth"
    other.write_bytes(b"y")
    with pytest.raises(UserError, match="holds another run's checkpoint"):
        resolve_resume(str(other), own)
    assert resolve_resume(str(other), own, force=True) == str(other)
    assert resolve_resume(str(own), own) == str(own)
    assert resolve_resume(str(other), tmp_path / "fresh" / "checkpoint.pth") == str(other)


def test_config_change_on_resume_refused_or_recorded(tmp_path):
    old = {"data": ["a"], "lr": 0.1, "workers": 4, "betas": (0.9, 0.99)}
    new = {"data": ["b"], "lr": 0.1, "workers": 8, "betas": [0.9, 0.99]}
    with pytest.raises(UserError, match=r"data: \['a'\] -> \['b'\].*--allow-config-change"):
        check_resume_config(old, new, guarded=("data", "lr"), allow=False, run_dir=tmp_path, step=5)
    assert not (tmp_path / "config_history.jsonl").exists()
    changes = check_resume_config(old, new, guarded=("data", "lr"), allow=True, run_dir=tmp_path, step=5)
    assert set(changes) == {"data", "workers"}  # tuple vs list is no change
    (rec,) = read_jsonl(tmp_path / "config_history.jsonl")
    assert rec["step"] == 5 and rec["changes"]["data"] == {"old": ["a"], "new": ["b"]}
    # unguarded changes go through without the flag, and are recorded too
    check_resume_config(old, {**old, "workers": 2}, guarded=("data",), allow=False, run_dir=tmp_path, step=9)
    assert read_jsonl(tmp_path / "config_history.jsonl")[-1]["step"] == 9


def test_os_errors_become_one_line(capsys):
    import argparse

    def main(_args):
        raise OSError(28, "No space left on device", "/data/run/checkpoint.pth")

    assert run_entry(main, argparse.ArgumentParser("prog"), []) == 1
    err = capsys.readouterr().err
    assert err == "prog: error: /data/run/checkpoint.pth: No space left on device\n"


def test_resume_command_replaces_the_resume_flags(tmp_path, monkeypatch):
    import shlex
    from pathlib import Path

    from pretext.runtime import resume_command

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    train_py = str(Path(__file__).resolve().parents[1] / "pretext" / "train.py")
    cmd = shlex.split(resume_command([train_py, "--set", "out_dir=my runs/a", "--resume", "/x/other.pth", "--force",
                                      "--allow-config-change", "--set", "lr=1e-3"]))
    assert cmd[1:] == ["-m", "pretext.train", "--set", "out_dir=my runs/a", "--set", "lr=1e-3", "--resume"]
    assert cmd[0] in ("python", sys.executable)
    assert resume_command(["/usr/local/bin/crosschannel", "pretrain", "--resume", "--set", "k=5"]) == \
        "crosschannel pretrain --set k=5 --resume"
    assert resume_command(["/usr/local/bin/crosschannel", "pretrain", "--resume=a.pth"]) == \
        "crosschannel pretrain --resume"


def test_failed_checkpoint_write_is_an_os_error_naming_the_file(tmp_path):
    import resource
    import signal

    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # writes past 100 kB fail (EFBIG), like a full disk
    try:
        with pytest.raises(OSError) as e:
            save_checkpoint({"w": torch.zeros(1_000_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert e.value.filename == str(path) and "cannot write the checkpoint" in e.value.strerror
    assert "previous checkpoint" in e.value.strerror
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
