"""``crosschannel colorize``: real photos, legacy black-and-white scans, bad inputs, both checkpoint kinds."""
import io
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretext.color import rgb_to_l
from pretext.colorize import colorize, get_args_parser, load_colorizer, main
from pretext.data import pil_to_tensor, read_image
from pretext.encoding import load_bins
from pretext.models import create_model
from pretext.runtime import UserError, run_entry

SIZE = 64  # tiny network input: colours are not under test here


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("alexnet_cc", fc_dim=64)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(dict(model_name="alexnet_cc", model_kwargs=dict(fc_dim=64), model=model.state_dict(), target="ab313",
                    bins=load_bins(), prior=None, input_size=SIZE, config={}, step=0), path)
    return path


def _eccv16_layout(model) -> OrderedDict:
    """Weights of a ZhangVGG(bn_affine=True, l_norm=100) in the layout of the released colorization_release_v2 .pth
    (pre-0.4: no num_batches_tracked)."""
    sd = OrderedDict()
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith("head."):
            k = "model8.6." + k[len("head."):]
        else:
            k = "model" + k[len("conv"):]
        sd[k] = v.clone()
    sd["model_out.weight"] = (load_bins() * 0.9).t().reshape(2, 313, 1, 1) / 110.0  # not quite pts_in_hull
    return sd


def _official_forward(sd: OrderedDict, L: torch.Tensor) -> torch.Tensor:
    """richzhang/colorization colorizers/eccv16.py ECCVGenerator.forward, transcribed: (L - 50) / 100 -> model1..8 ->
    plain softmax -> model_out (1x1 conv, no bias) -> x4 bilinear upsampling -> x 110."""
    port = create_model("zhang_vgg", bn_affine=True, l_norm=100.0).eval()  # the port's layers in our names
    port.load_state_dict({("head." + k[9:] if k.startswith("model8.6.") else "conv" + k[5:]): v
                          for k, v in sd.items() if k != "model_out.weight"}, strict=False)
    with torch.no_grad():
        probs = torch.softmax(port(L), dim=1)
        ab = torch.nn.functional.conv2d(probs, sd["model_out.weight"])
        return torch.nn.functional.interpolate(ab, scale_factor=4, mode="bilinear", align_corners=False) * 110.0


def _run(argv, capsys):
    rc = run_entry(main, get_args_parser(), [str(a) for a in argv])
    return rc, capsys.readouterr()


def _l_of(img: Image.Image) -> torch.Tensor:
    return rgb_to_l(pil_to_tensor(img.convert("RGB")))


