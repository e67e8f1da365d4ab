"""Data-dependent initialisation (within-layer and between-layer), in PyTorch.

Paper: P. Kraehenbuehl, C. Doersch, J. Donahue, T. Darrell, "Data-dependent Initializations of
Convolutional Neural Networks", ICLR 2016 (arXiv 1511.06856). Release: philkr/magic_init
``magic_init.py`` (Caffe). Zhang et al. train their from-scratch AlexNet after
``magic_init -nit 10 -t kmeans`` (richzhang/colorization ``train_alexnet/run_init.sh``).

Within-layer (``magicInitialize`` / ``initializeLayer`` / ``initializeWeight``), for every
Conv2d / ConvTranspose2d / Linear in forward order, on a batch of real images:

1. weights: N(0, 1) ('gaussian', magic_init's 'elwise'), or from the input patches D of the layer
   (``F.unfold`` with the layer's kernel, stride, padding and dilation; per group for grouped
   convs): centre D, eigendecompose C = D^T D, keep the top n_out eigenpairs (s, V), whiten with
   S = diag(1 / sqrt(s + 1e-3)) (0 where s < 1e-6), then
   - 'pca':    W = S V^T (one whitened principal direction per output channel);
   - 'kmeans': rows of D V S projected onto the unit sphere, k-means with n_out centres K, then
     W = K S V^T, each row divided by the std of its response D W^T;
2. per output channel, with (mu, sigma) the mean and std of the layer's output on the batch:
   W <- W / sigma, b <- beta - mu / sigma. Pre-activations then have mean beta and std 1.

Between-layer (``calibrateGradientRatio``): inject N(0, 1) gradients at the output, measure for
every layer r_k = RMS(dW_k) / RMS(W_k), scale W_k and b_k by sqrt(r_k / geomean(r)), and first
multiply b_k by the change of the mean |input| of layer k (so a network of positively homogeneous
layers -- conv, linear, ReLU, max-pool -- computes the same function up to output scale); repeat
until every r_k is within ``tol`` of the geometric mean, at most ``max_rounds`` times.

Choices where the release is silent or cannot apply (see PROVENANCE.md, "Data-dependent
initialisation"):

* BatchNorm (magic_init lists it as unsupported): the network runs in training mode (batch
  statistics) with Dropout off, and BatchNorm's running statistics are restored afterwards; only
  Conv/Linear weights and biases change, BatchNorm's affine parameters are left as they are. A
  layer without a bias (the one before a BatchNorm) gets W <- W / sigma only; its mean is removed by
  the BatchNorm that follows.
* beta is applied to every layer with a bias, as magic_init does (its command line default 0.1).
  Before a BatchNorm it is removed by the normalisation and before a softmax it cancels, so only
  layers followed by a ReLU see it.
* Patches are gathered directly (``F.unfold``) instead of through magic_init's random Gaussian
  projections of the layer's output (which exist to reuse Caffe's padding logic); 'pca' rows beyond
  the rank of the patch covariance (e.g. 64 filters on 9-dim grey 3x3 patches) are drawn from
  N(0, 1) instead of the release's zero rows, which its division by sigma = 0 turns into NaN.
* k-means: full-batch Lloyd on the device, k-means++ seeding, at most ``kmeans_iters`` iterations,
  instead of sklearn's ``MiniBatchKMeans(batch_size=10 k)`` (same objective, deterministic per seed).
* Transposed convs get N(0, 1) weights in every mode (magic_init's ``ELWISE_LAYERS``).
* The injected gradient is drawn once per call (seeded) and reused in every round, so the ratios are
  a function of the weights and the 1% test is not lost in sampling noise; the release draws anew
  in each round. Layers whose gradient is identically zero (e.g. behind a BatchNorm whose weight is
  initialised to 0, timm's ``zero_init_last``) have ratio 0, are left unscaled and do not enter the
  geometric mean.

No distributed calls: run it on the unwrapped model before DDP wraps it (DDP broadcasts rank 0's
parameters), or on every rank with the same batch and seed.
"""
import contextlib
import math
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['MODES', 'LAYER_TYPES', 'data_dependent_init', 'between_layer_rescale', 'forward_order',
           'whitened_filters', 'kmeans']

