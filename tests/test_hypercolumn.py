"""The Larsson et al. hypercolumn network against gustavla/autocolorize (train/train_vgg16.prototxt and the
SparseHypercolumnExtractor layer), the released point sampling, and the torchvision VGG-16 loader."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretext.hue_chroma import model_grey_l
from pretext.models import create_model, model_from_checkpoint
from pretext.models.hypercolumn import DATA_OFFSET, RELEASE_TAPS, VGG16Hypercolumn, load_torchvision_vgg16
from pretext.runtime import UserError
from pretext.train import sample_points

SMALL = dict(width_mult=1 / 16, fc_dim=16, hidden=16)


def _sparse_hypercolumn_extractor(layers, scales, locations):
    """caffe/src/caffe/layers/sparse_hypercolumn_extractor_layer.cpp Forward_cpu (offsets 0, activation_mult 1).
    layers: [(B, C, h, w) arrays]; locations (B, P, 2) as (y, x) -> (B * P, sum C)."""
    B, P = locations.shape[:2]
    out = []
    for n in range(B):
        for p in range(P):
            y, x = locations[n, p]
            col = []
            for data, scale in zip(layers, scales):
                h, w = data.shape[-2:]
                ly = min(max(y / scale, 0.0), h - 1.0001)
                lx = min(max(x / scale, 0.0), w - 1.0001)
                ylo, xlo = int(ly), int(lx)
                yhi, xhi = ylo + 1, xlo + 1
                f_yhi, f_ylo, f_xhi, f_xlo = ly - ylo, yhi - ly, lx - xlo, xhi - lx
                d = data[n]
                col.append(f_ylo * (f_xlo * d[:, ylo, xlo] + f_xhi * d[:, ylo, xhi]) +
                           f_yhi * (f_xlo * d[:, yhi, xlo] + f_xhi * d[:, yhi, xhi]))
            out.append(np.concatenate(col))
    return np.stack(out)


def test_release_hypercolumn_has_12417_channels_from_16_maps():
    with torch.device('meta'):
        m = VGG16Hypercolumn(head='hue_chroma')
    assert m.taps == RELEASE_TAPS and len(m.taps) == 16 and m.taps[0] == 'data'
    assert m.hypercolumn_dim == 12417 == 1 + 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512 + 2 * 4096
    assert [m.tap_stride[t] for t in m.taps] == [1, 1, 1, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32]  # ``scale``
    assert (m.head[0].in_channels, m.head[0].out_channels, m.head[-1].out_channels) == (12417, 1024, 64)


def test_layers_are_the_training_prototxt():
    m = create_model('vgg16_hypercolumn', head='hue_chroma', **SMALL)
    convs = [n for n in m.trunk_order if n.startswith('conv')]
    assert len(convs) == 13
    for name in convs + ['fc6', 'fc7']:
        block = getattr(m, name)
        conv, bn, relu = block[0], block[1], block[2]
        assert isinstance(conv, nn.Conv2d) and isinstance(relu, nn.ReLU)
        # Caffe BatchNorm without Scale (lr_mult 0): no affine parameters, moving_average_fraction 0.999, eps 1e-5
        assert isinstance(bn, nn.BatchNorm2d) and not bn.affine and abs(bn.momentum - 0.001) < 1e-12 and bn.eps == 1e-5
    assert m.fc6[0].kernel_size == (7, 7) and m.fc6[0].padding == (3, 3) and m.fc7[0].kernel_size == (1, 1)
    for block in (m.fc6, m.fc7):
        assert isinstance(block[3], nn.Dropout) and block[3].p == 0.5                 # dropout_fc6 / dropout_fc7
    assert isinstance(m.head[2], nn.Dropout) and m.head[2].p == 0.5                  # dropout_colorize_fc1
    assert all(isinstance(p, nn.MaxPool2d) and p.kernel_size == 2 for p in (m.pool1, m.pool5))


def test_release_fillers():
    m = create_model('vgg16_hypercolumn', head='hue_chroma', width_mult=1 / 4, fc_dim=64, hidden=256)
    for mod in [getattr(m, n)[0] for n in m.trunk_order if not n.startswith('pool')] + [m.head[3]]:
        mod.requires_grad_(False)
        fan_in = mod.weight[0].numel()
        bound = math.sqrt(3.0 / fan_in)                                  # Caffe xavier: U(-sqrt(3/fan_in), ..)
        assert float(mod.weight.abs().max()) <= bound and float(mod.weight.abs().max()) > 0.9 * bound
        assert float(mod.bias.abs().max()) == 0.0                         # bias_filler constant 0
    assert abs(float(m.head[0].weight.detach().std()) - 1e-4) < 1e-5               # colorize_fc1: gaussian std 0.0001
    assert float(m.head[0].bias.detach().abs().max()) == 0.0


def test_input_is_the_release_grey_minus_its_mean():
    # bgr01 -> take_mean (Power shift -0.4488) -> bgr_sum (Eltwise SUM) -> take_mean (Power scale 0.33333) = data
    rgb = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    bgr = rgb.flip(1).numpy()
    data = 0.33333 * ((bgr[:, 0] - 0.4488) + (bgr[:, 1] - 0.4488) + (bgr[:, 2] - 0.4488))
    m = create_model('vgg16_hypercolumn', **SMALL)
    got = m.normalise_input(model_grey_l(rgb))  # the L the hue_chroma target feeds
    np.testing.assert_allclose(got[:, 0].numpy(), data, atol=2e-5)
    assert abs(DATA_OFFSET - 0.33333 * 3 * 0.4488) < 1e-12
    lab = create_model('vgg16_hypercolumn', **SMALL, input_norm='lab')
    torch.testing.assert_close(lab.normalise_input(torch.full((1, 1, 2, 2), 75.0)), torch.full((1, 1, 2, 2), 0.25))


def test_points_read_the_hypercolumn_as_the_released_extractor():
    m = create_model('vgg16_hypercolumn', **SMALL, init='torch').eval()
    H, W = 64, 96  # every map has >= 2 rows and columns (the released layer reads out of bounds on 1)
    L = torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(1)) * 100
    g = torch.Generator().manual_seed(2)
    iy, ix = torch.randint(0, H, (2, 23), generator=g), torch.randint(0, W, (2, 23), generator=g)
    iy[0, :4], ix[0, :4] = torch.tensor([0, H - 1, 0, H - 1]), torch.tensor([0, W - 1, W - 1, 0])  # corners: clamping
    pts = torch.stack([(2 * ix + 1) / W - 1, (2 * iy + 1) / H - 1], -1).float()   # the trainer's pixel centres
    with torch.no_grad():
        taps = m.forward_hypercolumn_taps(L)
        out = m(L, pts)
        ref = _sparse_hypercolumn_extractor([taps[t].double().numpy() for t in m.taps],
                                            [m.tap_stride[t] for t in m.taps],
                                            torch.stack([iy, ix], -1).double().numpy())
        want = m.head(torch.tensor(ref, dtype=torch.float32).view(2, 23, -1).permute(0, 2, 1)[..., None])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # dense inference reads every pixel the same way
        dense = m(L)
    torch.testing.assert_close(dense[torch.arange(2)[:, None], :, iy, ix].permute(0, 2, 1), out[..., 0],
                               atol=1e-5, rtol=1e-4)


def test_points_come_from_the_central_window_as_released():
    # sampler_float: uniform [96, 256) then StripDecimals, 128 points per image of a 352 crop
    pts = sample_points(8, 128, (352, 352), 96, torch.Generator().manual_seed(0))
    assert pts.shape == (8, 128, 2)
    pix = (pts + 1) * 352 / 2 - 0.5
    torch.testing.assert_close(pix, pix.round(), atol=1e-4, rtol=0)              # pixel centres
    assert int(pix.min().round()) == 96 and int(pix.max().round()) == 255
    whole = sample_points(2, 4000, (20, 30), 0, torch.Generator().manual_seed(1))
    px = ((whole + 1) * torch.tensor([30, 20]) / 2 - 0.5).round()
    assert px[..., 0].unique().numel() == 30 and px[..., 1].unique().numel() == 20


# ------------------------------------------------------------------------------------------ VGG-16 loader
def _vgg16_like_state_dict(model: VGG16Hypercolumn, seed=0) -> dict:
    """torchvision vgg16's keys with the (small) model's shapes."""
    g = torch.Generator().manual_seed(seed)
    convs = [n for n in model.trunk_order if n.startswith('conv')]
    sd = {}
    for i, c in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), convs):
        w = getattr(model, c)[0].weight
        shape = (w.shape[0], 3, 3, 3) if i == 0 else tuple(w.shape)
        sd[f'features.{i}.weight'] = torch.randn(shape, generator=g) * 0.1
        sd[f'features.{i}.bias'] = torch.randn(w.shape[0], generator=g) * 0.1
    c5 = model.fc6[0].weight.shape[1]
    sd['classifier.0.weight'] = torch.randn(model.fc_dim, c5 * 49, generator=g) * 0.1
    sd['classifier.0.bias'] = torch.randn(model.fc_dim, generator=g)
    sd['classifier.3.weight'] = torch.randn(model.fc_dim, model.fc_dim, generator=g) * 0.1
    sd['classifier.3.bias'] = torch.randn(model.fc_dim, generator=g)
    sd['classifier.6.weight'] = torch.randn(10, model.fc_dim, generator=g)
    sd['classifier.6.bias'] = torch.randn(10, generator=g)
    return sd


def _check_loaded(model: VGG16Hypercolumn, sd: dict, size: int = 24):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    grey = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # conv1_1 on the grey input == VGG-16's conv1_1 on (g, g, g), normalised as torchvision does
        vgg = F.conv2d((grey.expand(-1, 3, -1, -1) - mean) / std, sd['features.0.weight'], sd['features.0.bias'],
                       padding=1)
        ours = model.conv1_1[0](model.normalise_input(model_grey_l(grey.expand(-1, 3, -1, -1))))
        torch.testing.assert_close(ours[..., 1:-1, 1:-1], vgg[..., 1:-1, 1:-1], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(model.conv5_3[0].weight, sd['features.28.weight'])
        # fc6 (7x7 conv, pad 3) at the centre of a 7x7 pool5 == classifier.0 on the flattened map
        pool5 = torch.randn(2, model.fc6[0].in_channels, 7, 7)
        torch.testing.assert_close(model.fc6[0](pool5)[..., 3, 3],
                                   F.linear(pool5.flatten(1), sd['classifier.0.weight'], sd['classifier.0.bias']),
                                   atol=1e-4, rtol=1e-4)
        fc6 = torch.randn(2, model.fc_dim, 1, 1)
        torch.testing.assert_close(model.fc7[0](fc6)[..., 0, 0],
                                   F.linear(fc6.flatten(1), sd['classifier.3.weight'], sd['classifier.3.bias']))


def test_vgg16_loader_on_a_small_state_dict(tmp_path):
    model = create_model('vgg16_hypercolumn', head='hue_chroma', bn=False, **SMALL)
    sd = _vgg16_like_state_dict(model)
    torch.save(sd, tmp_path / 'vgg16.pth')
    loaded = create_model('vgg16_hypercolumn', head='hue_chroma', bn=False, **SMALL,
                          pretrained=str(tmp_path / 'vgg16.pth'))
    _check_loaded(loaded, sd)
    # a checkpoint of it rebuilds without the weight file
    ck = {'model_name': 'vgg16_hypercolumn', 'model': loaded.state_dict(),
          'model_kwargs': dict(head='hue_chroma', bn=False, **SMALL, pretrained=str(tmp_path / 'gone.pth'))}
    assert torch.equal(model_from_checkpoint(ck).conv1_1[0].weight, loaded.conv1_1[0].weight)


def test_vgg16_loader_errors_are_one_line(tmp_path):
    model = create_model('vgg16_hypercolumn', bn=False, **SMALL)
    good = _vgg16_like_state_dict(model)
    cases = {'missing.pth': None, 'garbage.pth': b'not a torch file', 'resnet.pth': {'fc.weight': torch.zeros(2, 2)},
             'shapes.pth': {**good, 'features.2.weight': torch.zeros(1, 1, 3, 3)}, 'list.pth': [1, 2]}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(UserError) as e:
            load_torchvision_vgg16(model, path)
        msg = str(e.value)
        assert str(path) in msg and '\n' not in msg, msg
    assert 'missing features.0.weight' in str(pytest.raises(UserError, load_torchvision_vgg16, model,
                                                            tmp_path / 'resnet.pth').value)


@pytest.mark.slow
def test_vgg16_loader_on_a_torchvision_vgg16(tmp_path):
    import torchvision

    torch.manual_seed(0)
    sd = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(sd, tmp_path / 'vgg16.pth')
    del sd
    sd = torch.load(tmp_path / 'vgg16.pth', weights_only=True)
    model = create_model('vgg16_hypercolumn', head='hue_chroma', bn=False, pretrained=str(tmp_path / 'vgg16.pth'))
    assert model.hypercolumn_dim == 12417
    _check_loaded(model, sd, size=32)


# ------------------------------------------------------------------------------------------------ configs
CONFIGS = ('larsson_vgg16_hypercol_huechroma_in1k_352px_scratch', 'larsson_vgg16_hypercol_huechroma_in1k_352px_from-vgg16')


@pytest.mark.parametrize('name', CONFIGS)
def test_larsson_configs_are_the_release(name):
    from pathlib import Path

    from pretext.runtime import load_config
    from pretext.targets import HueChroma
    from pretext.train import PretextConfig, build_target

    cfg = load_config(PretextConfig, Path(__file__).resolve().parents[1] / 'configs' / 'pretext' / f'{name}.yaml')
    # train/solver_vgg16.prototxt
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ('sgd', 1e-3, 0.9, 5e-4)
    assert (list(cfg.lr_steps), cfg.lr_gamma, cfg.max_steps) == ([1_000_000, 1_500_000, 1_750_000], 0.1, 2_000_000)
    # train/train_vgg16.prototxt: biases lr_mult 2 decay_mult 0, batch 8, crop 352, 8 x 128 points in [96, 256)
    assert (cfg.bias_lr_mult, cfg.bias_decay_mult, cfg.batch_size, cfg.size) == (2.0, 0.0, 8, 352)
    assert (cfg.points_per_image, cfg.points_margin, cfg.model, cfg.init) == (128, 96, 'vgg16_hypercolumn', 'default')
    assert isinstance(build_target(cfg, None), HueChroma)
    assert cfg.model_kwargs['bn'] is ('scratch' in name)
    assert ('pretrained' in cfg.model_kwargs) is ('from-vgg16' in name)


def test_larsson_recipe_trains_a_few_steps(tmp_path, sample_dir):
    from pretext.runtime import load_checkpoint
    from pretext.train import PretextConfig, run

    imgs = sorted((sample_dir / 'train').glob('*.jpg'))[:4]
    cfg = PretextConfig(data=[str(p) for p in imgs], model='vgg16_hypercolumn', model_kwargs=dict(SMALL, bn=True),
                        loss='hue_chroma', points_per_image=32, points_margin=16, size=64, batch_size=2, max_steps=2,
                        optimizer='sgd', lr=1e-3, momentum=0.9, weight_decay=5e-4, bias_lr_mult=2.0,
                        bias_decay_mult=0.0, lr_steps=[], init='default', crop='rrc', workers=0, tensorboard=False,
                        progress=False, log_every=1, image_every=2, checkpoint_every=2, out_dir=str(tmp_path / 'run'))
    assert run(cfg) == 0
    ck = load_checkpoint(tmp_path / 'run' / 'checkpoint.pth')
    assert ck['target'] == 'hue_chroma' and ck['step'] == 2
    import json

    logs = [json.loads(line) for line in (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()]
    step_logs = [r for r in logs if 'loss_hue' in r]
    assert step_logs and all(math.isfinite(r['loss_hue']) and math.isfinite(r['loss_chroma']) for r in step_logs)
