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
