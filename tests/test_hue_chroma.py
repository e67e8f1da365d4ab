"""pretext.hue_chroma against transcriptions of gustavla/autocolorize (its Caffe layers, train_vgg16.prototxt's
weight layers, extraction.py's decoding) and hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from pretext import hue_chroma as hc
from pretext.color import l_to_grey, rgb_to_l, rgb_to_lab
from pretext.targets import HueChroma

F32 = np.float32
FLT_MIN = np.finfo(np.float32).tiny


# --------------------------------------------------------------------- transcriptions of the released layers
def _bgr_to_munsell(rgb: np.ndarray):
    """caffe/src/caffe/layers/bgr_to_munsell_layer.cpp Forward_cpu, per pixel (float Dtype; out0 / 6.0 + 10.0 and
    std::fmod in double). rgb (3, H, W) -> h, c, v (H, W)."""
    _, H, W = rgb.shape
    h_out, c_out, v_out = (np.zeros((H, W), F32) for _ in range(3))
    for i in range(H):
        for j in range(W):
            r, g, b = (F32(rgb[k, i, j]) for k in range(3))
            v = max(r, max(g, b))
            delta = F32(v - min(r, min(g, b)))
            s = F32(0.0) if v == 0 else F32(delta / v)
            with np.errstate(divide='ignore', invalid='ignore'):
                if r == v:
                    out0 = F32((g - b) / delta)
                elif g == v:
                    out0 = F32(F32(2.0) + F32((b - r) / delta))
                else:
                    out0 = F32(F32(4.0) + F32((r - g) / delta))
            h = F32(math.fmod(float(out0) / 6.0 + 10.0, 1.0)) if delta != 0 else F32(0.0)
            h_out[i, j], c_out[i, j], v_out[i, j] = h, F32(s * v), v
    return h_out, c_out, v_out


def _uniform_to_histogram_index(v: float, bins: int = 32) -> int:
    """uniform_to_histogram_layer.cpp: idx = (int)(v * bins), capped at bins - 1."""
    idx = int(F32(v) * F32(bins))
    return min(idx, bins - 1)


def _sparse_histogram_extractor(hist: np.ndarray, locations, size: int) -> np.ndarray:
    """sparse_histogram_extractor_layer.cpp Forward_cpu for one image: integral image over (bins, H, W), then the
    window sums with the layer's clamping, normalised (uniform if empty). locations: [(y, x)] -> (P, bins)."""
    bins, H, W = hist.shape
    integral = hist.astype(np.float64).copy()
    for y in range(1, H):
        integral[:, y] += integral[:, y - 1]
    for x in range(1, W):
        integral[:, :, x] += integral[:, :, x - 1]
    out = np.zeros((len(locations), bins))
    for p, (y, x) in enumerate(locations):
        half = size // 2
        y0, x0 = y - half - 1, x - half - 1
        y1, x1 = y0 + size, x0 + size
        y0, y1, x0, x1 = min(y0, H - 1), min(y1, H - 1), min(x0, W - 1), min(x1, W - 1)
        for c in range(bins):
            v00 = 0 if (y0 < 0 or x0 < 0) else integral[c, y0, x0]
            v01 = 0 if (y0 < 0 or x1 < 0) else integral[c, y0, x1]
            v10 = 0 if (y1 < 0 or x0 < 0) else integral[c, y1, x0]
            v11 = 0 if (y1 < 0 or x1 < 0) else integral[c, y1, x1]
            out[p, c] = v11 - v01 - v10 + v00
        total = out[p].sum()
        out[p] = out[p] / total if total > 0 else 1.0 / bins
    return out


def _chroma_weight_layers(data01: np.ndarray) -> np.ndarray:
    """train_vgg16.prototxt: sr_minus_x (Power scale -1), sr_x_minus_one (+ -1.0), sr_max (Eltwise MAX with
    -0.3333333333), sparse_chroma_weight (Power scale -3)."""
    x = data01.astype(F32)
    m = np.maximum(np.maximum(-x, F32(-0.3333333333)), x + F32(-1.0))
    return F32(-3) * m


def _softmax_kld(pred: np.ndarray, label: np.ndarray, mask: np.ndarray):
    """softmax_kld_loss_layer.cpp (KL_DIVERGENCE, normalization FULL): forward value and backward diff for
    top diff 1. pred, label (N, K); mask (N,)."""
    e = np.exp(pred - pred.max(1, keepdims=True))
    prob = e / e.sum(1, keepdims=True)
    temp = np.log(np.maximum(prob, FLT_MIN)) - np.log(np.maximum(label, FLT_MIN))
    temp = temp * mask[:, None]
    normalizer = max(1.0, pred.shape[0])
    loss = -(temp * label).sum() / normalizer
    diff = (prob - label) * mask[:, None] / normalizer
    return loss, diff