MODES = ('kmeans', 'pca', 'gaussian', 'default')
LAYER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)

BETA = 0.1            # magic_init.py main(): '-b/--bias' default 0.1
EIG_ZERO = 1e-6       # initializeWeight: s[s < 1e-6] = 0
EIG_EPS = 1e-3        # initializeWeight: 1 / sqrt(s + 1e-3)
MEM_LIMIT_MB = 500    # main(): '--mem-limit' default 500 (MB of float32 patch data per layer)
TOL = 0.01            # calibrateGradientRatio: stop when every ratio is within 1%
MAX_ROUNDS = 10       # calibrateGradientRatio: for it in range(10)
KMEANS_ITERS = 100    # sklearn MiniBatchKMeans max_iter default
_CHUNK = 1 << 25      # elements per temporary block (unfold, distance matrices)

Forward = Callable[[nn.Module, torch.Tensor], object]
LayerSpec = Optional[Sequence[Union[str, nn.Module]]]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _default_forward(model: nn.Module, x: torch.Tensor):
    return model(x)


@contextlib.contextmanager
def _init_state(model: nn.Module, x: torch.Tensor):
    """Training mode (batch statistics) with Dropout off, float32 (no autocast); restores the modes and
    every BatchNorm buffer (running mean/var, batch count) on exit."""
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
               for b in m.buffers()]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        with torch.autocast(device_type=x.device.type, enabled=False):
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, t in modes.items():
            m.training = t


def _names(model: nn.Module) -> Dict[nn.Module, str]:
    return {m: (n or type(model).__name__) for n, m in model.named_modules()}


def forward_order(model: nn.Module, x: torch.Tensor, forward: Optional[Forward] = None) -> List[nn.Module]:
    """The Conv2d / ConvTranspose2d / Linear modules that ``forward(model, x)`` calls, in order of first call."""
    forward = forward or _default_forward
    order: List[nn.Module] = []
    seen = set()

    def hook(m, _inp):
        if m not in seen:
            seen.add(m)
            order.append(m)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, LAYER_TYPES)]
    try:
        with torch.no_grad():
            forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return order


def _resolve_layers(model, x, forward, layers: LayerSpec) -> List[nn.Module]:
    order = forward_order(model, x, forward)
    if not order:
        raise ValueError(f'{type(model).__name__}: the forward pass calls no Conv2d/ConvTranspose2d/Linear layer')
    if layers is None:
        return order
    chosen = []
    for spec in layers:
        m = model.get_submodule(spec) if isinstance(spec, str) else spec
        if not isinstance(m, LAYER_TYPES):
            raise ValueError(f'layer {spec!r} is a {type(m).__name__}, not Conv2d/ConvTranspose2d/Linear')
        if m not in order:
            raise ValueError(f'layer {spec!r} is not called by the forward pass')
        chosen.append(m)
    return [m for m in order if m in set(chosen)]  # forward order: later layers see initialised inputs


