"""pretext.losses: the sparse loss against the textbook dense formula, rebalancing, optimisation, L2, and the loss as
released against a transcription of the Caffe layers."""
import numpy as np
import torch

from pretext.encoding import SoftEncoder, load_bins, rebalance_weights, to_dense
from pretext.losses import (
    class_rebalance_mult,
    dense_cross_entropy,
    l2_ab_loss,
    multinomial_cross_entropy,
    rebalanced_softmax_loss,
)


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


# --------------------------------------------------------------------------------------------- the loss as released
# Transcriptions of richzhang/colorization resources/caffe_traininglayers.py (NNEncLayer, PriorBoostLayer / PriorFactor,
# NonGrayMaskLayer, ClassRebalanceMultLayer), resources/softmax_cross_entropy_loss_layer.cpp and the Resize layer of
# caffe-colorization (src/caffe/layers/resize_layer.cpp, upsampling: no tent prefilter), in numpy, written from the
# layer definitions; the chain is that of train_alexnet/train_val.prototxt (data_ab_ss stride 8, fc8 -> fc8_us).
def _caffe_nnenc(ab_ss, centres, k=10, sigma=5.0):
    from sklearn.neighbors import NearestNeighbors

    N, _, h, w = ab_ss.shape
    pts = ab_ss.transpose(0, 2, 3, 1).reshape(-1, 2)
    dist, ind = NearestNeighbors(n_neighbors=k, algorithm="ball_tree").fit(centres).kneighbors(pts)
    wts = np.exp(-dist ** 2 / (2 * sigma ** 2))
    wts /= wts.sum(axis=1, keepdims=True)
    enc = np.zeros((pts.shape[0], centres.shape[0]))
    enc[np.arange(pts.shape[0])[:, None], ind] = wts
    return enc.reshape(N, h, w, -1).transpose(0, 3, 1, 2)


def _caffe_prior_boost(enc, prior, gamma=0.5, alpha=1.0):
    uni = (prior != 0).astype(np.float64)
    uni /= uni.sum()
    factor = ((1 - gamma) * prior + gamma * uni) ** -alpha
    factor /= (prior * factor).sum()
    return factor[enc.argmax(axis=1)][:, None]  # (N, 1, h, w)


def _caffe_nongray(ab_ss, thresh=5.0):
    return ((np.abs(ab_ss) > thresh).sum(axis=(1, 2, 3)) > 0)[:, None, None, None].astype(np.float64)


def _caffe_lerp(n_out, n_in):
    scale = (n_out - 1.0) / (n_in - 1.0)  # Resize with a reference blob: scale from the shapes, crop 0
    x = np.clip(np.arange(n_out) / scale, 0, n_in - 1)
    i0 = x.astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, i1 - x  # out[i] = w[i] * in[i0[i]] + (1 - w[i]) * in[i1[i]]


def _caffe_resize(x, h, w):
    i0, i1, wx = _caffe_lerp(w, x.shape[-1])
    t = wx * x[..., i0] + (1 - wx) * x[..., i1]
    j0, j1, wy = _caffe_lerp(h, x.shape[-2])
    return wy[:, None] * t[..., j0, :] + (1 - wy[:, None]) * t[..., j1, :]


def _caffe_resize_backward(g, h_in, w_in):
    j0, j1, wy = _caffe_lerp(g.shape[-2], h_in)
    t = np.zeros(g.shape[:-2] + (h_in, g.shape[-1]))
    for y in range(g.shape[-2]):
        t[..., j0[y], :] += wy[y] * g[..., y, :]
        t[..., j1[y], :] += (1 - wy[y]) * g[..., y, :]
    i0, i1, wx = _caffe_lerp(g.shape[-1], w_in)
    out = np.zeros(g.shape[:-2] + (h_in, w_in))
    for x in range(g.shape[-1]):
        out[..., i0[x]] += wx[x] * t[..., x]
        out[..., i1[x]] += (1 - wx[x]) * t[..., x]
    return out


def _caffe_softmax_xent(logits, target):
    """SoftmaxCrossEntropyLoss: forward sum_{t > 0} -t (log p - log t) / N; backward (p - t) / N."""
    N = logits.shape[0]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    pos = target > 0
    loss = -(target[pos] * (np.log(p[pos]) - np.log(target[pos]))).sum() / N
    return loss, (p - target) / N