def _calc_rgb_from_hue_chroma(grey, hist_h, hist_c, c_method='median', h_method='expectation-cf'):
    """autocolorize/extraction.py calc_rgb_from_hue_chroma (deterministic methods) followed by
    color.py match_lightness. grey (H, W); hist_* (H, W, bins)."""
    from skimage import color

    bins = hist_h.shape[-1]
    spaced = (np.arange(bins) + 0.5) / bins
    factor = 1.0
    if h_method == 'mode':
        hsv_h = (hist_h.argmax(-1) + 0.5) / bins
    elif h_method in ('expectation', 'expectation-cf'):
        tau = 2 * np.pi
        a = hist_h * np.exp(1j * tau * spaced)
        if h_method == 'expectation-cf':
            factor = abs(a.mean(-1)).clip(0, 0.03) / 0.03
        hsv_h = (np.angle(a.sum(-1)) / tau) % 1.0
    elif h_method == 'median':
        hsv_h = ((0.5 > hist_h.cumsum(-1)).sum(-1) + 0.5) / bins
    if c_method == 'mode':
        hsv_c = hist_c.argmax(-1) / bins
    elif c_method == 'expectation':
        hsv_c = (hist_c * spaced).sum(-1)
    elif c_method == 'median':
        hsv_c = ((0.5 > hist_c.cumsum(-1)).sum(-1) + 0.5) / bins
    elif c_method == 'q75':
        hsv_c = ((0.75 > hist_c.cumsum(-1)).sum(-1) + 0.5) / bins
    hsv_c = hsv_c * factor
    hsv_v = grey + hsv_c / 2
    hsv_s = 2 * hsv_c / (2 * grey + hsv_c)
    hsv = np.concatenate([hsv_h[..., None], hsv_s[..., None], hsv_v[..., None]], axis=-1)
    rgb = color.hsv2rgb(hsv.clip(0, 1)).clip(0, 1)
    return (rgb - rgb.mean(-1, keepdims=True) + grey[..., None]).clip(0, 1)  # match_lightness


# --------------------------------------------------------------------------------------------------- tests
def _rgb_with_ties(seed=0, h=9, w=11):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (3, h, w), generator=g).float() / 255
    rgb[:, 0, 0] = 0.0                                   # black: v = 0
    rgb[:, 0, 1] = 0.5                                   # grey: delta = 0, hue 0
    rgb[:, 0, 2] = torch.tensor([0.8, 0.8, 0.2])         # red == green max: the red branch
    rgb[:, 0, 3] = torch.tensor([0.1, 0.9, 0.9])         # green == blue max: the green branch
    rgb[:, 0, 4] = torch.tensor([0.9, 0.1, 0.5])         # hue near 1 (wraps through fmod)
    rgb[:, 0, 5] = 1.0                                   # white: chroma 0, v 1
    return rgb


def test_rgb_to_hcv_is_the_released_bgr_to_munsell():
    rgb = _rgb_with_ties()
    h, c, v = hc.rgb_to_hcv(rgb[None])
    rh, rc, rv = _bgr_to_munsell(rgb.numpy())
    np.testing.assert_array_equal(h[0, 0].numpy(), rh)
    np.testing.assert_array_equal(c[0, 0].numpy(), rc)
    np.testing.assert_array_equal(v[0, 0].numpy(), rv)
    assert float(h.min()) >= 0 and float(h.max()) < 1
    # by hand: (0.75, 0.25, 0.5): value 0.75, chroma 0.5, hue (1 - 0.5 / 6) mod 1 = 11/12
    h1, c1, v1 = hc.rgb_to_hcv(torch.tensor([0.75, 0.25, 0.5]).view(1, 3, 1, 1))
    assert (float(v1), float(c1)) == (0.75, 0.5) and abs(float(h1) - 11 / 12) < 1e-6


def test_value_to_bin_is_uniform_to_histogram():
    vals = [0.0, 1e-6, 1 / 32, 0.5 - 1e-7, 0.5, 0.999, 1.0, 0.72]
    got = hc.value_to_bin(torch.tensor(vals)).tolist()
    assert got == [_uniform_to_histogram_index(v) for v in vals]
    assert got[:3] == [0, 0, 1] and got[-3:-1] == [31, 31]


