"""Image sources: folders (recursive), list files, globs; robust decoding."""
import numpy as np
import pytest
import torch
from PIL import Image

from pretext.data import (
    ImageDataset,
    UnreadableImage,
    is_grey,
    list_images,
    pil_to_tensor,
    read_image,
)
from pretext.runtime import UserError


def _tree(tmp_path):
    rng = np.random.default_rng(0)
    for rel in ("a/x.jpg", "a/b/y.png", "c/z.webp", "c/notes.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".txt":
            p.write_text("not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(p)
    return tmp_path


def test_folder_list_file_and_glob(tmp_path):
    root = _tree(tmp_path)
    assert [p.relative_to(root).as_posix() for p in list_images(root)] == ["a/b/y.png", "a/x.jpg", "c/z.webp"]
    lst = root / "train.txt"
    lst.write_text("# one path per line, relative to the list file\na/x.jpg\nc/z.webp 3\n\n")
    assert list_images(lst) == [root / "a/x.jpg", root / "c/z.webp"]
    assert list_images(str(root / "a" / "**" / "*.png")) == [root / "a/b/y.png"]
    assert list_images([root / "a", root / "a/x.jpg"]) == [root / "a/b/y.png", root / "a/x.jpg"]  # de-duplicated
    with pytest.raises(UserError, match="no such file or folder"):
        list_images(root / "missing")


def test_unreadable_is_flagged_not_raised(tmp_path):
    root = _tree(tmp_path)
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(UnreadableImage, match="bad.jpg"):
        read_image(root / "bad.jpg")
    ds = ImageDataset([root / "a/x.jpg", root / "bad.jpg"], pil_to_tensor, placeholder_shape=(3, 8, 10))
    with pytest.warns(UserWarning, match="bad.jpg"):
        x, ok, grey = ds[1]
    assert not ok and x.shape == (3, 8, 10)
    x, ok, grey = ds[0]
    assert ok and not grey and x.shape == (3, 8, 10)


def test_grey_detection():
    assert is_grey(torch.full((3, 4, 4), 0.5)) and not is_grey(torch.rand(3, 4, 4))