def test_gradient_equals_the_released_caffe_layers():
    """The released AlexNet chain on a batch: ab -> data_ab_ss (stride 8) -> NNEnc (k 10, sigma 5), NonGrayMask,
    PriorBoost (gamma 0.5) -> fc8 -> Resize -> ClassRebalanceMult -> SoftmaxCrossEntropyLoss, gradient at fc8."""
    from pretext.targets import AB313
    from pretext.train import PretextConfig, output_and_targets

    g = torch.Generator().manual_seed(0)
    B, H = 3, 45  # targets 6x6 (pixels 0, 8, .., 40), logits 3x3 resized with scale 5/2
    ab = torch.rand(B, 2, H, H, generator=g, dtype=torch.float64) * 160 - 80
    ab[1] = ab[1].clamp(-4.5, 4.5)  # a grey image: no target cell above 5
    ab[2, :, 8:, :] = ab[2, :, 8:, :] / 100  # coloured in its first target row only (no exact ties in the k-NN)
    prior = torch.rand(313, generator=g, dtype=torch.float64) ** 4 + 1e-6  # no empty bin, as prior_probs.npy
    prior /= prior.sum()
    fc8 = torch.randn(B, 313, 3, 3, generator=g, dtype=torch.float64) * 3

    # crosschannel: the trainer's geometry and the ab313 target as configured by default (rebal, k 10, reference)
    class Logits(torch.nn.Module):
        target_stride = 8

        def __init__(self):
            super().__init__()
            self.fc8 = torch.nn.Parameter(fc8.float().clone())

        def forward(self, x):
            return self.fc8

    net = Logits()
    cfg = PretextConfig()
    weights = rebalance_weights(prior, cfg.lam, cfg.rebalance_mode)
    target = AB313(load_bins(), weights, k=cfg.k, sigma=cfg.sigma, grey_thresh=cfg.grey_thresh,
                   normalize=cfg.loss_norm)
    out, ab_t = output_and_targets(net, torch.zeros(B, 1, H, H), ab.float(), cfg, None)
    mask = torch.ones(B, dtype=torch.bool) & target.valid(ab_t)
    loss, logs = target.loss(out, target.encode(ab_t), mask)
    loss.backward()

    # the release, transcribed
    ab_ss = ab.numpy()[:, :, ::8, ::8]
    assert ab_t.shape == (B, 2, 6, 6) and np.allclose(ab_t.numpy(), ab_ss, atol=1e-4)
    enc = _caffe_nnenc(ab_ss, load_bins().double().numpy())
    boost = _caffe_prior_boost(enc, prior.numpy()) * _caffe_nongray(ab_ss)
    assert boost[1].max() == 0 and boost[0].min() > 0 and boost[2].max() > 0
    fc8_us = _caffe_resize(fc8.numpy(), 6, 6)
    caffe_loss, d_us = _caffe_softmax_xent(fc8_us, enc)
    d_fc8 = _caffe_resize_backward(d_us * boost, 3, 3)

    torch.testing.assert_close(net.fc8.grad.double(), torch.from_numpy(d_fc8), rtol=1e-4, atol=1e-7)
    assert float(net.fc8.grad.abs().max()) > 1e-3
    # logged values: the plain loss (the release logs it over every image; here the grey image does not count) and
    # the rebalanced one the gradient descends
    nongray = _caffe_nongray(ab_ss)[:, 0, 0, 0].astype(bool)
    plain_nongray, _ = _caffe_softmax_xent(fc8_us[nongray], enc[nongray])
    assert abs(float(logs["loss"]) - plain_nongray * nongray.sum() / B) < 1e-4 * abs(caffe_loss)
    e = np.exp(fc8_us - fc8_us.max(1, keepdims=True))
    logp = np.log(e / e.sum(1, keepdims=True))
    kl = np.where(enc > 0, enc * (np.log(np.where(enc > 0, enc, 1)) - logp), 0).sum(1, keepdims=True)
    assert abs(float(logs["loss_weighted"]) - (kl * boost).sum() / B) < 1e-4 * float(logs["loss_weighted"])


def test_class_rebalance_mult_and_normalisations():
    logits, idx, w, g = _batch(4, B=2, H=3, W=4)
    pw = torch.rand(2, 3, 4, generator=g) * 3
    mask = torch.tensor([True, False])
    x = logits.clone().requires_grad_()
    y = class_rebalance_mult(x, pw)
    assert torch.equal(y, logits)  # identity forward
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, pw.unsqueeze(1).expand_as(x))  # gradient x factor
    # hand-computed: per-pixel KL, masked image 1, normalised by the batch (2 images) or the 12 counted pixels
    p = torch.softmax(logits, 1)
    t = to_dense(idx, w, 313)
    kl = (torch.xlogy(t, t) - t * torch.log(p)).sum(1)
    for norm, denom in (("batch", 2.0), ("pixel", 12.0)):
        x = logits.clone().requires_grad_()
        loss, weighted = rebalanced_softmax_loss(x, idx, w, pw, mask, normalize=norm)
        loss.backward()
        assert torch.allclose(loss, kl[0].sum() / denom, rtol=1e-5)
        assert torch.allclose(weighted, (kl[0] * pw[0]).sum() / denom, rtol=1e-5)
        grad = (p - t) * pw.unsqueeze(1) * mask.view(2, 1, 1, 1) / denom
        assert torch.allclose(x.grad, grad, atol=1e-7, rtol=1e-4)
