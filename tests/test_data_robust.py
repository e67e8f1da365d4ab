"""Honest data accounting (issue 11): symlinked folders, list files with spaces, unreadable training images
replaced deterministically and counted once per file, and a training set with no readable image refused."""
import os
import shutil
from pathlib import Path

import pytest

from pretext.data import list_file_entry, list_images

from test_train import _FAULT_WRAPPER


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    import torch

    from pretext.encoding import load_bins
    from pretext.models import create_model

    torch.manual_seed(0)
    model = create_model("alexnet_cc", fc_dim=64)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(dict(model_name="alexnet_cc", model_kwargs=dict(fc_dim=64), model=model.state_dict(), target="ab313",
                    bins=load_bins(), prior=None, input_size=64, config={}, step=0), path)
    return path


def _photos(shared_data, n, sub="skimage"):
    return sorted((shared_data / "photos" / sub).glob("*.jpg"))[:n]


def _copy(files, d: Path) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, d / f.name)) for f in files]


# --------------------------------------------------------------------------------------------- symlinks (item 5)
def test_directory_symlinks_are_followed_and_loops_end(tmp_path, shared_data):
    root = tmp_path / "data"
    own = _copy(_photos(shared_data, 2), root / "own")
    outside = _copy(_photos(shared_data, 3, "enlightenment"), tmp_path / "elsewhere" / "more")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a symlinked subfolder
    (root / "own" / "loop").symlink_to(root, target_is_directory=True)  # a loop back to the top
    (root / "own" / "self").symlink_to(root / "own", target_is_directory=True)  # a loop onto itself
    (root / "dangling").symlink_to(tmp_path / "missing", target_is_directory=True)
    got = list_images(root)
    want = sorted([root / "own" / f.name for f in own] + [root / "linked" / "more" / f.name for f in outside])
    assert got == want  # every real file once, through the symlink, and the loops end
    # the symlinked folder given as the source itself, and a second route to an already listed folder
    assert list_images(root / "linked") == [root / "linked" / "more" / f.name for f in outside]
    (root / "zz_again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert list_images(root) == want  # the folder reached twice is listed once, by the first route in name order
    # a recursive glob walks as a folder does: own/, then the loop up to data/ (own/ is not entered again)
    assert list_images(str(root / "own" / "**" / "*.jpg")) == sorted(
        [root / "own" / f.name for f in own] + [root / "own" / "loop" / "linked" / "more" / f.name for f in outside])


def test_pretrain_and_colorize_follow_symlinked_folders(tmp_path, shared_data, tiny_ckpt, capsys):
    from pretext.colorize import get_args_parser, main
    from pretext.runtime import run_entry
    from pretext.train import PretextConfig, get_dataset

    root = tmp_path / "data"
    own = _copy(_photos(shared_data, 1), root / "own")
    linked = _copy(_photos(shared_data, 3)[1:], tmp_path / "elsewhere")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "own" / "loop").symlink_to(root, target_is_directory=True)
    ds = get_dataset(PretextConfig(data=[str(root)], max_steps=1))
    assert ds.paths == sorted([root / "linked" / f.name for f in linked] + [root / "own" / own[0].name])
    out = tmp_path / "out"
    rc = run_entry(main, get_args_parser(), [str(root), "-o", str(out), "--checkpoint", str(tiny_ckpt), "--workers", "0",
                                             "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == sorted(
        [f"linked/{f.name}" for f in linked] + [f"own/{own[0].name}"])  # mirrored through the link, loop ended


def test_prior_cli_counts_images_in_symlinked_folders(tmp_path, shared_data):
    import subprocess
    import sys

    import numpy as np

    root = tmp_path / "data"
    _copy(_photos(shared_data, 1), root / "own")
    _copy(_photos(shared_data, 3)[1:], tmp_path / "elsewhere")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "own" / "loop").symlink_to(root, target_is_directory=True)
    out = tmp_path / "prior.npz"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "pretext", "prior", str(root), "-o", str(out), "--size", "32",
                        "--workers", "0", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(np.load(out)["num_images"]) == 3


