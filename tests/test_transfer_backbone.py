"""transfer.backbone: pretext checkpoint / supervised weights / random init -> the transfer network. Checked
against independent computations: the pretext modules run unfolded (conv, BatchNorm in eval mode, ReLU), the
torchvision network itself, and the properties of the grey and colour input adaptations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from test_voc import SHARED

from pretext.color import gray_rgb, rgb_to_l, rgb_to_lab
from pretext.models import create_model
from pretext.runtime import UserError, save_checkpoint
from transfer.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _TORCHVISION_LAYERS,
    RescaleNet,
    _stage_key_map,
    alexnet_transfer_net,
    build_backbone,
    convert_state_dict,
    gaussian_init,
    network_input,
    rescale_backbone,
    vgg16_transfer_net,
    weight_layers,
)


@torch.no_grad()
def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics (and affine parameters, where the model has them) so folding is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def write_pretext_checkpoint(path, model_name: str = "alexnet_cc", seed: int = 0, **model_kwargs):
    """An untrained pretext model saved in ``pretext.train``'s checkpoint format (what ``--checkpoint`` reads)."""
    torch.manual_seed(seed)
    kwargs = dict(model_kwargs)
    if model_name == "alexnet_cc":
        kwargs.setdefault("fc_dim", 32)
    model = create_model(model_name, **kwargs)
    _randomise_bn(model, seed)
    save_checkpoint({"format": "crosschannel/pretext-v1", "model_name": model_name, "model_kwargs": kwargs,
                     "model": model.state_dict(), "step": 7, "target": "ab313"}, path)
    return model.eval()


def write_torchvision_alexnet(path, fc_dim: int = 32, seed: int = 0) -> nn.Module:
    """torchvision's AlexNet (fc6/fc7 narrowed to ``fc_dim`` to keep the file small) saved as a state dict."""
    torch.manual_seed(seed)
    tv = torchvision.models.alexnet()
    tv.classifier[1] = nn.Linear(256 * 6 * 6, fc_dim)
    tv.classifier[4] = nn.Linear(fc_dim, fc_dim)
    tv.classifier[6] = nn.Linear(fc_dim, 1000)
    torch.save(tv.state_dict(), path)
    return tv.eval()


