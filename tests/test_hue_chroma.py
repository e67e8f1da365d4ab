import math

import pytest
import torch

from pretext.hue_chroma import (
    C_MAX,
    ab_to_hue_chroma,
    decode_ab,
    decode_hue_chroma,
    encode_hue_chroma,
    hue_chroma_kl,
    hue_chroma_loss,
    hue_chroma_to_ab,
)


def _ab(hue, chroma):
    hue, chroma = torch.as_tensor(hue, dtype=torch.float32), torch.as_tensor(chroma, dtype=torch.float32)
    return hue_chroma_to_ab(hue.view(1, 1, -1, 1), chroma.view(1, 1, -1, 1))  # (1, 2, N, 1)


def test_lch_roundtrip():
    ab = torch.randn(2, 2, 5, 7) * 40
    hue, chroma = ab_to_hue_chroma(ab)
    assert hue.min() >= 0 and hue.max() < 2 * math.pi
    torch.testing.assert_close(hue_chroma_to_ab(hue, chroma), ab, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('estimate', ['mean', 'median'])
def test_point_estimate_recovers_ab(estimate):
    n_hue, n_chroma = 32, 32
    hues = torch.linspace(0.01, 2 * math.pi - 0.01, 50)
    chromas = torch.linspace(0.0, 120.0, 50)
    ab = _ab(hues, chromas)
    th, tc, c = encode_hue_chroma(ab, n_hue, n_chroma)
    assert th.shape == (1, n_hue, 50, 1) and tc.shape == (1, n_chroma, 50, 1)
    torch.testing.assert_close(th.sum(1), torch.ones(1, 50, 1))
    torch.testing.assert_close(tc.sum(1), torch.ones(1, 50, 1))
    assert ((th > 0).sum(1) <= 2).all() and ((tc > 0).sum(1) <= 2).all()
    est = decode_hue_chroma(th, tc, chroma_estimate=estimate)
    h_est, c_est = ab_to_hue_chroma(est)
    chroma_step = C_MAX / (n_chroma - 1)
    tol = 1e-3 if estimate == 'mean' else chroma_step  # the expectation of a linear encoding is exact
    assert (c_est - c).abs().max() <= tol
    dh = torch.remainder(h_est - hues.view(1, 1, -1, 1) + math.pi, 2 * math.pi) - math.pi
    big = c[0, 0, :, 0] > 1  # hue of (near-)grey pixels is meaningless
    assert dh[0, 0, big, 0].abs().max() < 0.25 * (2 * math.pi / n_hue)


def test_hue_wraps_around():
    n_hue = 16
    th, _, _ = encode_hue_chroma(_ab([-0.05, 2 * math.pi - 0.05], [50.0, 50.0]), n_hue)
    torch.testing.assert_close(th[..., 0, :], th[..., 1, :])
    assert th[0, 0, 0, 0] > 0.5 and th[0, n_hue - 1, 0, 0] > 0  # between the last bin and bin 0
    assert th[0, 1:n_hue - 1, 0, 0].sum() == 0
    est = decode_hue_chroma(th, encode_hue_chroma(_ab([0.0], [50.0]), n_hue)[1])
    h_est, _ = ab_to_hue_chroma(est)
    d = torch.remainder(h_est[0, 0, 0, 0] - (2 * math.pi - 0.05) + math.pi, 2 * math.pi) - math.pi
    assert abs(d) < 2 * math.pi / n_hue / 4


def test_chroma_clamps_above_cmax():
    _, tc, _ = encode_hue_chroma(_ab([1.0], [C_MAX + 20]))
    assert tc[0, -1, 0, 0] == 1


def test_kl_zero_for_identical_distributions():
    logits = torch.randn(2, 24 + 20, 3, 4)
    th, tc = logits[:, :24].softmax(1), logits[:, 24:].softmax(1)
    chroma = torch.rand(2, 1, 3, 4) * 100
    loss = hue_chroma_kl(logits, th, tc, chroma)
    assert abs(loss.item()) < 1e-5
    assert hue_chroma_kl(torch.randn_like(logits), th, tc, chroma) > 0.01


def test_hue_term_weighted_by_chroma():
    # grey targets (chroma 0): the hue logits get no gradient
    th, tc, c = encode_hue_chroma(torch.zeros(1, 2, 2, 2))
    logits = torch.randn(1, 64, 2, 2, requires_grad=True)
    hue_chroma_kl(logits, th, tc, c).backward()
    assert logits.grad[:, :32].abs().max() == 0 and logits.grad[:, 32:].abs().max() > 0


def test_kl_decreases_under_sgd():
    torch.manual_seed(0)
    th, tc, c = encode_hue_chroma(torch.randn(2, 2, 4, 4) * 40)
    logits = torch.zeros(2, 64, 4, 4, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=20.0)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = hue_chroma_kl(logits, th, tc, c)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]
    ab = decode_ab(logits.detach())
    assert ab.shape == (2, 2, 4, 4)


def test_hue_chroma_loss_from_ab_with_mask():
    ab = torch.randn(3, 2, 4, 4) * 40
    logits = torch.randn(3, 32 + 20, 4, 4)
    th, tc, c = encode_hue_chroma(ab, 32, 20)
    torch.testing.assert_close(hue_chroma_loss(logits, ab), hue_chroma_kl(logits, th, tc, c))
    keep = torch.tensor([True, False, True])
    masked = hue_chroma_loss(logits, ab, mask=keep)
    torch.testing.assert_close(masked, hue_chroma_kl(logits[keep], th[keep], tc[keep], c[keep]))
    pix = keep.view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(hue_chroma_loss(logits, ab, mask=pix), masked)
