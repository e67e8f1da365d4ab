import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pretext.encoding import load_bins
from pretext.prior import compute_prior, load_prior
from pretext.runtime import UserError


def test_prior_from_real_photos_peaks_near_neutral(tmp_path, shared_data):
    out = tmp_path / "prior.npz"
    r = subprocess.run([sys.executable, "-m", "pretext", "prior", str(shared_data / "photos"), "-o", str(out),
                        "--size", "64", "--max-images", "40", "--no-progress", "--workers", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pr = load_prior(out)
    p, bins = pr["probs"], pr["bins"]
    assert torch.equal(bins, load_bins())
    assert abs(float(p.sum()) - 1) < 1e-9 and (p > 0).all()  # smoothing spreads mass to every bin
    mode = bins[p.argmax()]
    assert mode.norm() <= 15, f"prior peaks at {mode.tolist()}, not near neutral"
    # mass-weighted mean chroma of natural photos is modest; the 0..255 bug puts it at the saturated rim
    assert float((p * bins.double().norm(dim=1)).sum()) < 40
    z = np.load(out)
    assert int(z["num_images"]) + int(z["skipped_grey"]) + int(z["skipped_unreadable"]) == 40
    assert float(z["sigma"]) == 5.0 and str(z["source"]).endswith("photos")


def test_unreadable_and_grey_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(d / f"c{i}.png")
    Image.fromarray(rng.integers(0, 255, (24, 32), dtype=np.uint8)).save(d / "grey.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (d / "notes.txt").write_text("not an image")
    paths = sorted(p for p in d.iterdir() if p.suffix != ".txt")
    pr = compute_prior(paths, load_bins(), size=0, workers=0, progress=False)
    assert (pr["num_images"], pr["skipped_grey"], pr["skipped_unreadable"]) == (3, 1, 1)
    assert pr["counts"].sum() == 3 * 24 * 32


def test_histogram_counts_nearest_bins(tmp_path):
    # a flat image of one sRGB colour lands entirely in the bin nearest to its Lab ab (skimage as reference)
    from skimage.color import rgb2lab

    col = np.array([200, 40, 60], dtype=np.uint8)
    Image.fromarray(np.tile(col, (8, 8, 1))).save(tmp_path / "red.png")
    pr = compute_prior([tmp_path / "red.png"], load_bins(), size=0, workers=0, progress=False)
    ab = rgb2lab(col[None, None] / 255.0)[0, 0, 1:]
    bins = load_bins().numpy()
    expect = np.argmin(((bins - ab) ** 2).sum(1))
    assert pr["counts"][expect] == 64 and pr["counts"].sum() == 64


def test_data_derived_bins_other_grid(tmp_path, shared_data):
    paths = sorted((shared_data / "photos" / "enlightenment").glob("*.jpg"))[:3]
    pr = compute_prior(paths, None, size=48, grid=20, workers=0, progress=False)
    b = torch.from_numpy(pr["bins"])
    assert (b.remainder(20) == 0).all() and len(b) == len(pr["probs"]) and (pr["counts"] > 0).all()


def test_no_usable_images(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no usable colour images"):
        compute_prior([tmp_path / "x.jpg"], load_bins(), workers=0, progress=False)


def test_load_prior_errors(tmp_path):
    with pytest.raises(UserError, match="prior file not found"):
        load_prior(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"zzz")
    with pytest.raises(UserError, match="bad.npz: not a prior file"):
        load_prior(tmp_path / "bad.npz")


def test_shipped_prior_is_the_quickstart_samples_prior():
    """Provenance of pretext/data/prior_sample.npz: recomputed here from pretext/sample/train exactly as shipped."""
    from pretext.data import list_images
    from pretext.prior import load_shipped_prior
    from pretext.quickstart import sample_dir

    shipped = load_shipped_prior()
    again = compute_prior(list_images(sample_dir() / "train"), load_bins(), size=160, workers=0, progress=False)
    assert torch.equal(shipped["bins"], load_bins())
    assert np.allclose(shipped["probs"].numpy(), again["probs"], rtol=1e-12, atol=0)
    assert int(shipped["num_images"]) == int(again["num_images"]) and "pretext/sample/train" in str(shipped["source"])
    assert "shipped prior" in shipped["description"] and f"{int(again['num_images'])} colour photos" in shipped["description"]


@pytest.mark.parametrize("bad, expect", [
    (["--size", "-1"], "--size -1"),
    (["--sigma", "-2"], "--sigma -2"),
    (["--sigma", "nan"], "--sigma nan"),
    (["--grid", "0.01"], "--grid 0.01"),
    (["--grid", "-5"], "--grid -5"),
    (["--workers", "-1"], "--workers -1"),
    (["--max-images", "-1"], "--max-images -1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_are_refused_in_one_line(tmp_path, shared_data, refused_in_one_line, bad, expect):
    out = tmp_path / "new" / "prior.npz"
    refused_in_one_line(["prior", shared_data / "photos" / "skimage", "-o", out, *bad], expect=expect,
                        must_not_exist=[out.parent])


def test_output_that_is_a_folder_or_under_a_file_is_refused(tmp_path, shared_data, refused_in_one_line):
    (tmp_path / "afile").write_text("x")
    refused_in_one_line(["prior", shared_data / "photos" / "skimage", "-o", tmp_path], expect="is a folder")
    refused_in_one_line(["prior", shared_data / "photos" / "skimage", "-o", tmp_path / "afile" / "p.npz"],
                        expect="is a file")