def _layer_input(model, x, forward, layer) -> torch.Tensor:
    """The first input of ``layer`` in ``forward(model, x)`` (the forward pass stops there)."""
    got = []

    def hook(_m, inp):
        got.append(inp[0].detach())
        raise _Stop

    h = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            forward(model, x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise ValueError(f'{type(layer).__name__} was not called by the forward pass')
    return got[0]


def _conv_patches(layer: nn.Conv2d, inp: torch.Tensor, max_rows: int, gen: torch.Generator) -> torch.Tensor:
    """Input patches of a Conv2d, (rows, C_in * kh * kw) in the weight's (C_in, kh, kw) order, at most
    ``max_rows`` (a uniform random subset of the positions, the same number from every image)."""
    pad_mode = 'constant' if layer.padding_mode == 'zeros' else layer.padding_mode
    inp = F.pad(inp, layer._reversed_padding_repeated_twice, mode=pad_mode)
    n = inp.shape[0]
    h_out = (inp.shape[2] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) // layer.stride[0] + 1
    w_out = (inp.shape[3] - layer.dilation[1] * (layer.kernel_size[1] - 1) - 1) // layer.stride[1] + 1
    positions = h_out * w_out
    per_image = min(positions, max(1, max_rows // n))
    dim = inp.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
    step = max(1, _CHUNK // max(1, dim * positions))
    rows = []
    for i in range(0, n, step):
        cols = F.unfold(inp[i:i + step], layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
        if per_image < positions:
            idx = torch.stack([torch.randperm(positions, generator=gen)[:per_image] for _ in range(cols.shape[0])])
            cols = cols.gather(2, idx.to(cols.device)[:, None, :].expand(-1, dim, -1))
        rows.append(cols.transpose(1, 2).reshape(-1, dim))
    return torch.cat(rows)


def _patches(layer, inp, max_rows, gen) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        d = inp.reshape(-1, inp.shape[-1])
        if d.shape[0] > max_rows:
            d = d[torch.randperm(d.shape[0], generator=gen)[:max_rows].to(d.device)]
        return d
    return _conv_patches(layer, inp, max_rows, gen)


def _randn(shape, gen, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def kmeans(x: torch.Tensor, k: int, iters: int = KMEANS_ITERS, generator: Optional[torch.Generator] = None,
           init: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Lloyd's k-means of the rows of ``x`` (R, d) into ``k`` centres (k, d), k-means++ seeding.

    Stops when no assignment changes or after ``iters`` iterations. A centre that loses all its points
    is moved to the point farthest from its centre. ``init`` (k, d) replaces the seeding.
    """
    x = x.float()
    r = x.shape[0]
    if r < k:
        raise ValueError(f'k-means needs at least k={k} rows, got {r}')
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x2 = (x * x).sum(1)

    def sqdist(c):  # (R, k) squared distances, blockwise
        c2 = (c * c).sum(1)
        step = max(1, _CHUNK // max(1, c.shape[0]))
        return torch.cat([(x2[i:i + step, None] - 2 * x[i:i + step] @ c.T + c2[None]).clamp_min_(0)
                          for i in range(0, r, step)])

    if init is not None:
        c = init.to(x).clone()
    else:  # k-means++: each new centre drawn with probability proportional to the squared distance
        idx = [int(torch.randint(r, (1,), generator=gen))]
        d = (x2 - 2 * x @ x[idx[0]] + x2[idx[0]]).clamp_min(0)
        for _ in range(1, k):
            p = d.double().cpu()
            j = int(torch.multinomial(p, 1, generator=gen)) if float(p.sum()) > 0 else \
                int(torch.randint(r, (1,), generator=gen))
            idx.append(j)
            d = torch.minimum(d, (x2 - 2 * x @ x[j] + x2[j]).clamp_min(0))
        c = x[idx].clone()
    assign = None
    for _ in range(iters):
        d = sqdist(c)
        dmin, new = d.min(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None].to(x))
        if empty.any():
            far = dmin.argsort(descending=True)[:int(empty.sum())]
            c[empty] = x[far]
            assign = None  # the moved centres need another assignment step
    return c


def _top_eigenpairs(d: torch.Tensor, keep: int):
    """The ``keep`` largest eigenvalues (ascending) and eigenvectors (dim, keep) of the scatter D^T D.

    With fewer rows than columns (fc6: 7x7x512 inputs) the same pairs come from the R x R Gram matrix
    D D^T = U diag(s) U^T, V = D^T U / sqrt(s), which costs R^2 dim instead of dim^3.
    """
    r, dim = d.shape
    if r >= dim:
        s, v = torch.linalg.eigh(d.T @ d)
        return s[-keep:], v[:, -keep:]
    s, u = torch.linalg.eigh(d @ d.T)
    s, u = s[-keep:], u[:, -keep:]
    root = s.clamp_min(0).sqrt()
    v = (d.T @ u) / torch.where(root > 0, root, torch.ones_like(root))
    v[:, root <= 0] = 0
    return s, v


def whitened_filters(d: torch.Tensor, n_out: int, mode: str, generator: Optional[torch.Generator] = None,
                     kmeans_iters: int = KMEANS_ITERS) -> torch.Tensor:
    """magic_init's ``initializeWeight``: (n_out, dim) filters from the rows of ``d`` (R, dim).

    'pca': the top n_out principal directions of the centred data, each scaled by 1/sqrt(eigenvalue
    + 1e-3) (eigenvalues of the unnormalised scatter D^T D, as released); rows beyond its rank are
    N(0, 1). 'kmeans': k-means (n_out centres) of the whitened rows projected onto the unit sphere,
    mapped back to the input space, each filter divided by the std of its response. Fewer rows than
    n_out: N(0, 1) (the release's fallback).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    r, dim = d.shape
    if mode not in ('pca', 'kmeans'):
        raise ValueError(f"whitened_filters mode must be 'pca' or 'kmeans', got {mode!r}")
    if r < n_out:
        return _randn((n_out, dim), gen, d.device)
    d = d.double()
    d = d - d.mean(0, keepdim=True)
    keep = min(n_out, dim)
    s, v = _top_eigenpairs(d, keep)
    pos = s >= EIG_ZERO
    inv = torch.where(pos, 1.0 / torch.sqrt(s.clamp_min(0) + EIG_EPS), torch.zeros_like(s))
    if mode == 'pca':
        w = inv[:, None] * v.T                      # S V^T, (keep, dim)
        fill = torch.cat([~pos, torch.ones(n_out - keep, dtype=torch.bool, device=d.device)])
        w = torch.cat([w, w.new_zeros(n_out - keep, dim)])
        w[fill] = _randn((int(fill.sum()), dim), gen, d.device, torch.float64)
        return w.float()
    wd = d @ (v * inv[None])                        # whitened data, (R, keep)
    norm = wd.norm(dim=1, keepdim=True)
    wd = torch.where(norm > 0, wd / norm.clamp_min(1e-300), wd)
    centres = kmeans(wd.float(), n_out, kmeans_iters, gen).double()
    w = centres @ (inv[:, None] * v.T)              # K S V^T, (n_out, dim)
    std = (d @ w.T).std(0, unbiased=False)
    w = w / torch.where(std > 0, std, torch.ones_like(std))[:, None]
    return w.float()


def _init_weight(layer, inp, mode, gen, max_rows, kmeans_iters) -> str:
    """Fill layer.weight (bias zeroed) from N(0, 1) or from the input patches; returns the method used."""
    w = layer.weight
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.zero_()
        if mode == 'gaussian' or isinstance(layer, nn.ConvTranspose2d):
            w.copy_(_randn(w.shape, gen, w.device))
            return 'gaussian' if mode == 'gaussian' else 'gaussian (transposed conv: magic_init ELWISE_LAYERS)'
        d = _patches(layer, inp, max_rows, gen)
        groups = getattr(layer, 'groups', 1)
        n_out, per_group = w.shape[0] // groups, d.shape[1] // groups
        fallback = d.shape[0] < n_out
        filters = [whitened_filters(d[:, g * per_group:(g + 1) * per_group], n_out, mode, gen, kmeans_iters)
                   for g in range(groups)]
        w.copy_(torch.cat(filters).reshape(w.shape).to(w.dtype))
        return f'gaussian ({d.shape[0]} patches < {n_out} filters)' if fallback else mode


def _out_channel_dim(layer) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _channel_stats(layer, out: torch.Tensor):
    """Per output channel mean and std (population) of a layer's output."""
    dim = _out_channel_dim(layer) % out.dim()
    flat = out.detach().float().transpose(0, dim).reshape(out.shape[dim], -1)
    return flat.mean(1), flat.std(1, unbiased=False)


def _scale_out_channels(layer, factor: torch.Tensor):
    """Multiply every output channel's weights by ``factor`` (n_out,)."""
    w = layer.weight
    if isinstance(layer, nn.ConvTranspose2d):   # (C_in, C_out / G, kh, kw)
        g = layer.groups
        view = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        view.mul_(factor.view(g, 1, w.shape[1], *([1] * (w.dim() - 2))).to(w.dtype))
    else:
        w.mul_(factor.view(-1, *([1] * (w.dim() - 1))).to(w.dtype))


def _normalise(layer, inp, beta) -> int:
    """W <- W / sigma, b <- beta - mu / sigma per output channel on this input; returns the number of
    channels with sigma == 0 (left unscaled, b = beta - mu)."""
    with torch.no_grad():
        mu, sigma = _channel_stats(layer, layer(inp))
        dead = sigma <= 1e-12
        sigma = torch.where(dead, torch.ones_like(sigma), sigma)
        _scale_out_channels(layer, 1.0 / sigma)
        if layer.bias is not None:
            layer.bias.copy_((beta - mu / sigma).to(layer.bias.dtype))
    return int(dead.sum())


def _preactivation_stats(model, x, forward, layers) -> Dict[nn.Module, tuple]:
    """Per-channel (mean, std) of every layer's output in one forward pass."""
    stats = {}

    def hook(m, _inp, out):
        if m not in stats:
            stats[m] = _channel_stats(m, out)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return stats


def _output_tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def _gradient_ratios(model, x, forward, layers, noise_seed) -> tuple:
    """(ratios r_k = RMS(dW_k)/RMS(W_k), mean |input| per layer) under N(0, 1) output gradients."""
    in_scale = {}

    def hook(m, inp):
        if m not in in_scale:
            in_scale[m] = float(inp[0].detach().abs().float().mean())

    weights = [m.weight for m in layers]
    flags = [w.requires_grad for w in weights]
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            outs = [t for t in _output_tensors(forward(model, x)) if t.requires_grad]
            if not outs:
                raise ValueError('the forward pass returned no tensor that depends on the weights')
            gen = torch.Generator().manual_seed(noise_seed)
            noise = [_randn(t.shape, gen, t.device, t.dtype) for t in outs]
            grads = torch.autograd.grad(outs, weights, noise, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    ratios = []
    for w, g in zip(weights, grads):
        rms_w = float(w.detach().float().pow(2).mean().sqrt())
        rms_g = 0.0 if g is None else float(g.float().pow(2).mean().sqrt())
        ratios.append(rms_g / rms_w if rms_w > 0 else math.inf)
    return ratios, in_scale


def _apply_scales(model, x, forward, layers, scales, in_scale):
    """One forward pass that, layer by layer, first multiplies b_k by the change of the mean |input| of
    layer k (magic_init's ``adj``), then W_k and b_k by ``scales[k]``."""
    todo = dict(zip(layers, scales))

    def hook(m, inp):
        s = todo.pop(m, None)
        if s is None:
            return
        if m.bias is not None:
            before = in_scale[m]
            now = float(inp[0].detach().abs().float().mean())
            m.bias.mul_((now / before if before > 0 else 1.0) * s)
        m.weight.mul_(s)

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            forward(model, x)
    finally:
        for h in handles:
            h.remove()


def _rescale(model, x, forward, layers, tol, max_rounds, seed) -> dict:
    history, rounds, converged = [], 0, False
    while True:
        ratios, in_scale = _gradient_ratios(model, x, forward, layers, seed)
        history.append(ratios)
        live = [r for r in ratios if 0 < r < math.inf]
        if not live:
            raise ValueError('between-layer rescaling: no layer receives a gradient from the output')
        gm = math.exp(sum(math.log(r) for r in live) / len(live))
        if all(abs(r / gm - 1) < tol for r in live):
            converged = True
            break
        if rounds == max_rounds:
            break
        scales = [math.sqrt(r / gm) if 0 < r < math.inf else 1.0 for r in ratios]
        _apply_scales(model, x, forward, layers, scales, in_scale)
        rounds += 1
    return dict(history=history, rounds=rounds, converged=converged)


def _check_common(model, x, tol=TOL, max_rounds=MAX_ROUNDS):
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be an nn.Module, got {type(model).__name__}')
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'x must be a tensor (a batch of inputs), got {type(x).__name__}')
    if not tol > 0:
        raise ValueError(f'tol must be > 0, got {tol}')
    if int(max_rounds) != max_rounds or max_rounds < 0:
        raise ValueError(f'max_rounds must be an integer >= 0, got {max_rounds}')


def between_layer_rescale(model: nn.Module, x: torch.Tensor, forward: Optional[Forward] = None,
                          layers: LayerSpec = None, tol: float = TOL, max_rounds: int = MAX_ROUNDS,
                          seed: int = 0) -> List[float]:
    """Equalise r_k = RMS(dW_k) / RMS(W_k) across layers (magic_init ``calibrateGradientRatio``).

    Args:
        model: the network (unwrapped, not DDP); changed in place.
        x: the batch the forward pass runs on.
        forward: ``forward(model, x)`` -> output tensor (or a tuple/list/dict of tensors); default
            ``model(x)``. N(0, 1) gradients (drawn once from ``seed``) are injected at every output.
        layers: Conv2d/ConvTranspose2d/Linear modules or their names; default every one the forward
            pass calls.
        tol: stop when |r_k / geomean(r) - 1| < tol for every layer (1%).
        max_rounds: at most this many rescaling rounds (10).
    Returns:
        the ratios r_k after the last round, in forward order (0.0 for a layer that gets no gradient).
    """
    _check_common(model, x, tol, max_rounds)
    forward = forward or _default_forward
    with _init_state(model, x):
        order = _resolve_layers(model, x, forward, layers)
        return _rescale(model, x, forward, order, tol, max_rounds, seed)['history'][-1]


def data_dependent_init(model: nn.Module, x: torch.Tensor, mode: str = 'kmeans', forward: Optional[Forward] = None,
                        rescale: bool = True, layers: LayerSpec = None, *, beta: float = BETA,
                        mem_limit_mb: float = MEM_LIMIT_MB, kmeans_iters: int = KMEANS_ITERS,
                        tol: float = TOL, max_rounds: int = MAX_ROUNDS, seed: int = 0) -> dict:
    """Kraehenbuehl et al. data-dependent initialisation of every Conv2d/ConvTranspose2d/Linear.

    Args:
        model: the network (unwrapped); changed in place. Only Conv/Linear weights and biases change.
        x: a batch of real inputs (magic_init: 10 batches of 16 images).
        mode: 'kmeans' | 'pca' | 'gaussian' (within-layer weights), or 'default' (do nothing: keep
            PyTorch's initialisation).
        forward: ``forward(model, x)``, default ``model(x)`` (e.g. pass sampled points to a hypercolumn net).
        rescale: run ``between_layer_rescale`` after the within-layer step.
        layers: modules or names to initialise (default: every Conv2d/ConvTranspose2d/Linear the forward
            pass calls); they are processed in forward order.
        beta: the pre-activation mean the biases give (magic_init's ``-b``, 0.1).
        mem_limit_mb: float32 patch data per layer (magic_init's ``--mem-limit``, 500 MB); a random
            subset of patch positions beyond it.
        kmeans_iters, tol, max_rounds, seed: k-means iterations; rescaling tolerance and rounds; the seed
            of every random draw.
    Returns:
        {'mode', 'beta', 'rounds', 'converged', 'layers': {name: {'init', 'mean', 'std', 'dead_channels',
        'ratios'}}}: 'mean'/'std' average the per-channel mean/std of the layer's output on ``x`` after the
        within-layer step; 'ratios' the layer's r_k measured before each rescaling round and after the last.
    """
    if mode not in MODES:
        raise ValueError(f'init mode must be one of {MODES}, got {mode!r}')
    _check_common(model, x, tol, max_rounds)
    report = dict(mode=mode, beta=beta, rounds=0, converged=None, layers={})
    if mode == 'default':
        return report
    forward = forward or _default_forward
    gen = torch.Generator().manual_seed(seed)
    names = _names(model)
    with _init_state(model, x):
        order = _resolve_layers(model, x, forward, layers)
        for layer in order:
            inp = _layer_input(model, x, forward, layer)
            dim = layer.weight[0].numel() if not isinstance(layer, nn.ConvTranspose2d) else 1
            max_rows = max(1, int(mem_limit_mb * 2 ** 20 / 4 / dim))
            how = _init_weight(layer, inp, mode, gen, max_rows, kmeans_iters)
            dead = _normalise(layer, inp, beta)
            if dead:
                warnings.warn(f'data_dependent_init: {names[layer]}: {dead} output channel(s) constant on the '
                              f'init batch (left unscaled)')
            report['layers'][names[layer]] = dict(init=how, dead_channels=dead)
            del inp
        for layer, (mu, sd) in _preactivation_stats(model, x, forward, order).items():
            report['layers'][names[layer]].update(mean=float(mu.mean()), std=float(sd.mean()))
        if rescale:
            res = _rescale(model, x, forward, order, tol, max_rounds, seed)
            report.update(rounds=res['rounds'], converged=res['converged'])
            for i, layer in enumerate(order):
                report['layers'][names[layer]]['ratios'] = [h[i] for h in res['history']]
    return report