# --------------------------------------------------------------------------------------------- list files (item 7)
@pytest.mark.parametrize("line, path", [
    ("my photos/a b.jpg", "my photos/a b.jpg"),  # spaces belong to the path
    ("  my photos/a.jpg  ", "my photos/a.jpg"),  # surrounding whitespace does not
    ("my photos/a.jpg\t3", "my photos/a.jpg"),  # a label column after a TAB
    ("my photos/a.jpg\t", "my photos/a.jpg"),
    ("n01440764/x.JPEG 0", "n01440764/x.JPEG"),  # Caffe ImageData: path, space, integer label
    ("my photos/x.jpg 12", "my photos/x.jpg"),
    ("odd name 3.jpg", "odd name 3.jpg"),  # ends in an image suffix: all of it is the path
    ("# a comment", None), ("", None), ("   ", None),
])
def test_list_file_entry(line, path):
    assert list_file_entry(line) == path


def test_list_file_with_spaces_in_paths(tmp_path, shared_data):
    files = _copy(_photos(shared_data, 3), tmp_path / "my photos")
    lst = tmp_path / "train.txt"
    lst.write_text("# one path per line\n" + f"my photos/{files[0].name}\n" + f"my photos/{files[1].name}\t7\n"
                   + f"{files[2]}\n")
    assert list_images(lst) == files
    from pretext.train import PretextConfig, get_dataset

    ds = get_dataset(PretextConfig(data=[str(lst)], max_steps=1))
    assert ds.paths == files