def _rgb(n=2, size=227, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_alexnet_cc_checkpoint_equals_the_unfolded_pretext_network(tmp_path):
    from pretext.models.alexnet_cc import export_alexnet_transfer

    model = write_pretext_checkpoint(tmp_path / "c.pth")
    net = build_backbone(str(tmp_path / "c.pth"), rescale=False).eval()
    rgb = _rgb()
    L = rgb_to_l(rgb)
    assert torch.equal(net.prepare(rgb), L) and net.input_kind == "L" and net.info["source"] == "checkpoint"
    with torch.no_grad():
        pool5 = net.forward_features(L, until="pool5")
        assert pool5.shape == (2, 256, 6, 6)
        torch.testing.assert_close(pool5, export_alexnet_transfer(model)(L), rtol=1e-5, atol=1e-5)
        # fc6 / fc7: the pretext convolutions without dilation, BatchNorm in eval mode, ReLU (what BN absorption means)
        x = pool5
        for n in ("fc6", "fc7"):
            conv, bn = getattr(model, n)[0], getattr(model, n)[1]
            x = F.relu(bn(F.conv2d(x, conv.weight, conv.bias)))
        torch.testing.assert_close(net.forward_features(L, until="fc7"), x, rtol=1e-4, atol=1e-5)
        assert net.forward_features(L).shape == (2, 32, 1, 1)
    # the same network with fc6/fc7 as linear layers (the detection box head) computes the same
    lin = build_backbone(str(tmp_path / "c.pth"), rescale=False, fc="linear").eval()
    assert isinstance(lin.fc6[0], nn.Linear) and lin.fc6[0].in_features == 256 * 6 * 6
    with torch.no_grad():
        torch.testing.assert_close(lin.forward_features(L), net.forward_features(L).flatten(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lin.box_head().eval()(pool5), lin.forward_features(L), rtol=1e-5, atol=1e-6)


def test_detection_and_segmentation_geometry(tmp_path):
    write_pretext_checkpoint(tmp_path / "c.pth")
    net = build_backbone(str(tmp_path / "c.pth"), rescale=False, fc="linear").eval()
    trunk = net.trunk("conv5")
    assert list(trunk.state_dict())[0] == "conv1.0.weight" and trunk.conv1 is net.conv1  # shared, same keys
    assert net.channels("conv5") == 256 and net.reduction("conv5") == 16 and net.num_features == 32
    with torch.no_grad():
        L = rgb_to_l(_rgb(1, 320))
        # conv1 (320 - 11) // 4 + 1 = 78; pools round up as Caffe: 78 -> 39 -> 19 (about 320 / 16)
        assert trunk(L).shape == (1, 256, 19, 19)
        assert net.box_head()(torch.rand(5, 256, 6, 6)).shape == (5, 32)
    fcn = build_backbone(str(tmp_path / "c.pth"), rescale=False, fc="conv", conv1_padding=100).eval()
    with torch.no_grad():
        assert fcn.conv1[0].padding == (100, 100)
        assert fcn.forward_features(L, until="conv1").shape[-1] == (320 + 200 - 11) // 4 + 1
        assert fcn.forward_features(L).shape[:2] == (1, 32)  # fc7 map
    with pytest.raises(ValueError, match="fc='linear'"):
        fcn.box_head()
    with pytest.raises(ValueError, match="no stage 'conv9'"):
        fcn.forward_features(L, until="conv9")
    assert fcn.stages_from("fc6") == ["fc6", "drop6", "fc7", "drop7"]


def test_color_input_starts_as_the_grey_network(tmp_path):
    write_pretext_checkpoint(tmp_path / "c.pth")
    gray = build_backbone(str(tmp_path / "c.pth"), rescale=False).eval()
    color = build_backbone(str(tmp_path / "c.pth"), rescale=False, input="color").eval()
    w = color.conv1[0].weight
    assert w.shape[1] == 3 and torch.count_nonzero(w[:, 1:]) == 0 and torch.equal(w[:, :1], gray.conv1[0].weight)
    rgb = _rgb()
    lab = color.prepare(rgb)
    assert lab.shape[1] == 3 and torch.equal(lab, rgb_to_lab(rgb)) and color.info["input"] == "color"
    with torch.no_grad():
        torch.testing.assert_close(color(lab), gray(gray.prepare(rgb)), rtol=1e-5, atol=1e-6)
    color(lab).sum().backward()  # the ab weights start at zero but learn
    assert w.grad[:, 1:].abs().sum() > 0


def test_supervised_alexnet_equals_torchvision(tmp_path):
    tv = write_torchvision_alexnet(tmp_path / "alexnet.pth")
    rgb = _rgb()
    norm = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = tv.classifier[:6](torch.flatten(tv.avgpool(tv.features(norm)), 1))  # fc7 after ReLU, eval mode
    for fc in ("conv", "linear"):
        net = build_backbone(supervised=f"alexnet:{tmp_path / 'alexnet.pth'}", input="color", fc=fc).eval()
        assert net.input_kind == "rgb" and net.arch == "alexnet" and net.num_features == 32
        with torch.no_grad():
            torch.testing.assert_close(net(net.prepare(rgb)).flatten(1), ref, rtol=1e-4, atol=1e-5)


def test_supervised_grey_input_sums_conv1_over_rgb(tmp_path):
    tv = write_torchvision_alexnet(tmp_path / "alexnet.pth")
    tv.features[0].padding = (0, 0)  # without padding every output is interior: exact equality everywhere
    rgb = _rgb()
    grey_rgb = gray_rgb(rgb)[:, :1].expand(-1, 3, -1, -1)  # R = G = B (gray_rgb's channels agree to ~3e-5)
    norm = (grey_rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = tv.classifier[:6](torch.flatten(tv.avgpool(tv.features(norm)), 1))
    net = build_backbone(supervised=f"alexnet:{tmp_path / 'alexnet.pth'}", input="gray", conv1_padding=0).eval()
    x = net.prepare(rgb)
    assert x.shape[1] == 1 and net.conv1[0].weight.shape[1] == 1 and net.input_kind == "grey"
    assert torch.equal(x, grey_rgb[:, :1]) and torch.allclose(x, gray_rgb(rgb)[:, 2:3], atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(net(x).flatten(1), ref, rtol=1e-4, atol=1e-4)


def test_key_conversion_names_missing_and_unexpected_keys(tmp_path):
    tv = write_torchvision_alexnet(tmp_path / "alexnet.pth")
    sd = tv.state_dict()
    del sd["features.3.bias"]
    sd["features.99.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"broken.pth \(alexnet\): cannot convert the weights: missing \['conv2.0.bias'\], "
                                         r"unexpected \['features.99.weight'\]"):
        build_backbone(supervised=f"alexnet:{tmp_path / 'broken.pth'}", input="color")
    net = alexnet_transfer_net("alexnet", "rgb", fc_dim=32)
    sd = tv.state_dict()
    sd["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(UserError, match=r"'conv1.0.weight' has shape \(64, 3, 5, 5\), the network needs \(64, 3, 11, 11\)"):
        convert_state_dict(sd, _stage_key_map(net, _TORCHVISION_LAYERS["alexnet"]), net, "x", drop=("classifier.6.",))


def test_vgg16_key_map_covers_torchvision_vgg16():
    with torch.device("meta"):  # shapes only: no 500 MB of weights
        tv = torchvision.models.vgg16()
        net = vgg16_transfer_net("rgb", fc="linear")
        conv = vgg16_transfer_net("rgb", fc="conv")
    sd, key_map = tv.state_dict(), _stage_key_map(net, _TORCHVISION_LAYERS["vgg16"])
    assert set(sd) - set(key_map) == {"classifier.6.weight", "classifier.6.bias"}  # the old fc8, dropped
    assert set(key_map.values()) == set(net.state_dict())
    for src, dst in key_map.items():
        assert sd[src].shape == net.state_dict()[dst].shape
        assert sd[src].numel() == conv.state_dict()[dst].numel()  # fc6 7x7 conv <- Linear(25088, 4096), reshaped
    assert conv.fc6[0].kernel_size == (7, 7) and net.reduction("conv5") == 16 and net.channels("conv5") == 512


def test_zhang_vgg_and_timm_checkpoints(tmp_path):
    model = write_pretext_checkpoint(tmp_path / "z.pth", "zhang_vgg")
    net = build_backbone(str(tmp_path / "z.pth"), rescale=False).eval()
    assert net.stage_names == [f"conv{i}" for i in range(1, 8)] and not net.has_fc and net.reduction("conv7") == 8
    L = rgb_to_l(_rgb(1, 64))
    with torch.no_grad():
        x = (L - 50) / 100
        for i in range(1, 8):
            x = getattr(model, f"conv{i}")(x)
        torch.testing.assert_close(net(L), x)
        color = build_backbone(str(tmp_path / "z.pth"), rescale=False, input="color").eval()
        torch.testing.assert_close(color(rgb_to_lab(_rgb(1, 64))), x, rtol=1e-5, atol=1e-5)
    model = write_pretext_checkpoint(tmp_path / "t.pth", "timm:resnet18")
    net = build_backbone(str(tmp_path / "t.pth"), rescale=False, input="color").eval()
    assert net.stage_names == ["encoder"] and net.num_features == 512 and net.reduction("encoder") == 32
    with torch.no_grad():
        torch.testing.assert_close(net(rgb_to_lab(_rgb(1, 64))), model.encoder((L - 50) / 100)[-1], rtol=1e-5, atol=1e-5)


def test_random_gaussian_init_and_bad_sources(tmp_path):
    net = build_backbone(random_init="gaussian", fc_dim=64, seed=3)
    assert net.info["source"] == "random" and net.input_kind == "L"
    assert net.conv1[0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert net.fc6[0].weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert [getattr(net, f"conv{i}")[0].bias.unique().item() for i in range(1, 6)] == [0, 1, 0, 1, 1]
    assert net.fc7[0].bias.unique().item() == 1
    again = alexnet_transfer_net("alexnet_cc", "L", fc_dim=64)
    gaussian_init(again, torch.Generator().manual_seed(3))
    assert torch.equal(again.conv3[0].weight, net.conv3[0].weight)  # seeded
    assert build_backbone(random_init="gaussian", fc_dim=8, input="color").conv1[0].weight.shape[1] == 3
    with pytest.raises(UserError, match="exactly one backbone source"):
        build_backbone(str(tmp_path / "x.pth"), random_init="gaussian")
    with pytest.raises(UserError, match="random_init must be one of"):
        build_backbone(random_init="xavier")
    with pytest.raises(UserError, match="needs images"):
        build_backbone(random_init="kmeans")
    with pytest.raises(UserError, match="give the weights file"):
        build_backbone(supervised="alexnet")
    with pytest.raises(UserError, match="architecture must be one of"):
        build_backbone(supervised="resnet50:/x.pth")
    with pytest.raises(UserError, match="x.pth: checkpoint not found"):
        build_backbone(str(tmp_path / "x.pth"))
    save_checkpoint({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a pretext checkpoint"):
        build_backbone(str(tmp_path / "other.pth"))
    with pytest.raises(UserError, match="rescaling needs images"):
        write_pretext_checkpoint(tmp_path / "c.pth")
        build_backbone(str(tmp_path / "c.pth"))
    with pytest.raises(UserError, match="input must be one of"):
        build_backbone(random_init="gaussian", input="rgb")


def test_network_input_kinds():
    rgb = _rgb(1, 8)
    assert network_input(rgb, "L").shape == (1, 1, 8, 8) and network_input(rgb, "Lab").shape == (1, 3, 8, 8)
    assert torch.equal(network_input(rgb, "rgb"), rgb)
    g = network_input(rgb, "grey")
    torch.testing.assert_close(rgb_to_l(g.expand(-1, 3, -1, -1)), rgb_to_l(rgb), atol=1e-3, rtol=0)  # same lightness
    with pytest.raises(ValueError):
        network_input(rgb, "hsv")


def _voc_crops(n: int = 8) -> torch.Tensor:
    """Random 227 px square crops of the real VOC2012 images in ../shared/data/voc_sample (the protocol's crops)."""
    from pretext.data import pil_to_tensor, read_image
    from transfer.classification import crop_params, square_crop

    paths = sorted((SHARED / "voc_sample" / "bbox_detection" / "JPEGImages").glob("*.jpg"))
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        img = pil_to_tensor(read_image(paths[k % len(paths)]))
        out.append(square_crop(img, *crop_params(img.shape[1], img.shape[2], 227, 0.5, 2.0, True, g), 227))
    return torch.stack(out)


def _gradient_ratios(rs, x, draws: int = 4) -> torch.Tensor:
    """RMS(dW) / RMS(W) of every rescaled layer with N(0, 1) gradients injected at the top of the rescaling net (the
    quantity magic_init equalises), measured here independently of pretext.init: the root of the mean over ``draws``
    of the squared ratio (its expectation over the injected noise)."""
    layers = weight_layers(rs.net, rs.net.stage_names[: rs.net.stage_names.index("fc7") + 1]) + [rs.fc8_]
    g = torch.Generator().manual_seed(123)
    acc = torch.zeros(len(layers), dtype=torch.float64)
    for _ in range(draws):
        rs.zero_grad()
        top = rs(x)
        top.backward(torch.randn(top.shape, generator=g))
        acc += torch.tensor([(m.weight.grad.pow(2).mean() / m.weight.pow(2).mean()).item() for m in layers])
    return (acc / draws).sqrt()


@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
def test_rescaling_equalises_gradient_ratios_on_voc_images(tmp_path):
    write_pretext_checkpoint(tmp_path / "c.pth", fc_dim=512)
    rgb = _voc_crops(8)
    plain = build_backbone(str(tmp_path / "c.pth"), rescale=False).eval()
    net = build_backbone(str(tmp_path / "c.pth"), rescale=False).eval()
    x = net.prepare(rgb)
    rs = RescaleNet(net, torch.Generator().manual_seed(0))
    before = _gradient_ratios(rs, x)
    ratios = rescale_backbone(net, x, rescale_net=rs)
    reported = torch.tensor(ratios)
    assert len(ratios) == 8 and net.info["rescale"] == {"images": 8, "ratios": ratios}  # conv1..5, fc6, fc7, fc8_
    assert ((reported / reported.log().mean().exp() - 1).abs() < 0.01).all(), reported  # equal within 1%
    after = _gradient_ratios(rs, x)
    spread = lambda r: (r.max() / r.min()).item()  # noqa: E731
    # measured here over fresh noise: 1e5 apart before, within 10% after (1% holds for the draw pretext.init used)
    assert spread(before) > 100 and spread(after) < 1.2, (before, after)
    # a ReLU network without BatchNorm computes the same function up to an output scale
    with torch.no_grad():
        a, b = plain.forward_features(x, "fc7"), net.forward_features(x, "fc7")
    scale = (b * a).sum() / (a * a).sum()
    torch.testing.assert_close(b, scale * a, rtol=1e-3, atol=1e-4 * b.abs().max().item())
    # through the builder: rescaled on the given images; zhang_vgg has BatchNorm: skipped, the reason recorded
    assert build_backbone(str(tmp_path / "c.pth"), images=rgb[:4]).info["rescale"]["images"] == 4
    write_pretext_checkpoint(tmp_path / "z.pth", "zhang_vgg")
    assert build_backbone(str(tmp_path / "z.pth"), images=rgb[:1, :, :64, :64]).info["rescale"] == "skipped (BatchNorm)"


@pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")
def test_data_dependent_random_init_on_voc_images():
    rgb = _voc_crops(8)
    net = build_backbone(random_init="dd_gaussian", images=rgb, fc_dim=64, seed=1)  # kmeans / pca: same path, slower
    assert net.info["init"] == "dd_gaussian" and net.info["init_report"]["converged"]
    with torch.no_grad():  # within-layer step: every conv1 channel has the same std on the batch (1, then one scale)
        pre = net.conv1[0](net.norm(net.prepare(rgb)))
    sd = pre.transpose(0, 1).flatten(1).std(1)
    assert (sd / sd.mean() - 1).abs().max() < 1e-3
    other = build_backbone(random_init="gaussian", fc_dim=64, seed=1)
    assert not torch.equal(net.conv1[0].weight, other.conv1[0].weight)
