"""pretext.losses: the sparse loss against the textbook dense formula, rebalancing, optimisation, L2."""
import torch

from pretext.encoding import SoftEncoder, load_bins, rebalance_weights, to_dense
from pretext.losses import dense_cross_entropy, l2_ab_loss, multinomial_cross_entropy


def _batch(seed: int = 0, B: int = 2, H: int = 6, W: int = 7):
    g = torch.Generator().manual_seed(seed)
    ab = torch.rand(B, 2, H, W, generator=g) * 200 - 100
    logits = torch.randn(B, 313, H, W, generator=g)
    idx, w = SoftEncoder(load_bins(), k=5)(ab)
    return logits, idx, w, g


def test_sparse_equals_dense_with_weights_and_masks():
    logits, idx, w, g = _batch()
    dense = to_dense(idx, w, 313)
    cw = torch.rand(313, generator=g) * 3
    pix_mask = torch.rand(2, 6, 7, generator=g) < 0.5
    img_mask = torch.tensor([True, False])
    for class_weights in (None, cw):
        for mask in (None, pix_mask, img_mask):
            a = multinomial_cross_entropy(logits, idx, w, class_weights=class_weights, mask=mask)
            b = dense_cross_entropy(logits, dense, class_weights=class_weights, mask=mask)
            assert torch.allclose(a, b, rtol=1e-5), (class_weights is None, mask)
    # hand-written: masked pixels only, per-pixel weight of the argmax bin
    logp = torch.log_softmax(logits, 1)
    per = -(dense * logp).sum(1) * cw[dense.argmax(1)]
    assert torch.allclose(multinomial_cross_entropy(logits, idx, w, cw, pix_mask), per[pix_mask].mean(), rtol=1e-5)
    assert torch.allclose(multinomial_cross_entropy(logits, idx, w, cw, img_mask), per[0].mean(), rtol=1e-5)


def test_uniform_prior_rebalanced_equals_plain():
    logits, idx, w, _ = _batch(1)
    cw = rebalance_weights(torch.full((313,), 1 / 313.0))
    assert torch.allclose(cw, torch.ones(313))
    assert torch.allclose(multinomial_cross_entropy(logits, idx, w, cw), multinomial_cross_entropy(logits, idx, w))


def test_loss_decreases_under_sgd():
    torch.manual_seed(0)
    ab = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(2)) * 160 - 80
    idx, w = SoftEncoder(load_bins(), k=5)(ab)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 313, 1))
    opt = torch.optim.SGD(net.parameters(), lr=2.0, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = multinomial_cross_entropy(net(x), idx, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_l2_ab_loss_hand_computed():
    pred = torch.tensor([0.1, -0.2, 0.0, 0.5]).view(1, 2, 1, 2)  # pixels: (0.1, 0.0), (-0.2, 0.5)
    ab = torch.tensor([11.0, 22.0, 0.0, 55.0]).view(1, 2, 1, 2)  # / 110: (0.1, 0.0), (0.2, 0.5)
    # pixel 0: 0; pixel 1: 0.5 * (0.4^2 + 0) = 0.08
    assert torch.allclose(l2_ab_loss(pred, ab), torch.tensor(0.04))
    assert torch.allclose(l2_ab_loss(pred, ab, mask=torch.tensor([[[False, True]]])), torch.tensor(0.08))
