"""Model contract tests: every registered model (small widths), plus known-answer checks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretext.models import (
    create_model,
    extract_taps,
    list_models,
    model_from_checkpoint,
)
from pretext.models.alexnet_cc import (
    AlexNetCC,
    AlexNetTransfer,
    export_alexnet_transfer,
)
from pretext.models.hypercolumn import pixel_centre_points
from pretext.models.zhang_vgg import (
    ECCV16_LOGIT_SCALE,
    convert_eccv16_state_dict,
    eccv16_bins,
    load_eccv16_state_dict,
)

# small kwargs and two input sizes (base, base + largest reduction) per model
SMALL = {
    'zhang_vgg': (dict(), 32),
    'alexnet_cc': (dict(fc_dim=32), 67),
    'vgg16_hypercolumn': (dict(width_mult=0.125, fc_dim=32, hidden=32), 64),
    'timm:resnet18': (dict(), 64),
}
HC_SMALL = SMALL['vgg16_hypercolumn'][0]


def _L(b, h, w=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, h, w or h, generator=g) * 100


def _build(name, **extra):
    torch.manual_seed(0)
    return create_model(name, **{**SMALL[name][0], **extra})


@torch.no_grad()
def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def test_every_registered_model_is_tested():
    assert set(list_models()) <= set(SMALL), 'add small kwargs for new models to SMALL'


def test_create_model_unknown():
    with pytest.raises(ValueError, match='available'):
        create_model('nope')


@pytest.mark.parametrize('name', list(SMALL))
def test_shape_contract(name):
    m = _build(name).eval()
    assert isinstance(type(m).supports_points, bool)
    size = SMALL[name][1]
    with torch.no_grad():
        out = m(_L(2, size))
        feats = m.forward_features(_L(2, size))
    assert out.dtype == torch.float32 and out.shape[:2] == (2, 313)
    if m.supports_points:
        assert out.shape[-2:] == (size, size)
    else:
        with torch.no_grad():
            assert torch.equal(m.forward_head(feats), out)
    m.reset_classifier(7)
    with torch.no_grad():
        assert m(_L(1, size)).shape[1] == 7


@pytest.mark.parametrize('name', list(SMALL))
def test_feature_info_matches_taps(name):
    m = _build(name).eval()
    names = [f['module'] for f in m.feature_info]
    modules = dict(m.named_modules())
    assert all(n in modules for n in names)
    base = SMALL[name][1]
    step = max(f['reduction'] for f in m.feature_info)
    with torch.no_grad():
        t1 = extract_taps(m, _L(1, base), names)
        t2 = extract_taps(m, _L(1, base + step), names)
    assert list(t1) == names
    assert all(not modules[n]._forward_hooks for n in names), 'hooks must be removed'
    for f in m.feature_info:
        a, b = t1[f['module']], t2[f['module']]
        assert a.shape[1] == f['num_chs'], f
        # the input grew by `step` pixels, so a tap at stride r grows by exactly step / r
        assert (b.shape[-1] - a.shape[-1]) * f['reduction'] == step, (f, a.shape, b.shape)
    with pytest.raises(ValueError, match='available taps'):
        extract_taps(m, _L(1, base), ['not_a_tap'])


@pytest.mark.parametrize('name', list(SMALL))
def test_gradient_flows(name):
    m = _build(name).train()
    L = _L(2, SMALL[name][1]).requires_grad_()
    out = m(L)
    out.logsumexp(1).mean().backward()
    assert L.grad is not None and L.grad.abs().sum() > 0
    for pn, p in m.named_parameters():
        assert p.grad is not None, f'no gradient for {pn}'


def test_hypercolumn_sparse_matches_dense():
    m = create_model('vgg16_hypercolumn', **HC_SMALL, dense_chunk=100).eval()  # 100 px -> 2-row chunks
    L = _L(2, 40, 48)
    P = 37
    g = torch.Generator().manual_seed(3)
    ii, jj = torch.randint(0, 40, (2, P), generator=g), torch.randint(0, 48, (2, P), generator=g)
    ys, xs = pixel_centre_points(40, 48)
    points = torch.stack([xs[jj], ys[ii]], dim=-1)  # (B, P, 2) as (x, y)
    with torch.no_grad():
        dense = m(L)
        sparse = m(L, points)
        m.dense_chunk = 10 ** 6
        dense_one_chunk = m(L)
    assert dense.shape == (2, 313, 40, 48) and sparse.shape == (2, 313, P, 1)
    torch.testing.assert_close(dense, dense_one_chunk, atol=1e-5, rtol=1e-5)
    at_points = dense[torch.arange(2)[:, None], :, ii, jj]  # (B, P, C)
    torch.testing.assert_close(sparse[..., 0], at_points.permute(0, 2, 1), atol=1e-4, rtol=1e-4)


def test_hypercolumn_dense_equals_upsampled_hypercolumns():
    # dense path == the naive definition: upsample every tap bilinearly to (H, W), concat, MLP
    m = create_model('vgg16_hypercolumn', **HC_SMALL).eval()
    L = _L(1, 64)
    with torch.no_grad():
        taps = m.forward_hypercolumn_taps(L)
        hc = torch.cat([F.interpolate(taps[t], size=(64, 64), mode='bilinear', align_corners=False)
                        for t in m.taps], 1)
        torch.testing.assert_close(m(L), m.head(hc), atol=1e-4, rtol=1e-4)


def test_hypercolumn_sparse_never_builds_dense(monkeypatch):
    m = create_model('vgg16_hypercolumn', **HC_SMALL)
    sampled = []
    orig = F.grid_sample

    def spy(inp, grid, *a, **k):
        out = orig(inp, grid, *a, **k)
        sampled.append(out.shape)
        return out

    monkeypatch.setattr(F, 'grid_sample', spy)
    monkeypatch.setattr(F, 'interpolate', lambda *a, **k: pytest.fail('interpolate called'))
    points = torch.rand(2, 16, 2) * 2 - 1
    out = m(_L(2, 64), points)
    out.sum().backward()
    assert out.shape == (2, 313, 16, 1)
    assert len(sampled) == len(m.taps) and all(s[-2:] == (16, 1) for s in sampled)


def test_hypercolumn_hue_chroma_head():
    m = create_model('vgg16_hypercolumn', **HC_SMALL, head='hue_chroma', n_hue=16, n_chroma=24)
    assert m.eval()(_L(1, 64), torch.zeros(1, 5, 2)).shape == (1, 40, 5, 1)
    with pytest.raises(ValueError):
        create_model('vgg16_hypercolumn', head='lab')


class _ECCVReference(nn.Module):
    """Mirror of richzhang/colorization colorizers/eccv16.py ECCVGenerator (layers and names)."""

    def __init__(self):
        super().__init__()
        C, R, BN = nn.Conv2d, lambda: nn.ReLU(True), nn.BatchNorm2d
        self.model1 = nn.Sequential(C(1, 64, 3, 1, 1), R(), C(64, 64, 3, 2, 1), R(), BN(64))
        self.model2 = nn.Sequential(C(64, 128, 3, 1, 1), R(), C(128, 128, 3, 2, 1), R(), BN(128))
        self.model3 = nn.Sequential(C(128, 256, 3, 1, 1), R(), C(256, 256, 3, 1, 1), R(),
                                    C(256, 256, 3, 2, 1), R(), BN(256))
        self.model4 = nn.Sequential(C(256, 512, 3, 1, 1), R(), C(512, 512, 3, 1, 1), R(),
                                    C(512, 512, 3, 1, 1), R(), BN(512))
        dil = lambda: C(512, 512, 3, 1, 2, dilation=2)  # noqa: E731
        self.model5 = nn.Sequential(dil(), R(), dil(), R(), dil(), R(), BN(512))
        self.model6 = nn.Sequential(dil(), R(), dil(), R(), dil(), R(), BN(512))
        self.model7 = nn.Sequential(C(512, 512, 3, 1, 1), R(), C(512, 512, 3, 1, 1), R(),
                                    C(512, 512, 3, 1, 1), R(), BN(512))
        self.model8 = nn.Sequential(nn.ConvTranspose2d(512, 256, 4, 2, 1), R(), C(256, 256, 3, 1, 1), R(),
                                    C(256, 256, 3, 1, 1), R(), C(256, 313, 1, 1, 0))
        self.softmax = nn.Softmax(dim=1)
        self.model_out = C(313, 2, 1, 1, 0, bias=False)

    def forward(self, L):  # returns conv8_3 (the 313 logits), before softmax/model_out
        x = (L - 50.0) / 100.0
        for i in range(1, 9):
            x = getattr(self, f'model{i}')(x)
        return x


def test_eccv16_conversion_known_answer():
    torch.manual_seed(0)
    ref = _ECCVReference()
    _randomise_bn(ref)
    ref.eval()
    # pre-0.4 checkpoints (the official release) have no num_batches_tracked
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert 'model8.6.weight' in sd and 'model_out.weight' in sd
    m = create_model('zhang_vgg', bn_affine=True)  # as released for training: L - 50, i.e. l_norm 1
    load_eccv16_state_dict(m, sd)
    m.eval()
    L = _L(2, 32)
    with torch.no_grad():
        # the imported logits are model8.6's output without the deploy net's x2.606 (conv8_313_rh)
        torch.testing.assert_close(m(L) * ECCV16_LOGIT_SCALE, ref(L), atol=1e-5, rtol=1e-4)
        # the first block too (a random deep net's logits hardly depend on its input): the port sees (L - 50) / 100
        torch.testing.assert_close(extract_taps(m, L, ['conv1'])['conv1'], ref.model1((L - 50) / 100),
                                   atol=1e-5, rtol=1e-4)
    assert 'model_out.weight' not in convert_eccv16_state_dict(sd)
    # the bins the official forward decodes with: model_out (2, 313, 1, 1) holds them / 110
    torch.testing.assert_close(eccv16_bins(sd), sd['model_out.weight'][:, :, 0, 0].t() * 110.0)

    bad = dict(sd)
    del bad['model3.4.bias']
    bad['model9.0.weight'] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing=\['conv3.4.bias'\] unexpected=\['model9.0.weight'\]"):
        load_eccv16_state_dict(create_model('zhang_vgg', bn_affine=True), bad)


def _caffe_conv_out(n, k, s, p):  # caffe/layers/base_conv_layer.cpp: rounds down
    return (n + 2 * p - k) // s + 1


def _caffe_pool_out(n, k, s, p):  # caffe/layers/pooling_layer.cpp: rounds up, last window starts inside the image
    out = -(-(n + 2 * p - k) // s) + 1
    return out - 1 if p and (out - 1) * s >= n + p else out


@pytest.mark.parametrize('size', [180, 227, 176, 97])
def test_alexnet_release_geometry(size):
    """Tap sizes of train_alexnet/train_val.prototxt, computed with Caffe's size formulas."""
    n = _caffe_conv_out(size, 11, 4, 5)          # conv1 k11 s4 p5
    want = {'conv1': n}
    n = want['pool1'] = _caffe_pool_out(n, 3, 2, 1)  # pool1 3/2 p1
    want['conv2'] = n                            # conv2 k5 p2
    n = want['pool2'] = _caffe_pool_out(n, 3, 2, 1)  # pool2 3/2 p1
    want.update(conv3=n, conv4=n, conv5=n)
    n = want['pool5'] = _caffe_pool_out(n, 3, 1, 1)  # pool5 3/1 p1
    want['fc6'] = _caffe_conv_out(n, 11, 1, 5)   # 6x6 kernel, dilation 2: extent 11, pad 5
    want['fc7'] = want['fc6']
    m = _build('alexnet_cc').eval()
    with torch.no_grad():
        taps = extract_taps(m, _L(1, size), list(want))
        out = m(_L(1, size))
    assert {k: v.shape[-1] for k, v in taps.items()} == want
    assert out.shape[-2:] == (want['fc7'], want['fc7'])
    if size == 180:
        assert out.shape[-1] == 12  # and 23x23 targets: see test_train
    # BatchNorm without scale and shift (Caffe BatchNorm, no Scale layer); every conv keeps its bias
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert len(bns) == 7 and not any(b.affine for b in bns)
    assert all(c.bias is not None for c in m.modules() if isinstance(c, nn.Conv2d))