def _write_fixtures(d: Path, photo: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    src = Image.open(photo).convert("RGB")
    src = src.resize((160, 120))
    raw = io.BytesIO()
    src.save(raw, "JPEG", quality=90)
    (d / "truncated.jpg").write_bytes(raw.getvalue()[: len(raw.getvalue()) // 2])
    (d / "notes.jpg").write_text("this is not an image\n")
    rgba = src.copy()
    alpha = Image.linear_gradient("L").resize(src.size)
    rgba.putalpha(alpha)
    rgba.save(d / "rgba.png")
    src.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    grey16 = (np.asarray(src.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16.astype(np.uint16)).save(d / "grey16.png")
    src.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    src.save(d / "rotated.jpg", quality=95, exif=exif.tobytes())
    return dict(alpha=alpha)


def test_bad_inputs_and_modes(ckpt, tmp_path, shared_data, capsys):
    inp = tmp_path / "in"
    fx = _write_fixtures(inp, shared_data / "photos" / "skimage" / "coffee.jpg")
    out = tmp_path / "out"
    rc, cap = _run([inp, "-o", out, "--checkpoint", ckpt, "--workers", 0, "--batch-size", 3, "--device", "cpu"], capsys)
    assert rc == 1
    err_lines = [line for line in cap.err.splitlines() if line.strip() and "%|" not in line]
    assert len(err_lines) == 2, cap.err
    assert any("truncated.jpg" in line for line in err_lines) and any("notes.jpg" in line for line in err_lines)
    for name in ("rgba.png", "palette.png", "grey16.png", "cmyk.jpg", "rotated.jpg"):
        o = out / name
        assert o.is_file(), name
        rgb_in = read_image(inp / name)
        img = Image.open(o)
        assert img.size == rgb_in.size, name
        diff = (_l_of(img) - _l_of(rgb_in)).abs()
        lossless = o.suffix == ".png"  # JPEG outputs add their own (small) compression error
        assert float(diff.mean()) < 0.5 and (float(diff.max()) < 2.0 or not lossless), (name, diff.mean(), diff.max())
    assert Image.open(out / "rotated.jpg").size == (120, 160)  # EXIF orientation applied
    rgba = Image.open(out / "rgba.png")
    assert rgba.mode == "RGBA" and np.array_equal(np.asarray(rgba.getchannel("A")), np.asarray(fx["alpha"]))
    assert not (out / "truncated.jpg").exists() and not (out / "notes.jpg").exists()


def test_legacy_bw_full_size_and_mirroring(ckpt, tmp_path, shared_data, capsys):
    legacy = shared_data / "legacy_bw"
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("chelsea.jpg", "coffee.jpg"):
        (photos / "sub" / name).write_bytes((shared_data / "photos" / "skimage" / name).read_bytes())
    out = tmp_path / "out"
    rc, cap = _run([legacy, photos, "-o", out, "--checkpoint", ckpt, "--workers", 0, "--device", "cpu"], capsys)
    assert rc == 0, cap.err
    for f in sorted(legacy.iterdir()):
        o = out / f.name
        assert Image.open(o).size == Image.open(f).size
        img = Image.open(o).convert("RGB")
        assert float((_l_of(img) - _l_of(read_image(f))).abs().mean()) < 0.5
    assert (out / "sub" / "chelsea.jpg").is_file() and (out / "sub" / "coffee.jpg").is_file()  # tree mirrored


def test_never_overwrites_inputs_and_exact_output_name(ckpt, tmp_path, shared_data, capsys):
    d = tmp_path / "in"
    d.mkdir()
    src = d / "chelsea.jpg"
    src.write_bytes((shared_data / "photos" / "skimage" / "chelsea.jpg").read_bytes())
    before = src.read_bytes()
    rc, cap = _run([d, "-o", d, "--checkpoint", ckpt, "--workers", 0], capsys)
    assert rc == 2 and "is the input folder" in cap.err and src.read_bytes() == before
    assert sorted(os.listdir(d)) == ["chelsea.jpg"]
    rc, cap = _run([src, "-o", src, "--checkpoint", ckpt, "--workers", 0], capsys)
    assert rc == 1 and src.read_bytes() == before
    out = tmp_path / "exact" / "colour.webp"
    rc, cap = _run([src, "-o", out, "--checkpoint", ckpt, "--workers", 0], capsys)
    assert rc == 0 and Image.open(out).format == "WEBP" and Image.open(out).size == Image.open(src).size
    rc, cap = _run([tmp_path / "missing.jpg", src, "-o", tmp_path / "o2", "--checkpoint", ckpt, "--workers", 0], capsys)
    assert rc == 1 and "missing.jpg: no such file" in cap.err and (tmp_path / "o2" / "chelsea.jpg").is_file()
    rc, cap = _run([tmp_path / "empty_glob*.png", "-o", out, "--checkpoint", ckpt], capsys)
    assert rc == 2 and "no images found" in cap.err


def test_python_api_and_cache(ckpt, shared_data):
    col = load_colorizer(ckpt)
    assert load_colorizer(ckpt) is col
    img = Image.open(shared_data / "legacy_bw" / "coins.png")  # mode L
    out = colorize(img, col)
    assert out.size == img.size and out.mode == "RGB"
    rgba = Image.open(shared_data / "photos" / "skimage" / "chelsea.jpg").convert("RGBA")
    out = colorize(rgba, ckpt, size=96)
    assert out.mode == "RGBA" and out.size == rgba.size


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)


def test_eccv16_release_weights(tmp_path, shared_data):
    from pretext.predict import predict_ab_lowres

    torch.manual_seed(0)
    ref = create_model("zhang_vgg", bn_affine=True, l_norm=100.0)
    _randomise_bn(ref)
    with torch.no_grad():
        ref.head.weight.mul_(100.0)  # logits of a trained net's spread, so that the temperature matters
    sd = _eccv16_layout(ref.eval())
    path = tmp_path / "colorization_release_v2.pth"
    torch.save(sd, path)
    col = load_colorizer(path)
    assert col.kind == "eccv16" and col.target == "ab313" and col.input_size == 256
    assert abs(col.temperature - 1 / 2.606) < 1e-9
    L = torch.rand(2, 1, 48, 64) * 100
    official = _official_forward(sd, L)
    # the default decode of imported weights reproduces the official forward (softmax, model_out, x4 upsampling)
    ab_low = predict_ab_lowres(col.model, L, col.target, col.bins, col.temperature, channels_last=col.channels_last)
    ours = torch.nn.functional.interpolate(ab_low, scale_factor=4, mode="bilinear", align_corners=False)
    assert official.shape == ours.shape == (2, 2, 48, 64)
    torch.testing.assert_close(ours, official, atol=1e-4, rtol=0)
    # a wrong temperature would show: T = 1 (a plain mean of the imported logits) is far off; the paper's 0.38 is
    # close to, not the same as, the deploy net's 1 / 2.606
    assert (predict_ab_lowres(col.model, L, col.target, col.bins, 1.0) - ab_low).abs().max() > 1.0
    assert 0 < (predict_ab_lowres(col.model, L, col.target, col.bins, 0.38) - ab_low).abs().max() < 1.0
    # --temperature means the same for imported weights and a crosschannel checkpoint of the same logits
    ck = tmp_path / "cc.pth"
    torch.save(dict(model_name="zhang_vgg", model_kwargs=dict(bn_affine=True), model=col.model.state_dict(),
                    target="ab313", bins=col.bins.cpu(), prior=None, input_size=256, config={"temperature": 0.38}), ck)
    cc = load_colorizer(ck)
    for T in (0.2, 0.38, 1.0):
        torch.testing.assert_close(predict_ab_lowres(cc.model, L, cc.target, cc.bins, T),
                                   predict_ab_lowres(col.model, L, col.target, col.bins, T), atol=1e-4, rtol=0)
    img = Image.open(shared_data / "legacy_bw" / "coins.png")
    assert colorize(img, col, size=32).size == img.size


def test_unknown_checkpoint(tmp_path):
    p = tmp_path / "junk.pt"
    torch.save({"foo": torch.zeros(1)}, p)
    with pytest.raises(UserError, match="junk.pt"):
        load_colorizer(p)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="text.pt"):
        load_colorizer(tmp_path / "text.pt")


def test_cli_dispatch(ckpt, tmp_path, shared_data):
    from pretext.cli import main as cli_main

    out = tmp_path / "o"
    rc = cli_main(["colorize", str(shared_data / "legacy_bw" / "coins.png"), "-o", str(out), "--checkpoint", str(ckpt),
                   "--workers", "0", "--amp", "bf16"])
    assert rc == 0 and (out / "coins.png").is_file()


# --------------------------------------------------------------------------------------------- outputs (issue 11)
def _two_photos(shared_data, d: Path) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("chelsea.jpg", "coffee.jpg"):
        (d / name).write_bytes((shared_data / "photos" / "skimage" / name).read_bytes())
        out.append(d / name)
    return out


def test_existing_outputs_are_skipped_unless_overwrite(ckpt, tmp_path, shared_data, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _two_photos(shared_data, inp)
    args = [inp, "-o", out, "--checkpoint", ckpt, "--workers", 0, "--no-progress"]
    rc, cap = _run(args, capsys)
    assert rc == 0 and "colorized 2/2" in cap.out and "skipped" not in cap.out
    (out / "chelsea.jpg").write_bytes(b"kept")  # an output that exists (e.g. from an earlier run)
    (out / "coffee.jpg").unlink()
    rc, cap = _run(args, capsys)
    assert rc == 0 and "colorized 1/2" in cap.out and "1 skipped: output exists, --overwrite replaces" in cap.out
    assert (out / "chelsea.jpg").read_bytes() == b"kept" and Image.open(out / "coffee.jpg").size == Image.open(inp / "coffee.jpg").size
    rc, cap = _run(args + ["--overwrite"], capsys)
    assert rc == 0 and "colorized 2/2" in cap.out and "skipped" not in cap.out
    assert Image.open(out / "chelsea.jpg").size == Image.open(inp / "chelsea.jpg").size  # replaced


def test_output_folder_inside_the_input_folder_is_never_read(ckpt, tmp_path, shared_data, capsys):
    inp = tmp_path / "photos"
    _two_photos(shared_data, inp)
    out = inp / "colorized"
    for k in range(2):  # the second run must not colorize the first run's outputs (no photos/colorized/colorized/)
        rc, cap = _run([inp, "-o", out, "--checkpoint", ckpt, "--workers", 0, "--no-progress", "--overwrite"], capsys)
        assert rc == 0 and "colorized 2/2" in cap.out, (k, cap.out, cap.err)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["chelsea.jpg", "coffee.jpg"]
    # also when the output folder is reached through a glob or a list file
    rc, cap = _run([str(inp / "**" / "*.jpg"), "-o", out, "--checkpoint", ckpt, "--workers", 0, "--no-progress"], capsys)
    assert rc == 0 and "0/2" in cap.out and "2 skipped" in cap.out


def test_second_run_into_a_busy_output_folder_is_refused(ckpt, tmp_path, shared_data, refused_in_one_line):
    """Two runs into one folder would interleave two models' outputs: the folder is locked (``RunLock``, flock) for
    the duration of a run, and a second run is refused in one line naming the holder; nothing is written."""
    from pretext.runtime import RunLock

    inp, out = tmp_path / "in", tmp_path / "out"
    _two_photos(shared_data, inp)
    with RunLock(out):  # a run in progress (this process holds the lock)
        refused_in_one_line(["colorize", inp, "-o", out, "--checkpoint", ckpt, "--workers", 0, "--no-progress"],
                            expect=["in use by another run", f"pid {os.getpid()}"])
    assert [p.name for p in out.iterdir()] == [".lock"]


@pytest.mark.parametrize("bad, expect", [
    (["--size", "7"], "--size 7"),
    (["--size", "-5"], "--size -5"),
    (["--size", "100000"], "--size 100000"),
    (["--workers", "-1"], "--workers -1"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--ext", "xyz"], "--ext xyz"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_are_refused_in_one_line(ckpt, tmp_path, shared_data, refused_in_one_line, bad, expect):
    out = tmp_path / "out"
    refused_in_one_line(["colorize", shared_data / "photos" / "skimage" / "chelsea.jpg", "-o", out, "--checkpoint", ckpt,
                         *bad], expect=expect, must_not_exist=[out])