@pytest.mark.parametrize('size', [7, 4])
def test_window_histogram_is_the_sparse_histogram_extractor_everywhere(size):
    g = torch.Generator().manual_seed(1)
    v = torch.rand(1, 1, 12, 15, generator=g)
    bins = 5
    dense = hc.window_histogram(v, bins, size)
    onehot = np.zeros((bins, 12, 15))
    idx = hc.value_to_bin(v, bins)[0, 0].numpy()
    for y in range(12):
        for x in range(15):
            onehot[idx[y, x], y, x] = 1
    locations = [(y, x) for y in range(12) for x in range(15)]  # borders and corners included
    ref = _sparse_histogram_extractor(onehot, locations, size)
    got = dense[0].permute(1, 2, 0).reshape(-1, bins).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_chroma_weight_is_the_released_layer_chain():
    g = torch.linspace(0, 1, 101)
    np.testing.assert_allclose(hc.chroma_weight(g).numpy(), _chroma_weight_layers(g.numpy()), atol=1e-6)
    by_hand = hc.chroma_weight(torch.tensor([0.0, 1 / 6, 0.5, 0.9, 1.0]))
    np.testing.assert_allclose(by_hand.numpy(), [0.0, 0.5, 1.0, 0.3, 0.0], atol=1e-6)


def test_release_grey_and_what_the_network_sees():
    rgb = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(2))
    g = hc.release_grey(rgb)
    torch.testing.assert_close(g, 0.33333 * (rgb[:, 2:3] + rgb[:, 1:2] + rgb[:, 0:1]))
    L = HueChroma().model_input(rgb, rgb_to_lab(rgb))
    torch.testing.assert_close(l_to_grey(L), g, atol=2e-5, rtol=0)   # the model recovers the release's grey
    grey_img = rgb[:, :1].expand(-1, 3, -1, -1)                      # a grey photo: the input is (almost) its L
    torch.testing.assert_close(hc.model_grey_l(grey_img), rgb_to_l(grey_img), atol=2e-3, rtol=0)


def test_dense_targets_layout():
    rgb = torch.rand(2, 3, 10, 12, generator=torch.Generator().manual_seed(3))
    t = hc.dense_targets(rgb)
    assert t.shape == (2, hc.n_target_channels(), 10, 12) == (2, 68, 10, 12)
    torch.testing.assert_close(t[:, :2], rgb_to_lab(rgb)[:, 1:])
    h, c, _ = hc.rgb_to_hcv(rgb)
    torch.testing.assert_close(t[:, 2:34], hc.window_histogram(h))
    torch.testing.assert_close(t[:, 34:66], hc.window_histogram(c))
    torch.testing.assert_close(t[:, 66:67], c)
    torch.testing.assert_close(t[:, 67:68], hc.chroma_weight(hc.release_grey(rgb)))
    torch.testing.assert_close(t[:, 2:66].reshape(2, 2, 32, 10, 12).sum(2), torch.ones(2, 2, 10, 12))


def test_loss_by_hand():
    # a uniform 7x7 patch of (0.75, 0.25, 0.5): hue bin 29 (11/12), chroma 0.5 -> bin 16, grey 0.499995 -> w = 1;
    # zero logits: each KL is log 32, so the loss is 5 * 0.5 * log 32 + 1 * 1 * log 32
    rgb = torch.tensor([0.75, 0.25, 0.5]).view(1, 3, 1, 1).expand(1, 3, 7, 7)
    t = hc.dense_targets(rgb)[..., 3:4, 3:4]
    assert int(t[0, 2:34].argmax()) == 29 and int(t[0, 34:66].argmax()) == 16
    loss, hue, chroma = hc.hue_chroma_loss(torch.zeros(1, 64, 1, 1), t)
    assert abs(float(hue) - 0.5 * math.log(32)) < 1e-5 and abs(float(chroma) - math.log(32)) < 1e-5
    assert abs(float(loss) - 3.5 * math.log(32)) < 1e-5


def test_loss_and_gradient_are_the_released_softmax_kld_layers():
    g = torch.Generator().manual_seed(4)
    B, P = 3, 10
    rgb = torch.rand(B, 3, 16, 16, generator=g)
    iy, ix = torch.randint(0, 16, (B, P), generator=g), torch.randint(0, 16, (B, P), generator=g)
    t = hc.dense_targets(rgb)[torch.arange(B)[:, None], :, iy, ix].permute(0, 2, 1)[..., None]  # (B, 68, P, 1)
    logits = (torch.randn(B, 64, P, 1, generator=g) * 3).requires_grad_()
    loss, hue, chroma = hc.hue_chroma_loss(logits, t)
    loss.backward()
    loss, hue, chroma = loss.detach(), hue.detach(), chroma.detach()
    flat = lambda a: a.detach().permute(0, 2, 3, 1).reshape(B * P, -1).double().numpy()  # noqa: E731  (N, K)
    z, tt = flat(logits), flat(t)
    ref_h, diff_h = _softmax_kld(z[:, :32], tt[:, 2:34], tt[:, 66])
    ref_c, diff_c = _softmax_kld(z[:, 32:], tt[:, 34:66], tt[:, 67])
    assert abs(float(hue) - ref_h) < 1e-5 and abs(float(chroma) - ref_c) < 1e-5
    assert abs(float(loss) - (5.0 * ref_h + 1.0 * ref_c)) < 1e-4                 # loss_weight 5 and 1
    np.testing.assert_allclose(flat(logits.grad), np.concatenate([5.0 * diff_h, 1.0 * diff_c], 1), atol=1e-7)