def test_alexnet_bn_folding_equivalence():
    """The transfer export: the trained weights, BatchNorm and the input scale folded in, standard geometry."""
    torch.manual_seed(0)
    L = _L(1, 227)
    taps = ['conv1', 'conv2', 'conv3', 'conv4', 'conv5']
    for kwargs in (dict(geometry='standard', bn_affine=True, l_norm=100.0), dict()):
        m = AlexNetCC(fc_dim=16, **kwargs)
        _randomise_bn(m)
        m.eval()
        t = export_alexnet_transfer(m).eval()
        # the same weights in the standard geometry (conv1 pad 0, unpadded pools): what the export must compute
        same = AlexNetCC(fc_dim=16, **{**kwargs, 'geometry': 'standard'})
        same.load_state_dict(m.state_dict())
        same.eval()
        with torch.no_grad():
            a, b = extract_taps(same, L, taps), extract_taps(t, L, taps + ['pool5'])
        for n in taps:
            torch.testing.assert_close(b[n], a[n], atol=1e-4, rtol=1e-4)
        assert b['pool5'].shape == (1, 256, 6, 6)  # standard AlexNet geometry at 227x227
        assert isinstance(t, AlexNetTransfer) and not any(isinstance(x, nn.BatchNorm2d) for x in t.modules())


def test_model_from_checkpoint_roundtrip():
    m = _build('alexnet_cc').eval()
    ckpt = dict(model_name='alexnet_cc', model_kwargs=SMALL['alexnet_cc'][0], model=m.state_dict())
    m2 = model_from_checkpoint(ckpt).eval()
    L = _L(1, 67)
    with torch.no_grad():
        assert torch.equal(m(L), m2(L))
