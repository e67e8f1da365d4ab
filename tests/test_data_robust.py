"""Honest data accounting (issue 11): symlinked folders, list files with spaces, unreadable training images
replaced deterministically and counted once per file, and a training set with no readable image refused."""
import os
import shutil
from pathlib import Path

import pytest

from pretext.data import list_file_entry, list_images
from pretext.runtime import UserError


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