def test_mask_drops_images_and_keeps_the_point_mean():
    g = torch.Generator().manual_seed(5)
    t = hc.dense_targets(torch.rand(2, 3, 8, 8, generator=g))
    logits = torch.randn(2, 64, 8, 8, generator=g)
    keep = torch.tensor([True, False])
    torch.testing.assert_close(hc.hue_chroma_loss(logits, t, keep)[0], hc.hue_chroma_loss(logits[:1], t[:1])[0])


@pytest.mark.parametrize('c_method,h_method', [('median', 'expectation-cf'), ('expectation', 'expectation'),
                                               ('mode', 'mode'), ('q75', 'median')])
def test_decode_is_calc_rgb_from_hue_chroma_then_match_lightness(c_method, h_method):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 64, 6, 7, generator=g) * 2
    if h_method == 'expectation-cf':
        logits[:, :32, 0, 0] = 0  # a flat hue histogram (its mean angle is noise): the fading takes the colour out
    grey = torch.rand(1, 1, 6, 7, generator=g) * 0.9 + 0.05
    got = hc.decode_rgb(logits, grey, hue_method=h_method, chroma_method=c_method)
    ph = logits[:, :32].softmax(1)[0].permute(1, 2, 0).double().numpy()  # prediction_h_softmax
    pc = logits[:, 32:].softmax(1)[0].permute(1, 2, 0).double().numpy()  # prediction_c_softmax
    ref = _calc_rgb_from_hue_chroma(grey[0, 0].double().numpy(), ph, pc, c_method, h_method)
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), ref, atol=2e-5)
    if h_method == 'expectation-cf':
        assert float((got[0, :, 0, 0] - grey[0, 0, 0, 0]).abs().max()) < 1e-6  # faded to grey


def test_hsv_to_rgb_matches_skimage():
    from skimage import color

    hsv = torch.rand(1, 3, 9, 9, generator=torch.Generator().manual_seed(7))
    hsv[0, 0, 0, :] = torch.linspace(0, 1, 9)  # every sextant, h = 1 included
    ref = color.hsv2rgb(hsv[0].permute(1, 2, 0).double().numpy())
    np.testing.assert_allclose(hc.hsv_to_rgb(hsv)[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_decode_ab_uses_the_input_lightness():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 64, 4, 5, generator=g)
    L = torch.rand(2, 1, 8, 10, generator=g) * 80 + 10
    ab = hc.decode_ab(logits, L)
    Ls = torch.nn.functional.interpolate(L, size=(4, 5), mode='bilinear', align_corners=False)
    want = rgb_to_lab(hc.decode_rgb(logits, l_to_grey(Ls)))[:, 1:]
    torch.testing.assert_close(ab, want)
    no_l = hc.decode_ab(logits)
    torch.testing.assert_close(no_l, rgb_to_lab(hc.decode_rgb(logits, torch.full((2, 1, 4, 5), hc.GREY_MEAN)))[:, 1:])


def test_target_entry_is_the_release():
    t = HueChroma()
    assert t.out_channels == 64 and t.decode_needs_l
    assert t.model_kwargs('vgg16_hypercolumn') == {'out_dim': 64, 'head': 'hue_chroma'}
    rgb = torch.rand(2, 3, 8, 8)
    rgb[1] = rgb[1, :1]  # a grey image: still counts (the release has no grey-image mask)
    dense = t.dense_targets(rgb, rgb_to_lab(rgb))
    assert t.valid(dense[:, :2]).all()
    assert not HueChroma(grey_thresh=5.0).valid(dense[:, :2])[1]
    loss, logs = t.loss(torch.zeros(2, 64, 8, 8), t.encode(dense), t.valid(dense[:, :2]))
    assert set(logs) == {'loss', 'loss_hue', 'loss_chroma'}
    torch.testing.assert_close(loss, 5 * logs['loss_hue'] + logs['loss_chroma'])
