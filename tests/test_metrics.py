"""Colorization metrics against hand-computed cases."""
import json
import math

import pytest
import torch

from pretext import metrics as M
from pretext.eval_color import _clean, derangement, derangement_cycle


def _const_error(d: float, shape=(1, 2, 5, 7)):
    gt = torch.randint(-60, 60, shape).float()  # integers: gt + d is exact in float32
    pred = gt.clone()
    pred[:, 0] += d
    return pred, gt


@pytest.mark.parametrize("d", [0.0, 1.0, 10.0, 37.5, 150.0, 150.5, 400.0])
def test_constant_error_auc(d):
    pred, gt = _const_error(d)
    expected = 100.0 * max(0, 151 - math.ceil(d)) / 151  # thresholds t >= d count the pixel
    assert M.ab_auc(pred, gt) == pytest.approx(expected, abs=1e-6)


def test_identical_images():
    gt = torch.randn(2, 2, 8, 8) * 30
    assert M.ab_auc(gt, gt) == pytest.approx(100.0)
    assert M.rmse_ab(gt, gt) == 0.0
    rgb8 = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8)
    assert M.psnr_rgb8(rgb8, rgb8) == math.inf
    assert M.mean_finite_aware([30.0, math.inf]) == math.inf
    assert M.mean_finite_aware([30.0, math.nan, 40.0]) == 35.0
    # the report JSON has no Infinity/NaN tokens
    text = json.dumps(_clean({"psnr": math.inf, "x": [math.nan, 1.0]}))
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bad JSON token {c}")) == {"psnr": "inf", "x": [None, 1.0]}


def test_psnr_known_values():
    a = torch.zeros(3, 4, 4)
    assert M.psnr_rgb8(a + 1, a) == pytest.approx(10 * math.log10(255**2))  # MSE 1 -> 48.13 dB
    assert M.psnr_rgb8(a + 255, a) == pytest.approx(0.0)
    assert M.rmse_ab(torch.full((2, 3, 3), 3.0), torch.zeros(2, 3, 3)) == pytest.approx(3.0)


def test_constant_error_diagonal():
    gt = torch.zeros(1, 2, 3, 3)
    pred = gt.clone()
    pred[:, 0], pred[:, 1] = 6.0, 8.0  # |(6, 8)| = 10
    assert M.ab_auc(pred, gt) == pytest.approx(100.0 * 141 / 151)


def test_half_perfect_half_wrong():
    gt = torch.zeros(1, 2, 2, 4)
    pred = gt.clone()
    pred[..., :2] = 200.0
    assert M.ab_auc(pred, gt) == pytest.approx(50.0)


def test_auc_equals_naive_sweep():
    torch.manual_seed(0)
    gt, pred = torch.randn(2, 2, 16, 16) * 40, torch.randn(2, 2, 16, 16) * 40
    w = torch.rand(2, 16, 16)
    err = torch.linalg.vector_norm(pred - gt, dim=1)
    naive = [float(((err <= t).double() * w).sum() / w.sum()) for t in range(151)]
    assert torch.allclose(M.cmf(pred, gt, w), torch.tensor(naive, dtype=torch.float64), atol=1e-9)
    assert M.ab_auc(pred, gt, w) == pytest.approx(100 * sum(naive) / 151)


def test_auc_integrations_hand_computed():
    """AuC as the mean of the CMF samples vs the trapezoid rule / max_t, on CMFs computed by hand."""
    cmf = torch.tensor([0.2, 0.5, 1.0])  # thresholds 0, 1, 2
    assert M.auc_from_cmf(cmf) == pytest.approx(100 * (0.2 + 0.5 + 1.0) / 3)  # 56.67
    assert M.auc_trapezoid_from_cmf(cmf) == pytest.approx(100 * ((0.2 + 0.5) / 2 + (0.5 + 1.0) / 2) / 2)  # 55.0
    # constant error 10 at thresholds 0..150: CMF 0 below 10, 1 from 10 on
    step = (torch.arange(151) >= 10).double()
    mean, trap = M.auc_from_cmf(step), M.auc_trapezoid_from_cmf(step)
    assert mean == pytest.approx(100 * 141 / 151) and trap == pytest.approx(100 * 140.5 / 150)
    assert trap - mean == pytest.approx((2 * mean / 100 - 0.0 - 1.0) / 3)  # the module docstring's difference (0.29)
    assert M.auc_trapezoid_from_cmf(torch.ones(151)) == pytest.approx(100.0)


def test_rebalanced_auc():
    # 9 pixels of a common colour predicted exactly, 1 pixel of a rare colour predicted far off
    hist = torch.zeros(2, M.MAX_THRESHOLD + 2, dtype=torch.float64)
    hist[0, 0] = 9
    hist[1, -1] = 1
    prior = torch.tensor([0.9, 0.1])
    assert M.auc_from_cmf(M.cmf_from_histogram(hist.sum(0))) == pytest.approx(90.0)
    assert M.auc_from_cmf(M.rebalanced_cmf(hist, prior)) == pytest.approx(50.0)  # both colours weigh the same


def test_inverse_prior_weights_guard():
    w = M.inverse_prior_weights(torch.tensor([0.5, 0.5, 0.0]))
    assert torch.isfinite(w).all() and w[2] == w[:2].max()
    assert float((torch.tensor([0.5, 0.5, 0.0]).double() * w).sum()) == pytest.approx(1.0)


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05]])
    assert M.topk_correct(logits, torch.tensor([1, 2]), ks=(1, 5)) == {1: 1, 5: 2}


def test_derangement():
    for n in (2, 3, 10):
        d = derangement(n, seed=3)
        assert sorted(d) == list(range(n)) and all(d[i] != i for i in range(n))
        assert d == derangement(n, seed=3)
        order = derangement_cycle(n, seed=3)
        assert all(d[order[k]] == order[k - 1] for k in range(n))
