"""Data-dependent initialisation (pretext.init) against what it promises and against magic_init.

References: philkr/magic_init ``magic_init.py`` (``initializeWeight`` transcribed below in numpy,
``calibrateGradientRatio``'s ratio r_k = RMS(dW_k) / RMS(W_k)), sklearn's k-means, hand-computed PCA.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from pretext.init import (between_layer_rescale, data_dependent_init, forward_order, kmeans,
                          whitened_filters)


def _relu_net(bn: bool = False, dropout: bool = False) -> nn.Sequential:
    """Conv, max-pool, grouped + dilated conv, conv, pooling, Linear: every layer kind the init handles."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
              nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(16))
    layers += [nn.ReLU(), nn.Conv2d(16, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(48, 5))
    return nn.Sequential(*layers)


def _images(n=24, size=16, seed=1) -> torch.Tensor:
    """Smooth random 'images' (correlated neighbouring pixels, as in photos), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, size // 4, size // 4, generator=g)
    x = nn.functional.interpolate(low, size=(size, size), mode='bilinear', align_corners=False)
    return x + 0.05 * torch.rand(n, 1, size, size, generator=g)


def _layer_outputs(model, x):
    """Per-channel (mean, std) of every Conv/Linear output, measured here with plain hooks."""
    order = forward_order(model, x)
    outs = {}
    hs = [m.register_forward_hook(lambda m, i, o: outs.__setitem__(m, o.detach())) for m in order]
    model.train()
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    stats = []
    for m in order:
        o = outs[m]
        flat = o.transpose(0, 1).reshape(o.shape[1], -1) if o.dim() == 4 else o.T
        stats.append((m, flat.mean(1), flat.std(1, unbiased=False)))
    return stats


def _ratios(model, x, layers, seed=0):
    """r_k = RMS(dW_k) / RMS(W_k) under N(0, 1) output gradients, computed here independently."""
    model.zero_grad()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    return [float(m.weight.grad.pow(2).mean().sqrt() / m.weight.detach().pow(2).mean().sqrt()) for m in layers]


# ---------------------------------------------------------------------------------------- within-layer
@pytest.mark.parametrize('mode', ['gaussian', 'pca', 'kmeans'])
@pytest.mark.parametrize('beta', [0.0, 0.1])
def test_preactivations_have_mean_beta_and_unit_std(mode, beta):
    net, x = _relu_net(), _images()
    report = data_dependent_init(net, x, mode, rescale=False, beta=beta)
    stats = _layer_outputs(net, x)
    assert len(stats) == 4 and len(report['layers']) == 4
    for m, mu, sd in stats:
        torch.testing.assert_close(mu, torch.full_like(mu, beta), atol=1e-4, rtol=0)
        torch.testing.assert_close(sd, torch.ones_like(sd), atol=1e-4, rtol=0)
    inits = [v['init'] for v in report['layers'].values()]
    # every layer has at least as many patches (rows) as filters: the data-dependent path, no fallback
    assert inits == [mode] * 4, inits
    for v in report['layers'].values():
        assert abs(v['mean'] - beta) < 1e-4 and abs(v['std'] - 1) < 1e-4


def test_layer_before_batchnorm_gets_unit_std_and_keeps_no_bias():
    net, x = _relu_net(bn=True), _images()
    data_dependent_init(net, x, 'kmeans', rescale=False)
    grouped = net[3]
    assert grouped.bias is None
    (_, mu, sd), = [s for s in _layer_outputs(net, x) if s[0] is grouped]
    torch.testing.assert_close(sd, torch.ones_like(sd), atol=1e-4, rtol=0)


def test_transposed_conv_is_normalised_per_output_channel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1,
                                                                                       groups=2))
    x = _images(8, 8)
    report = data_dependent_init(net, x, 'kmeans', rescale=False, beta=0.0)
    assert report['layers']['2']['init'].startswith('gaussian')   # magic_init: Deconvolution is elwise only
    with torch.no_grad():
        y = net(x)
    flat = y.transpose(0, 1).reshape(6, -1)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.mean(1), torch.zeros(6), atol=1e-4, rtol=0)


def test_default_mode_changes_nothing_and_bad_mode_is_refused():
    net, x = _relu_net(), _images()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = data_dependent_init(net, x, 'default')
    assert report['layers'] == {} and report['rounds'] == 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match='init mode'):
        data_dependent_init(net, x, 'xavier')


def test_named_layers_only_are_initialised():
    net, x = _relu_net(), _images()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = data_dependent_init(net, x, 'pca', rescale=False, layers=['5'])
    assert list(report['layers']) == ['5']
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {'5.weight', '5.bias'}
    with pytest.raises(ValueError, match='not Conv2d'):
        data_dependent_init(net, x, 'pca', layers=['1'])


def test_batchnorm_state_and_modes_are_restored():
    net, x = _relu_net(bn=True, dropout=True), _images()
    net.eval()
    bn = net[4]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    data_dependent_init(net, x, 'kmeans')
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert not any(m.training for m in net.modules())


# ------------------------------------------------------- whitening, PCA and k-means against references
def _magic_init_weight(D: np.ndarray, kind: str, n_out: int, km=None) -> np.ndarray:
    """Transcription of magic_init.py ``initializeWeight`` (lines 73-107); ``km`` supplies the k-means centres."""
    D = D - np.mean(D, axis=0, keepdims=True)
    C = D.T.dot(D)
    s, V = np.linalg.eigh(C)
    ids = np.argsort(s)[-n_out:]
    s = s[ids]
    V = V[:, ids]
    s[s < 1e-6] = 0
    s[s >= 1e-6] = 1. / np.sqrt(s[s >= 1e-6] + 1e-3)
    S = np.diag(s)
    if kind == 'pca':
        return S.dot(V.T)
    wD = D.dot(V.dot(S))
    wD /= np.linalg.norm(wD, axis=1)[:, None]
    if km is None:
        return wD
    Cw = km(wD).dot(S.dot(V.T))
    Cw /= np.std(D.dot(Cw.T), axis=0, keepdims=True).T
    return Cw


def _same_rows_up_to_sign(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sign = np.sign((a * b).sum(1, keepdims=True))
    np.testing.assert_allclose(a, sign * b, rtol=tol, atol=tol)


def test_pca_by_hand():
    # centred rows (+-1, 0), (0, +-2): scatter diag(2, 8); ascending order, rows e1/sqrt(2.001), e2/sqrt(8.001)
    d = torch.tensor([[1., 0.], [-1., 0.], [0., 2.], [0., -2.]])
    w = whitened_filters(d, 2, 'pca')
    _same_rows_up_to_sign(w, [[1 / math.sqrt(2.001), 0.], [0., 1 / math.sqrt(8.001)]])


def test_pca_matches_magic_init_transcription():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(300, 6)) @ np.diag([5., 3., 2., 1., .5, .2]) @ np.linalg.qr(rng.normal(size=(6, 6)))[0] + 3
    ref = _magic_init_weight(d, 'pca', 4)
    _same_rows_up_to_sign(whitened_filters(torch.tensor(d, dtype=torch.float32), 4, 'pca'), ref, 1e-4)


def test_pca_from_the_gram_matrix_when_rows_are_few():
    # fewer rows than inputs (fc6-like): the R x R Gram route gives the same filters as the dim x dim one
    rng = np.random.default_rng(1)
    d = rng.normal(size=(40, 90)) * np.linspace(3, 0.5, 90)
    ref = _magic_init_weight(d, 'pca', 8)
    _same_rows_up_to_sign(whitened_filters(torch.tensor(d, dtype=torch.float32), 8, 'pca'), ref, 1e-4)


def test_pca_rows_beyond_the_rank_are_gaussian_not_nan():
    rng = np.random.default_rng(2)
    d = torch.tensor(rng.normal(size=(200, 3)), dtype=torch.float32)
    w = whitened_filters(d, 7, 'pca')
    assert w.shape == (7, 3) and torch.isfinite(w).all()
    _same_rows_up_to_sign(w[:3], _magic_init_weight(d.numpy().astype(np.float64), 'pca', 7), 1e-4)


def test_too_few_rows_fall_back_to_gaussian():
    w = whitened_filters(torch.randn(3, 10), 5, 'kmeans', torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.randn((5, 10), generator=torch.Generator().manual_seed(0)))


def test_kmeans_lloyd_matches_sklearn_from_the_same_start():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(c, 0.6, size=(60, 2)) for c in ([0, 0], [3, 0], [0, 3], [3, 3])])
    start = x[[0, 1, 2, 3]]  # a poor start (all in one blob): Lloyd must move the centres out
    ref = KMeans(4, init=start, n_init=1, algorithm='lloyd', tol=0, max_iter=300).fit(x).cluster_centers_
    got = kmeans(torch.tensor(x, dtype=torch.float32), 4, iters=300, init=torch.tensor(start, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)


def test_kmeans_filters_match_magic_init_transcription():
    # three tight, well separated clusters: the k-means optimum is unique, so sklearn (the release's
    # k-means) and crosschannel's must find the same centres; the filters are then the transcription's
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(4)
    centres = np.array([[4., 0, 0, 1], [0, 4., 0, 1], [0, 0, 4., 1]])
    d = np.concatenate([rng.normal(c, 0.05, size=(80, 4)) for c in centres])
    sk = lambda wd: KMeans(3, n_init=10, random_state=0).fit(wd).cluster_centers_  # noqa: E731
    ref = _magic_init_weight(d, 'kmeans', 3, km=sk)
    got = whitened_filters(torch.tensor(d, dtype=torch.float32), 3, 'kmeans').numpy()
    order = [int(np.argmax(np.abs(ref @ g))) for g in got]          # rows match up to permutation
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(got, ref[order], rtol=1e-3, atol=1e-3)


def test_whitened_patches_of_a_grouped_conv_are_taken_per_group():
    # kmeans/pca filters of group g only see input channels of group g: a group whose inputs are constant
    # zero yields filters with zero response, i.e. a dead channel (left unscaled, warned)
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
    x = _images(8, 8)
    x = torch.cat([x, torch.zeros_like(x)], dim=1)
    with pytest.warns(UserWarning, match='constant'):
        report = data_dependent_init(conv, x, 'pca', rescale=False, beta=0.0)
    assert report['layers']['Conv2d']['dead_channels'] == 2
    with torch.no_grad():
        y = conv(x)
    sd = y.transpose(0, 1).reshape(4, -1).std(1, unbiased=False)
    torch.testing.assert_close(sd[:2], torch.ones(2), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------- between-layer
def test_rescaled_ratios_are_equal_within_one_percent():
    net, x = _relu_net(), _images()
    layers = forward_order(net, x)
    before = _ratios(net, x, layers)
    assert max(before) / min(before) > 2  # PyTorch's default init is far from equal
    final = between_layer_rescale(net, x)
    got = _ratios(net, x, layers)
    gm = math.exp(np.mean(np.log(got)))
    assert max(abs(r / gm - 1) for r in got) < 0.01
    np.testing.assert_allclose(final, got, rtol=1e-4)


def test_relu_net_computes_the_same_function_up_to_output_scale():
    net, x = _relu_net(), _images()
    fresh = _images(10, 16, seed=7)                      # inputs the rescaling never saw
    net.eval()
    with torch.no_grad():
        y0 = net(fresh)
    between_layer_rescale(net, x)
    with torch.no_grad():
        y1 = net(fresh)
    c = float((y1 * y0).sum() / (y0 * y0).sum())
    assert c > 0
    torch.testing.assert_close(y1, c * y0, rtol=1e-4, atol=1e-5 * float(y1.abs().max()))


def test_full_init_then_rescale_reports_rounds_and_ratios():
    net, x = _relu_net(), _images()
    report = data_dependent_init(net, x, 'kmeans')
    assert report['converged'] and 1 <= report['rounds'] <= 10
    final = [v['ratios'][-1] for v in report['layers'].values()]
    gm = math.exp(np.mean(np.log(final)))
    assert all(len(v['ratios']) == report['rounds'] + 1 for v in report['layers'].values())
    assert max(abs(r / gm - 1) for r in final) < 0.01


def test_rescaling_stops_after_max_rounds():
    net, x = _relu_net(bn=True), _images()
    report = data_dependent_init(net, x, 'gaussian', tol=1e-12, max_rounds=3)
    assert report['rounds'] == 3 and report['converged'] is False
    assert all(len(v['ratios']) == 4 for v in report['layers'].values())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    between_layer_rescale(net, x, tol=1e-12, max_rounds=0)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_layer_without_gradient_has_ratio_zero_and_is_left_alone():
    # a BatchNorm with weight 0 (timm's zero_init_last) cuts the gradient to the conv before it
    net, x = _relu_net(bn=True), _images()
    with torch.no_grad():
        net[4].weight.zero_()
    w = net[3].weight.detach().clone()
    ratios = between_layer_rescale(net, x)
    assert ratios[1] == 0.0 and torch.equal(net[3].weight, w)
    live = [r for r in ratios if r > 0]
    gm = math.exp(np.mean(np.log(live)))
    assert max(abs(r / gm - 1) for r in live) < 0.01


# -------------------------------------------------------------------------------------- real models
def _check_model(model, x, forward=None, mode='kmeans'):
    report = data_dependent_init(model, x, mode, forward=forward)
    assert report['layers'] and report['rounds'] <= 10
    for name, v in report['layers'].items():
        assert abs(v['std'] - 1) < 1e-3, (name, v)
        assert all(math.isfinite(r) for r in v['ratios']), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return report


def test_alexnet_cc_grouped_convs_and_batchnorm():
    from pretext.models import create_model

    model = create_model('alexnet_cc', fc_dim=32, out_dim=16)
    x = torch.rand(6, 1, 96, 96) * 100
    report = _check_model(model, x)
    assert report['layers']['conv2.0']['init'] == 'kmeans'          # groups=2: per-group k-means
    assert report['layers']['fc6.0']['init'] == 'kmeans'            # dilated 6x6 conv


def test_hypercolumn_with_sampled_points():
    from pretext.models import create_model

    model = create_model('vgg16_hypercolumn', width_mult=1 / 16, fc_dim=16, hidden=16)
    x = torch.rand(4, 1, 64, 64) * 100
    pts = torch.rand(4, 32, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    report = _check_model(model, x, forward=lambda m, inp: m(inp, points=pts), mode='pca')
    assert len(report['layers']) == 17                               # 13 convs, fc6, fc7, 2 head layers


@pytest.mark.slow
def test_zhang_vgg_dilated_and_transposed():
    from pretext.models import create_model

    report = _check_model(create_model('zhang_vgg', out_dim=8), torch.rand(2, 1, 32, 32) * 100, mode='gaussian')
    assert 'conv8.0' in report['layers']


@pytest.mark.slow
def test_timm_resnet18():
    from pretext.models import create_model

    report = _check_model(create_model('timm:resnet18', out_dim=8, head_dim=16), torch.rand(4, 1, 32, 32) * 100,
                          mode='gaussian')
    # timm zero-initialises the last BatchNorm of every residual block: those convs get no gradient
    assert report['layers']['encoder.layer1.0.conv1']['ratios'][-1] == 0.0
