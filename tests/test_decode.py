"""The fast training decoder: seeded crops equal torchvision's, draft scale never below the output, pixels within
resampling differences of a full decode, EXIF orientation, other formats, row-limited decoding, read_image."""
import collections
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

from pretext.data import CropSampler, TrainCrops, grey_mask, is_grey, list_images, read_image, train_transform
from pretext.decode import (
    Crop,
    UnreadableImage,
    _axis_plan,
    _draft,
    _load_rows,
    _resample,
    box_to_stored,
    decode_crop,
    draft_scale,
    is_grey_hwc,
    orient,
    resample_crop,
)

S = 176


@pytest.fixture(scope="module")
def photos(shared_data):
    return list_images(shared_data / "photos")[::4]  # ~47 real photographs, 269-768 px


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def _expected(seed: int, W: int, H: int, mode: str, scale_min: float = 0.25):
    """The box and flip that torchvision's own transforms draw for ``seed`` (independent of CropSampler)."""
    torch.manual_seed(seed)
    if mode == "rrc":
        p = T.RandomResizedCrop(S, scale=(scale_min, 1.0)).make_params([Image.new("1", (W, H))])
        box = (p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"])
    else:
        rw, rh = T.Resize(round(S * 256 / 176))(Image.new("1", (W, H))).size
        p = T.RandomCrop(S).make_params([Image.new("1", (rw, rh))])
        box = (p["left"] * W / rw, p["top"] * H / rh, (p["left"] + S) * W / rw, (p["top"] + S) * H / rh)
    flip = bool(T.RandomHorizontalFlip().p > torch.rand(1).item())
    return box, flip


@pytest.mark.parametrize("mode", ["rrc", "resize_crop"])
def test_sampler_draws_torchvisions_crop_for_the_seed(mode):
    rng = np.random.default_rng(0)
    for k in range(300):
        W, H = int(rng.integers(60, 2000)), int(rng.integers(60, 2000))
        smin = float(rng.choice([0.08, 0.25, 0.5]))
        torch.manual_seed(10_000 + k)
        crop = CropSampler(S, mode, smin)(W, H)
        box, flip = _expected(10_000 + k, W, H, mode, smin)
        assert crop.flip == flip and np.allclose(crop.box, box, rtol=0, atol=1e-9), (W, H, crop, box)
        assert 0 <= crop.box[0] < crop.box[2] <= W and 0 <= crop.box[1] < crop.box[3] <= H


@pytest.mark.parametrize("mode", ["rrc", "resize_crop"])
def test_full_scale_pipeline_equals_todays_transforms(photos, mode):
    """With draft decoding off, a seeded sample is today's torchvision pipeline's output (one level: torch's
    uint8 resampling kernel against PIL's)."""
    tf = train_transform(S, mode, 0.25)
    ds = TrainCrops(photos[:16], S, mode, 0.25, draft=False)
    for i, p in enumerate(photos[:16]):
        torch.manual_seed(500 + i)
        ref = _u8(tf(read_image(p)))
        x, ok, grey = ds[(i, 500 + i)]
        assert ok and x.dtype == torch.uint8 and x.shape == (3, S, S)
        assert (x.int() - ref.int()).abs().max() <= 1, p
        assert grey == is_grey(ref.float() / 255)
    a, b = ds[(0, 1)][0], ds[(0, 1)][0]
    assert torch.equal(a, b) and not torch.equal(a, ds[(0, 2)][0])  # the seed decides, nothing else


def test_draft_scale_never_below_output_and_largest():
    rng = np.random.default_rng(1)
    for mode in ("rrc", "resize_crop"):
        for smin in (0.08, 0.25, 1.0):
            smp = CropSampler(S, mode, smin)
            for k in range(400):
                W, H = int(rng.integers(100, 6000)), int(rng.integers(100, 6000))
                for o in (1, 6):  # upright vs stored sides
                    crop = smp(W, H)
                    x0, y0, x1, y1 = box_to_stored(crop.box, (W, H), o)
                    extent = min(x1 - x0, y1 - y0)
                    s = draft_scale(extent, S)
                    assert s in (1, 2, 4, 8)
                    assert s == 1 or extent / s >= S  # never less resolution than a full decode
                    assert s == 8 or extent / (2 * s) < S  # and the largest such scale


@pytest.mark.parametrize("s", [2, 4, 8])
def test_pil_draft_gives_the_scale_and_geometry_assumed(tmp_path, photos, s):
    src = Image.open(photos[0]).convert("RGB").resize((1500, 1003), Image.BICUBIC)
    src.save(tmp_path / "big.jpg", quality=92)
    with Image.open(tmp_path / "big.jpg") as im:
        assert _draft(im, s) == s
        im.load()
        assert im.size == (math.ceil(1500 / s), math.ceil(1003 / s))
        small = np.asarray(im, np.float32)
    # pixel i of the reduced image covers stored pixels [i s, (i + 1) s): compare with a box-filtered full decode
    full = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB"), np.float32)
    h, w = 1003 // s, 1500 // s
    boxed = full[: h * s, : w * s].reshape(h, s, w, s, 3).mean((1, 3))
    assert np.abs(small[:h, :w] - boxed).mean() < 3.0


def _reference(full: Image.Image, crop: Crop, resample) -> torch.Tensor:
    """Full decode + crop + resize: crop then resize (RandomResizedCrop) or resize then crop (``clip`` False)."""
    if crop.clip:
        out = full.crop(tuple(int(c) for c in crop.box)).resize((S, S), resample)
    else:
        out = full.resize((S, S), resample, box=crop.box)
    x = torch.from_numpy(np.array(out)).permute(2, 0, 1).float()
    return x.flip(-1) if crop.flip else x


@pytest.mark.parametrize("mode", ["rrc", "resize_crop"])
def test_draft_pixels_differ_from_full_decoding_no_more_than_resampling_does(photos, mode):
    """Against full decode + crop + bilinear resize of the same box: the draft path's difference is below the
    difference between that reference and the same reference with another antialiasing filter (Lanczos), in
    the mean and in the 99th percentile over the photographs decoded at a reduced scale."""
    smp = CropSampler(S, mode)
    ours, bound, n_draft = [], [], 0
    for i, p in enumerate(photos):
        torch.manual_seed(i)
        d = decode_crop(p, S, smp)
        ref = _reference(read_image(p), d.crop, Image.Resampling.BILINEAR)
        diff = (d.image.float() - ref).abs()
        if d.scale == 1:
            assert diff.max() <= 1  # full scale: the same pixels
            continue
        n_draft += 1
        ours.append(diff.flatten())
        bound.append((_reference(read_image(p), d.crop, Image.Resampling.LANCZOS) - ref).abs().flatten())
    assert n_draft >= 10
    ours, bound = torch.cat(ours), torch.cat(bound)
    assert ours.mean() <= bound.mean(), (ours.mean(), bound.mean())
    assert ours.quantile(0.99) <= bound.quantile(0.99), (ours.quantile(0.99), bound.quantile(0.99))


def _upright_scene(W=320, H=200) -> np.ndarray:
    """An image whose orientation is obvious: a ramp, a red block top-left, a blue bar along the bottom."""
    y, x = np.mgrid[0:H, 0:W]
    a = np.stack([x * 255 // W, y * 255 // H, (x + y) * 127 // (W + H)], -1).astype(np.uint8)
    a[10:60, 10:90] = (230, 20, 20)
    a[H - 30: H - 10, :] = (20, 20, 230)
    return a


# the stored pixels of an upright image for EXIF orientation o: the inverse of what exif_transpose applies
_TO_STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def _save_oriented(path, upright: np.ndarray, o: int, fmt="JPEG"):
    img = Image.fromarray(upright)
    stored = img.transpose(_TO_STORED[o]) if _TO_STORED[o] is not None else img
    exif = Image.Exif()
    exif[0x0112] = o
    stored.save(path, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_to_the_crop_box(tmp_path, fmt):
    W, H = 640, 440  # big crops of it are decoded at 1/2 (JPEG)
    up = _upright_scene(W, H)
    scales = set()
    for o in range(1, 9):
        path = tmp_path / f"o{o}.{fmt.lower()}"
        _save_oriented(path, up, o, fmt)
        full = read_image(path)
        assert full.size == (W, H)  # read_image shows it upright
        assert np.abs(np.asarray(full, np.float32) - up).mean() < 3  # JPEG blocking differs, the scene does not
        for mode, seed in (("rrc", o), ("resize_crop", o + 10)):
            torch.manual_seed(seed)
            d = decode_crop(path, S, CropSampler(S, mode, 0.5), draft=False)
            box, flip = _expected(seed, W, H, mode, 0.5)  # drawn on the upright size
            assert np.allclose(d.crop.box, box, rtol=0, atol=1e-9) and d.crop.flip == flip
            ref = _reference(full, d.crop, Image.Resampling.BILINEAR)
            assert (d.image.float() - ref).abs().max() <= 1, (o, mode)
            if fmt == "JPEG":
                torch.manual_seed(seed)
                dd = decode_crop(path, S, CropSampler(S, mode, 0.5))  # with draft decoding
                assert (dd.image.float() - ref).abs().mean() < 2.5, (o, mode, dd.scale)
                scales.add(dd.scale)
    assert fmt == "PNG" or scales == {1, 2}  # both full and 1/2 decoding were checked


def test_orient_matches_exif_transpose():
    a = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for o in range(1, 9):
        img = Image.fromarray(a)
        exif = img.getexif()
        exif[0x0112] = o
        img.info["exif"] = exif.tobytes()
        want = np.asarray(ImageOps.exif_transpose(img))
        got = orient(torch.from_numpy(a).permute(2, 0, 1), o).permute(1, 2, 0).numpy()
        assert np.array_equal(got, want), o


def _formats(tmp_path, base: np.ndarray) -> dict:
    img = Image.fromarray(base)
    files = {}
    for name, im, kw in [
        ("rgba.png", img.convert("RGBA"), {}), ("palette.gif", img.convert("P"), {}),
        ("grey.jpg", img.convert("L"), {"quality": 95}), ("cmyk.jpg", img.convert("CMYK"), {"quality": 95}),
        ("rgb.webp", img, {"lossless": True}), ("rgb.bmp", img, {}),
    ]:
        im.save(tmp_path / name, **kw)
        files[name] = tmp_path / name
    a16 = (np.asarray(img.convert("L"), np.uint16) * 257)
    Image.fromarray(a16).save(tmp_path / "grey16.png")
    files["grey16.png"] = tmp_path / "grey16.png"
    return files


def test_other_formats_go_through_the_same_crops(tmp_path, photos):
    base = np.asarray(Image.open(photos[1]).convert("RGB"))
    files = _formats(tmp_path, base)
    ds = TrainCrops(list(files.values()), S, "rrc")
    tf = train_transform(S, "rrc")
    for i, (name, p) in enumerate(files.items()):
        torch.manual_seed(i)
        ref = _u8(tf(read_image(p)))
        x, ok, grey = ds[(i, i)]
        assert ok and x.shape == (3, S, S) and x.dtype == torch.uint8, name
        assert grey == name.startswith("grey"), name
        tol = 1 if name in ("rgba.png", "palette.gif", "rgb.webp", "rgb.bmp", "grey16.png") else 8  # JPEG: draft
        assert (x.int() - ref.int()).abs().float().mean() <= tol, name


def test_unreadable_files_are_flagged(tmp_path, photos):
    data = photos[0].read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    bad = [tmp_path / "trunc.jpg", tmp_path / "junk.jpg", tmp_path / "gone.jpg"]
    ds = TrainCrops(bad, S, "resize_crop")
    for i in range(3):  # nothing readable to stand in: a zero placeholder, flagged
        x, ok, grey = ds[(i, 0)]
        assert not ok and not grey and x.shape == (3, S, S) and x.dtype == torch.uint8 and not x.any()
    assert ds.num_unreadable() == 3 and ds.unreadable() == [str(p) for p in bad]  # each file once
    # with a readable file after them, each bad one is replaced by it, drawn with the bad item's own seed
    ds = TrainCrops([*bad, photos[0]], S, "resize_crop")
    for i in range(3):
        x, ok, _ = ds[(i, 7)]
        assert ok and torch.equal(x, ds[(3, 7)][0])
    assert ds.num_unreadable() == 3
    with pytest.raises(UnreadableImage, match="trunc.jpg"):
        decode_crop(tmp_path / "trunc.jpg", S, lambda w, h: Crop((0, h * 0.8, w, h), False, True))


def test_row_limited_decoding_is_the_top_of_a_full_decode(tmp_path, photos):
    Image.open(photos[0]).save(tmp_path / "progressive.jpg", progressive=True, quality=90)
    Image.open(photos[1]).save(tmp_path / "restarts.jpg", quality=90, restart_marker_rows=2)
    for p in photos[:4] + [tmp_path / "progressive.jpg", tmp_path / "restarts.jpg"]:
        full = np.asarray(Image.open(p).convert("RGB"))
        for rows in (1, 37, full.shape[0] // 2, full.shape[0]):
            with Image.open(p) as im:
                _load_rows(im, rows)
                assert im.size == (full.shape[1], rows)
                assert np.array_equal(np.asarray(im), full[:rows])
            with Image.open(p) as im:  # decoded into torch memory: the tensor is the image's pixels
                px = _load_rows(im, rows, to_tensor=True)
                assert px is not None and px.shape == (rows, full.shape[1], 4)
                assert np.array_equal(px[..., :3].numpy(), full[:rows]) and np.array_equal(np.asarray(im), full[:rows])
    Image.open(photos[0]).convert("L").save(tmp_path / "grey.jpg", quality=90)
    Image.open(photos[0]).save(tmp_path / "plain.png")
    with Image.open(tmp_path / "grey.jpg") as im:
        px = _load_rows(im, 10, to_tensor=True)  # grey: all rows (only RGB is cut), one channel
        assert px.shape == (im.height, im.width, 1) and np.array_equal(px[..., 0].numpy(), np.asarray(im))
    with Image.open(tmp_path / "plain.png") as im:
        assert _load_rows(im, 10, to_tensor=True) is None and im.size == Image.open(photos[0]).size  # not a JPEG


def test_grey_test_on_uint8_is_the_float_one():
    rng = np.random.default_rng(3)
    for k in range(300):
        base = rng.integers(0, 256, (1, 12, 9), dtype=np.int16)
        noise = rng.integers(-3, 4, (3, 12, 9)) * (rng.random((3, 12, 9)) < rng.choice([0.0, 0.01, 0.3]))
        x = torch.from_numpy(np.clip(base + noise, 0, 255).astype(np.uint8))
        want = bool(((x.float() / 255 - (x.float() / 255).mean(0, keepdim=True)).abs().amax() <= 2 / 255 + 1e-7))
        assert is_grey(x) == want and is_grey_hwc(x.permute(1, 2, 0).contiguous().numpy()) == want
        assert bool(grey_mask(x[None])[0]) == want  # the batched test of the device path


def test_read_image_min_size_keeps_the_shorter_side(tmp_path, photos):
    src = Image.open(photos[2]).convert("RGB").resize((1200, 896), Image.BICUBIC)
    _save_oriented(tmp_path / "r.jpg", np.asarray(src), 6)  # stored 896 x 1200
    full = np.asarray(read_image(tmp_path / "r.jpg"), np.float32)
    assert full.shape == (896, 1200, 3)
    for m, s in ((0, 1), (100, 8), (112, 8), (113, 4), (224, 4), (300, 2), (448, 2), (449, 1)):
        img = read_image(tmp_path / "r.jpg", min_size=m)
        assert img.size == (1200 // s, 896 // s), (m, img.size)  # the largest scale keeping >= m, upright
        blocks = full.reshape(896 // s, s, 1200 // s, s, 3).mean((1, 3))  # DCT-domain scaling ~ s x s averages
        assert np.abs(np.asarray(img, np.float32) - blocks).mean() < 3, m


def test_resample_crop_is_pils_crop_then_resize_or_resize_box():
    """The torch fast path (crops with a whole-pixel edge per axis), the mixed one (one axis each) and the PIL path
    give PIL's pixels."""
    rng = np.random.default_rng(0)
    kinds = collections.Counter()
    for k in range(150):
        H, W = int(rng.integers(100, 300)), int(rng.integers(100, 300))
        im = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        size = int(rng.integers(8, 40))
        x0, y0 = int(rng.integers(0, 2 * W - 4 * size)), int(rng.integers(0, 2 * H - 4 * size))
        w, h = rng.integers(2 * size, 2 * W) / 2, rng.integers(2 * size, 2 * H) / 2
        box = (x0 / 2, y0 / 2, min(W, x0 / 2 + w), min(H, y0 / 2 + h))
        for clip in (True, False):
            if clip:
                win = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
                rel = (box[0] - win[0], box[1] - win[1], box[2] - win[0], box[3] - win[1])
                want = im.crop(win).resize((size, size), Image.Resampling.BILINEAR, box=rel)
                kinds[(_axis_plan(box[0], box[2], size) is not None, _axis_plan(box[1], box[3], size) is not None)] += 1
            else:
                want = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
            got = resample_crop(im, box, size, clip)
            assert got.shape == (size, size, 3)
            assert (got.int() - torch.from_numpy(np.array(want)).int()).abs().max() <= 1, (box, size, clip)
    # torch for both axes, torch for one (PIL's pass for the other, in PIL's order), PIL alone: all checked
    assert kinds[(True, True)] > 30 and kinds[(True, False)] > 5 and kinds[(False, True)] > 5 and kinds[(False, False)]


def test_resize_grid_boxes_through_torch_are_pils_resize_box():
    """resize_crop's boxes (a crop of the image resized to a shorter side r; at a draft scale too) go through
    torch's kernel with windows anchored on the resize grid, before the box or at/after it (mirrored), and give
    PIL's ``resize(box=...)`` on the whole image, to one level."""
    rng = np.random.default_rng(5)
    kinds = collections.Counter()
    for k in range(120):
        W, H = int(rng.integers(120, 700)), int(rng.integers(120, 700))
        a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        im = Image.fromarray(a).resize((W, H), Image.BOX, reducing_gap=None)
        size = int(rng.integers(8, 60))
        r = int(rng.integers(size, max(size + 1, min(W, H) // 2 + 1)))  # downscaling: the shorter side to r
        rw, rh = (r, int(r * H / W)) if W <= H else (int(r * W / H), r)
        left, top = int(rng.integers(0, rw - size + 1)), int(rng.integers(0, rh - size + 1))
        sx, sy = W / rw, H / rh
        box = (left * sx, top * sy, min(W, (left + size) * sx), min(H, (top + size) * sy))
        s = int(rng.choice([1, 1, 2]))  # as decoded at 1/2: PIL's resize of the reduced image is then the truth
        if s == 2:
            im = im.reduce(2)
            box = tuple(c / 2 for c in box)
        ax = _axis_plan(box[0], box[2], size, im.width, far=True)
        ay = _axis_plan(box[1], box[3], size, im.height)
        if ax is not None and ay is not None:
            kinds["torch"] += 1
            kinds["mirrored"] += ax.flip
            kinds["anchored inside"] += ax.lo > 0 and not ax.flip or ay.lo > 0
            kinds["outputs skipped"] += ax.skip > 0 or ay.skip > 0
        got = resample_crop(im, box, size, clip=False)
        want = np.array(im.resize((size, size), Image.Resampling.BILINEAR, box=box))
        assert (got.int() - torch.from_numpy(want).int()).abs().max() <= 1, (W, H, r, box, s, ax, ay)
    assert kinds["torch"] >= 100 and kinds["mirrored"] >= 10 and kinds["anchored inside"] >= 10, kinds
    assert kinds["outputs skipped"] >= 50, kinds


def test_decoded_crop_owns_only_its_pixels(photos):
    """The crop handed to the loader's queue is not a view into the decoded image or into the resampling's extra
    outputs (that would ship or keep them with every sample): its storage is its pixels (4 bytes each at most:
    PIL's RGBX)."""
    for mode in ("rrc", "resize_crop"):
        smp = CropSampler(S, mode)
        for i, p in enumerate(photos[:8]):
            torch.manual_seed(i)
            d = decode_crop(p, S, smp)
            assert d.image.shape == (3, S, S) and d.image.untyped_storage().nbytes() <= 4 * S * S, (p, mode)
