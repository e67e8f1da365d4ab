"""The README's main job, end to end (few steps here; the full run's figures are in the closing notes)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretext.quickstart import QUICKSTART, sample_dir
from pretext.runtime import load_config
from pretext.train import PretextConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretext").glob("*.yaml")), ids=lambda p: p.name)
def test_pretext_configs_load(path):
    cfg = load_config(PretextConfig, path)
    assert cfg.model and cfg.loss in ("rebal", "ce", "l2", "hue_chroma")


def test_quickstart_yaml_mirrors_the_recipe():
    y = yaml.safe_load((REPO / "configs" / "pretext" / "quickstart.yaml").read_text())
    for k, v in QUICKSTART.items():
        assert y[k] == (list(v) if isinstance(v, tuple) else v), k


def test_sample_is_shipped_with_licences():
    d = sample_dir()
    rows = (d / "LICENSES.tsv").read_text().strip().splitlines()[1:]
    files = {p.relative_to(d).as_posix() for p in d.rglob("*.jpg")}
    assert files == {r.split("\t")[0] for r in rows} and len(files) >= 40
    assert all(r.split("\t")[3].strip() for r in rows)
    assert not any("GPL" in r for r in rows)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    run = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "pretext", "quickstart", "-o", str(run), "--steps", "3", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"quickstart run directory: {run.resolve()}" in r.stdout
    for name in ("prior.npz", "checkpoint.pth", "report.md", "colorized.png", "loss.png", "quickstart.json",
                 "config.yaml", "log.jsonl"):
        assert (run / name).exists(), name
    res = json.loads((run / "quickstart.json").read_text())["metrics"]
    for method in ("model", "gray", "random"):
        assert 0 < res[method]["auc"] <= 100 and 0 < res[method]["auc_rebal"] <= 100
    # the checkpoint is usable by `crosschannel colorize`
    out = tmp_path / "col.png"
    held = sorted((sample_dir() / "heldout").iterdir())[0]
    r = subprocess.run([sys.executable, "-m", "pretext", "colorize", str(held), "-o", str(out), "--checkpoint",
                        str(run / "checkpoint.pth")], capture_output=True, text=True)
    assert r.returncode == 0 and out.exists(), r.stderr[-2000:]
