"""pretext.color against skimage.color (an independent implementation of the same CIE formulas)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import color as skc

from pretext.color import gray_rgb, lab_to_rgb, rgb_to_l, rgb_to_lab

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
TOL = 1e-3


def _sk_lab(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) float -> skimage Lab (3, H, W) float64."""
    return skc.rgb2lab(rgb.double().permute(1, 2, 0).numpy()).transpose(2, 0, 1)


def _sk_rgb(lab: torch.Tensor) -> np.ndarray:
    return skc.lab2rgb(lab.double().permute(1, 2, 0).numpy()).transpose(2, 0, 1)


def _photos(n: int = 4, size: int = 96) -> list[torch.Tensor]:
    from PIL import Image

    if not PHOTOS.is_dir():
        pytest.skip(f"photo folder {PHOTOS} missing (CI clones the repo beside shared/)")
    files = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    out = []
    for f in files[:: max(1, len(files) // n)][:n]:
        im = Image.open(f).convert("RGB")
        im.thumbnail((size, size))
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    return out


def test_rgb_to_lab_random_colours():
    rgb = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(rgb_to_lab(rgb).double().numpy(), _sk_lab(rgb), atol=TOL, rtol=0)


def test_rgb_to_lab_cube_corners_and_round_trip():
    corners = torch.tensor([[(i >> c) & 1 for i in range(8)] for c in range(3)], dtype=torch.float32).view(3, 2, 4)
    lab = rgb_to_lab(corners)
    np.testing.assert_allclose(lab.double().numpy(), _sk_lab(corners), atol=TOL, rtol=0)
    np.testing.assert_allclose(lab_to_rgb(lab).numpy(), corners.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(lab_to_rgb(lab).double().numpy(), _sk_rgb(lab), atol=TOL, rtol=0)


def test_real_photos_match_skimage():
    for rgb in _photos():
        lab = rgb_to_lab(rgb)
        np.testing.assert_allclose(lab.double().numpy(), _sk_lab(rgb), atol=TOL, rtol=0)
        np.testing.assert_allclose(lab_to_rgb(lab).double().numpy(), _sk_rgb(lab), atol=TOL, rtol=0)
        np.testing.assert_allclose(rgb_to_l(rgb)[0].double().numpy(), _sk_lab(rgb)[0], atol=TOL, rtol=0)


def test_lab_to_rgb_clips_out_of_gamut_like_skimage():
    g = torch.Generator().manual_seed(1)
    L = torch.rand(1, 48, 48, generator=g) * 100
    ab = torch.rand(2, 48, 48, generator=g) * 300 - 150  # mostly out of the sRGB gamut
    lab = torch.cat([L, ab])
    with pytest.warns(UserWarning):  # skimage warns about the negative Z values it clips
        ref = _sk_rgb(lab)
    rgb = lab_to_rgb(lab)
    assert rgb.min() >= 0 and rgb.max() <= 1
    np.testing.assert_allclose(rgb.double().numpy(), ref, atol=TOL, rtol=0)
    raw = lab_to_rgb(lab, clip=False)
    assert raw.min() < 0 or raw.max() > 1


def test_gray_rgb_matches_skimage_desaturation():
    rgb = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    lab = _sk_lab(rgb)
    lab[1:] = 0
    np.testing.assert_allclose(gray_rgb(rgb).double().numpy(), skc.lab2rgb(lab.transpose(1, 2, 0)).transpose(2, 0, 1),
                               atol=TOL, rtol=0)
    g = gray_rgb(rgb)
    assert torch.allclose(g[0], g[1], atol=1e-4) and torch.allclose(g[1], g[2], atol=1e-4)


def test_batched_shapes_and_dtype():
    rgb = torch.rand(2, 3, 8, 9, generator=torch.Generator().manual_seed(3))
    lab = rgb_to_lab(rgb)
    assert lab.shape == (2, 3, 8, 9) and lab.dtype == torch.float32
    assert torch.allclose(lab[1], rgb_to_lab(rgb[1]), atol=1e-5)
    assert lab_to_rgb(lab).shape == (2, 3, 8, 9) and lab_to_rgb(lab).dtype == torch.float32
    assert rgb_to_l(rgb).shape == (2, 1, 8, 9) and gray_rgb(rgb).shape == (2, 3, 8, 9)
    assert rgb_to_lab((rgb * 255).to(torch.uint8).float() / 255).dtype == torch.float32
    with pytest.raises(ValueError):
        rgb_to_lab(torch.rand(4, 8, 8))


def test_differentiable_with_finite_gradients_at_the_ends():
    rgb = torch.rand(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    rgb[..., 0, :] = 0.0
    rgb[..., 1, :] = 1.0
    rgb.requires_grad_(True)
    lab = rgb_to_lab(rgb)
    (lab * torch.randn_like(lab)).sum().backward()
    assert torch.isfinite(rgb.grad).all()
    x = torch.rand(1, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1
    assert torch.autograd.gradcheck(rgb_to_lab, (x.requires_grad_(True),))
    lab = rgb_to_lab(x.detach()).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: lab_to_rgb(t, clip=False), (lab,))
    g = torch.zeros(1, 3, 4, 4, requires_grad=True)
    (gray_rgb(g).sum() + lab_to_rgb(rgb_to_lab(g)).sum()).backward()
    assert torch.isfinite(g.grad).all()


def test_colour_maths_stay_float32_under_autocast():
    # AMP must not run the conversions in bf16 (errors of ~0.6 L / ~2 ab would move the soft-encoded targets)
    x = torch.rand(2, 3, 16, 16)
    ref_lab, ref_rgb = rgb_to_lab(x), lab_to_rgb(rgb_to_lab(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lab, L, rgb = rgb_to_lab(x), rgb_to_l(x), lab_to_rgb(ref_lab)
    assert lab.dtype == L.dtype == rgb.dtype == torch.float32
    assert torch.equal(lab, ref_lab) and torch.equal(L, ref_lab[:, :1]) and torch.equal(rgb, ref_rgb)
