"""pretext.targets: the one seam between ab and the loss, for every target."""
import pytest
import torch

from pretext import hue_chroma
from pretext.color import rgb_to_lab
from pretext.encoding import annealed_mean, load_bins, rebalance_weights
from pretext.predict import predict_ab_lowres
from pretext.runtime import UserError
from pretext.targets import AB313, TARGETS, get_target
from pretext.train import PretextConfig, build_target


def _ab(B=2, h=4, w=5, seed=0):
    return torch.rand(B, 2, h, w, generator=torch.Generator().manual_seed(seed)) * 120 - 60


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_encodes_scores_and_decodes(name):
    t = get_target(name)
    assert t.name == name and TARGETS[name] is type(t)
    ab_t = _ab()
    out = torch.randn(2, t.out_channels, 4, 5, requires_grad=True)
    rgb = torch.rand(2, 3, 8, 8)
    lab = rgb_to_lab(rgb)
    assert torch.equal(t.model_input(rgb, lab), lab[:, :1])  # the default input: L
    valid = t.valid(ab_t)
    assert valid.dtype == torch.bool and valid.shape == (2,)
    loss, logs = t.loss(out, t.encode(ab_t), valid)
    assert loss.dim() == 0 and torch.isfinite(loss) and "loss" in logs
    assert all(v.dim() == 0 and not v.requires_grad for v in logs.values())
    loss.backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    ab = t.decode(out.detach(), 0.38)
    assert ab.shape == (2, 2, 4, 5) and torch.isfinite(ab).all()
    # predict decodes through the same target, by name or object
    net = torch.nn.Conv2d(1, t.out_channels, 1)
    x = torch.rand(1, 1, 4, 5) * 100
    with torch.no_grad():
        want = t.decode(net(x), 0.5)
    assert torch.allclose(predict_ab_lowres(net, x, name, t.bins, 0.5), want)
    assert torch.allclose(predict_ab_lowres(net, x, t, t.bins, 0.5), want)


def test_decoders_are_the_documented_ones():
    out = torch.randn(2, 313, 3, 3)
    bins = load_bins() * 0.5
    assert torch.equal(get_target("ab313", bins).decode(out, 0.2), annealed_mean(out, bins, 0.2))
    assert torch.allclose(get_target("l2").decode(out[:, :2], 0.38), out[:, :2] * 110.0)
    hc = out[:, : hue_chroma.N_HUE + hue_chroma.N_CHROMA]
    assert torch.equal(get_target("hue_chroma").decode(hc), hue_chroma.decode_ab(hc))
    with pytest.raises(ValueError, match="unknown target"):
        get_target("lab")


def test_ab313_from_config_and_rebalancing(tmp_path):
    prior = {"bins": load_bins(), "probs": torch.rand(313, dtype=torch.float64) + 0.01}
    cfg = PretextConfig()
    t = build_target(cfg, prior)
    assert isinstance(t, AB313) and (t.k, t.sigma, t.normalize, t.grey_thresh) == (10, 5.0, "batch", 5.0)
    assert torch.allclose(t.class_weights, rebalance_weights(prior["probs"], 0.5, "reference"))
    assert build_target(PretextConfig(loss="ce"), None).class_weights is None
    with pytest.raises(UserError, match="needs a prior"):
        build_target(cfg, None)
    with pytest.raises(UserError, match="loss must be one of"):
        build_target(PretextConfig(loss="huber"), None)
    # rebalanced: the value is the plain loss, the logged weighted loss differs
    ab_t = _ab()
    out = torch.randn(2, 313, 4, 5)
    loss, logs = t.loss(out, t.encode(ab_t), t.valid(ab_t))
    plain, _ = build_target(PretextConfig(loss="ce"), None).loss(out, t.encode(ab_t), t.valid(ab_t))
    assert torch.allclose(loss, plain) and not torch.allclose(logs["loss_weighted"], logs["loss"])


def test_hue_chroma_asks_for_the_hypercolumn_head():
    t = get_target("hue_chroma")
    assert t.model_kwargs("vgg16_hypercolumn") == {"out_dim": 64, "head": "hue_chroma"}
    assert t.model_kwargs("alexnet_cc") == {"out_dim": 64}