def test_colorize_list_file_with_spaces(tmp_path, shared_data, tiny_ckpt, capsys):
    from pretext.colorize import get_args_parser, main
    from pretext.runtime import run_entry

    files = _copy(_photos(shared_data, 2), tmp_path / "my photos")
    lst = tmp_path / "todo.txt"
    lst.write_text("".join(f"my photos/{f.name}\n" for f in files))
    out = tmp_path / "my out"
    rc = run_entry(main, get_args_parser(), [str(lst), "-o", str(out), "--checkpoint", str(tiny_ckpt), "--workers", "0",
                                             "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(f.name for f in files)


# --------------------------------------------------------------------------------------------- unreadable images (item 4)
def _mixed_folder(shared_data, d: Path, n_photos=5) -> tuple[list[Path], list[Path]]:
    """Real photos plus two text files named .jpg and a truncated JPEG (its first third: header and top rows)."""
    import io

    from PIL import Image

    good = _copy(_photos(shared_data, n_photos, "lomiri-wallpapers-20.04") or _photos(shared_data, n_photos), d)
    (d / "b_notes.jpg").write_text("these are notes, not a photograph\n")
    (d / "d_readme.jpg").write_text("README\n")
    raw = io.BytesIO()
    Image.open(good[0]).convert("RGB").save(raw, "JPEG", quality=90)
    (d / "c_truncated.jpg").write_bytes(raw.getvalue()[: len(raw.getvalue()) // 3])
    bad = [d / "b_notes.jpg", d / "c_truncated.jpg", d / "d_readme.jpg"]
    return good, bad


def test_unreadable_samples_are_replaced_by_the_next_readable_file(tmp_path, shared_data):
    import torch

    from pretext.data import TrainCrops

    good, bad = _mixed_folder(shared_data, tmp_path / "mixed")
    paths = list_images(tmp_path / "mixed")
    assert set(paths) == set(good) | set(bad)
    ds = TrainCrops(paths, 64, "rrc")

    def alone(j, seed):  # what file j gives on its own for this sample seed (ok False: its crop does not decode)
        return TrainCrops([paths[j]], 64, "rrc")[(0, seed)]

    items = [(i, 1000 + 7 * i) for i in range(len(paths))] + [(i, 5 + i) for i in range(len(paths))]
    got = [ds[it] for it in items]
    for (i, seed), (x, ok, grey) in zip(items, got):
        assert ok and x.dtype == torch.uint8 and x.abs().sum() > 0  # never a zero placeholder
        j = next(j % len(paths) for j in range(i, i + len(paths)) if alone(j % len(paths), seed)[1])
        assert torch.equal(x, alone(j, seed)[0]), (paths[i], paths[j])  # the next readable file, same seed
    assert {paths[i] for i, _ in items if paths[i] in bad} and set(ds.unreadable()) >= {str(bad[0]), str(bad[2])}
    # the same samples through two loader workers (fresh dataset): identical, and the files marked there are seen
    ds2 = TrainCrops(paths, 64, "rrc")
    loader = torch.utils.data.DataLoader(ds2, batch_size=4, sampler=items, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.stack([x for x, _, _ in got]))
    assert ds2.unreadable() == ds.unreadable()
    report = ds2.report_unreadable()
    assert [str(p) for p, _ in report] == ds2.unreadable() and ds2.report_unreadable() == []  # each file once
    reasons = dict(report)
    assert "not an image" in reasons[bad[0]] and "not an image" in reasons[bad[2]]
    # resume: a checkpoint's list restores the count without logging the files again
    ds3 = TrainCrops(paths, 64, "rrc")
    ds3.restore_unreadable(ds.unreadable() + ["/not/in/this/data.jpg"])
    assert ds3.unreadable() == ds.unreadable() and ds3.report_unreadable() == []


def test_first_usable_reads_until_one_image_decodes(tmp_path, shared_data):
    from pretext.data import first_usable

    good, bad = _mixed_folder(shared_data, tmp_path / "mixed")
    i, counts = first_usable(bad + good)
    assert i == len(bad) and counts["unreadable"] == len(bad) and "b_notes.jpg" in counts["example"]
    i, counts = first_usable(bad)
    assert i is None and counts["unreadable"] == len(bad)



TINY = ["model=alexnet_cc", "model_kwargs.fc_dim=32", "size=64", "tensorboard=false", "progress=false", "log_every=1",
        "lr=1e-3", "loss=ce", "image_every=0", "init=default", "crop=rrc", "model_kwargs.norm=bn", "batch_size=4",
        "checkpoint_every=2", "max_steps=6"]


def _pretrain(args, script=None, env=None):
    import subprocess
    import sys

    entry = [str(script)] if script else ["-m", "pretext.train"]
    cmd = [sys.executable, *entry] + [a for kv in args if not kv.startswith("--") for a in ("--set", kv)]
    cmd += [a for a in args if a.startswith("--")]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)


def test_trainer_replaces_unreadable_images_counts_files_and_resumes_exactly(tmp_path, shared_data):
    """A mixed folder of 5 photos, 2 text files named .jpg and a truncated JPEG (8 files, 2 batches of 4 per epoch,
    3 epochs): every batch is real images, each bad file is logged once with its reason, the count is of files, and
    a run killed at step 3 and resumed gives the uninterrupted run's weights bit for bit."""
    import torch

    from pretext.runtime import load_checkpoint, read_jsonl

    _, bad = _mixed_folder(shared_data, tmp_path / "mixed")
    common = [f"data={tmp_path / 'mixed'}", *TINY, "workers=2"]
    full = _pretrain(common + [f"out_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]
    log_txt = (tmp_path / "full" / "log.txt").read_text()
    logged = [ln for ln in log_txt.splitlines() if "unreadable training image" in ln]
    names = [next(b.name for b in bad if str(b) in ln) for ln in logged]
    assert len(names) == len(set(names)) and {"b_notes.jpg", "d_readme.jpg"} <= set(names)  # once per file
    assert all("not an image" in ln for ln in logged if "notes" in ln or "readme" in ln)
    recs = [r for r in read_jsonl(tmp_path / "full" / "log.jsonl") if r["kind"] == "train"]
    assert recs[-1]["skipped"] == len(names)  # distinct files, not the 3 epochs' events
    script = tmp_path / "kill.py"
    script.write_text(_FAULT_WRAPPER)
    crashed = _pretrain(common + [f"out_dir={tmp_path / 'crash'}"], script=script, env={"FAULT_AT_STEP": "3"})
    assert crashed.returncode == -9
    resumed = _pretrain(common + [f"out_dir={tmp_path / 'crash'}", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pth"), load_checkpoint(tmp_path / "crash" / "checkpoint.pth")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def _unreadable_only(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "a.jpg").write_text("not a photo\n")
    (d / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return d


def test_no_readable_training_image_is_refused_before_the_run_folder(tmp_path, refused_in_one_line):
    data = _unreadable_only(tmp_path / "texts")
    run = tmp_path / "run"
    refused_in_one_line(["pretrain", "--set", f"data={data}", "--set", f"out_dir={run}", "--set", "max_steps=2",
                         "--set", "loss=ce", "--set", "model=alexnet_cc"],
                        expect=["no usable training image", str(data), "2 unreadable"], must_not_exist=[run])


def test_list_file_with_wrong_relative_paths_is_refused(tmp_path, refused_in_one_line, shared_data):
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "train.txt"
    lst.write_text("".join(f"photos/{f.name}\n" for f in _photos(shared_data, 3)))  # relative to the wrong folder
    run = tmp_path / "run"
    refused_in_one_line(["pretrain", "--set", f"data={lst}", "--set", f"out_dir={run}", "--set", "max_steps=2",
                         "--set", "loss=ce", "--set", "model=alexnet_cc"],
                        expect=["no usable training image", "3 unreadable", "file not found"], must_not_exist=[run])
