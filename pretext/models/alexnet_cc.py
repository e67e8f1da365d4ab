"""AlexNet cross-channel encoder for colorization pretext training.

Paper: R. Zhang, P. Isola, A. A. Efros, "Colorful Image Colorization", ECCV 2016, Sec. 3.2
(self-supervised representation learning: AlexNet on the L channel predicting ab, then transfer);
the same cross-channel AlexNet is used in Zhang et al., "Split-Brain Autoencoders", CVPR 2017.

Geometry as released (richzhang/colorization ``train_alexnet/train_val.prototxt``): the network sees L - 50
(``data_l``: a fixed 1x1 conv, weight 1, bias -50; no division by 100), Caffe AlexNet without LRN, a BatchNorm
without affine parameters after every conv (Caffe ``BatchNorm`` with no ``Scale``), 2 groups in conv2/4/5:
conv1 96 k11 s4 p5 -> pool1 3/2 p1 -> conv2 256 k5 p2 g2 -> pool2 3/2 p1 -> conv3 384 k3 p1 ->
conv4 384 k3 p1 g2 -> conv5 256 k3 p1 g2 -> pool5 3/1 p1 -> fc6 (conv k6, dilation 2, p5) -> fc7 (1x1) -> fc8 (1x1).
Caffe rounds pooling output sizes up (``ceil_mode``): 180 px gives 12x12 logits. The release subsamples its ab
targets with stride 8 (``data_ab_ss``: 23x23 at 180 px) and resizes the logits bilinearly to that grid (its
``Resize`` layer) before the loss; that is the trainer's job here (``target_stride`` below).

Pre-text training is fully convolutional: pool5 with stride 1 keeps the conv5 resolution (1/16) so that fc6 and
the classifier see a dense map; fc6 is a 6x6 kernel with dilation 2 (effective extent 11, the receptive field of a
6x6 kernel on the stride-2 pool5 of standard AlexNet). ``geometry='standard'`` gives conv1 pad 0 and unpadded
pools (crosschannel's earlier geometry). For transfer, ``export_alexnet_transfer`` folds BatchNorm (and the input
scale) into conv1..conv5 and restores the standard geometry (conv1 pad 0, pools unpadded, pool5 3/2): 227x227
input -> 6x6x256 pool5, as the release's transfer nets do (``train_alexnet/train_val_nobn_rs.prototxt``, whose
weights are those of the trained net with BatchNorm absorbed, ``train_alexnet/postprocess_model.sh``).
"""
from typing import Optional

import torch
import torch.nn as nn

from . import register_model

__all__ = ['AlexNetCC', 'AlexNetTransfer', 'export_alexnet_transfer', 'fold_conv_bn']

from ..color import L_CENT, L_NORM  # noqa: E402 - the constants live in one place

# name: (out_chs, kernel, stride, padding, groups); conv1's padding is 5 in the release geometry
_CONVS = {
    'conv1': (96, 11, 4, 0, 1),
    'conv2': (256, 5, 1, 2, 2),
    'conv3': (384, 3, 1, 1, 1),
    'conv4': (384, 3, 1, 1, 2),
    'conv5': (256, 3, 1, 1, 2),
}
_TRUNK = ('conv1', 'pool1', 'conv2', 'pool2', 'conv3', 'conv4', 'conv5', 'pool5', 'fc6', 'fc7')
_GEOMETRIES = ('release', 'standard')


def _conv_bn_relu(cin, cout, k, s=1, p=0, g=1, d=1, norm='bn', bn_affine=False) -> nn.Sequential:
    # norm='none' keeps the module layout (Identity in place of BatchNorm): used where per-sample independence
    # matters, e.g. checking that DDP equals single-process training without SyncBatchNorm. The conv keeps its bias
    # in front of BatchNorm, as the release does (its lr_mult 2 / decay_mult 0 bias blobs).
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g, dilation=d),
        nn.BatchNorm2d(cout, affine=bn_affine) if norm == 'bn' else nn.Identity(),
        nn.ReLU(inplace=True),
    )


class AlexNetCC(nn.Module):
    """Cross-channel AlexNet: L (B,1,H,W) in [0,100] -> logits (B, out_dim, ~H/16, ~W/16) (180 px -> 12x12 and
    227 px -> 15x15 in the release geometry).

    Args:
        out_dim: classifier width (313 ab bins).
        fc_dim: fc6/fc7 width (4096 as released; small values for tests).
        pool5_stride: 1 keeps 1/16 resolution (dense pretext training, as released), 2 gives standard AlexNet.
        fc6_dilation: dilation of the 6x6 fc6 kernel (padding keeps the spatial size).
        norm: 'bn' (as released) or 'none' (no normalisation; BatchNorm-free variant for exactness tests).
        bn_affine: BatchNorm with a learnt scale and shift (False as released: Caffe ``BatchNorm``, no ``Scale``).
        geometry: 'release' (conv1 pad 5, pool1/pool2 pad 1, Caffe's rounding up) or 'standard' (conv1 pad 0,
            unpadded pools, rounding down).
        l_norm: the network sees (L - 50) / l_norm; 1 as released (``data_l`` = L - 50).
    """
    supports_points = False
    target_stride = 8  #: the release subsamples ab with stride 8 (``data_ab_ss``) for this net

    def __init__(self, out_dim: int = 313, fc_dim: int = 4096, pool5_stride: int = 1, fc6_dilation: int = 2,
                 norm: str = 'bn', bn_affine: bool = False, geometry: str = 'release', l_norm: float = 1.0):
        super().__init__()
        if norm not in ('bn', 'none'):
            raise ValueError(f"norm must be 'bn' or 'none', got {norm!r}")
        if geometry not in _GEOMETRIES:
            raise ValueError(f"geometry must be one of {_GEOMETRIES}, got {geometry!r}")
        if not l_norm > 0:
            raise ValueError(f'l_norm must be > 0, got {l_norm}')
        release = geometry == 'release'
        self.geometry, self.l_norm = geometry, float(l_norm)
        cin = 1
        for name, (cout, k, s, p, g) in _CONVS.items():
            p = 5 if (release and name == 'conv1') else p
            self.add_module(name, _conv_bn_relu(cin, cout, k, s, p, g, norm=norm, bn_affine=bn_affine))
            cin = cout
            if name in ('conv1', 'conv2'):
                pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True) if release else nn.MaxPool2d(3, 2)
                self.add_module(name.replace('conv', 'pool'), pool)
        self.pool5 = nn.MaxPool2d(3, pool5_stride, padding=1 if pool5_stride == 1 else 0)
        # 6x6 kernel, dilation d: extent 5d+1, padding 5d/2 keeps size for even 5d (d=2 -> 5)
        self.fc6 = _conv_bn_relu(256, fc_dim, 6, p=(5 * fc6_dilation) // 2, d=fc6_dilation, norm=norm,
                                 bn_affine=bn_affine)
        self.fc7 = _conv_bn_relu(fc_dim, fc_dim, 1, norm=norm, bn_affine=bn_affine)
        self.out_dim = out_dim
        self.fc_dim = fc_dim
        self.head = nn.Conv2d(fc_dim, out_dim, 1)
        r5 = 16 * pool5_stride
        self.feature_info = [
            dict(num_chs=96, reduction=4, module='conv1'),
            dict(num_chs=96, reduction=8, module='pool1'),
            dict(num_chs=256, reduction=8, module='conv2'),
            dict(num_chs=256, reduction=16, module='pool2'),
            dict(num_chs=384, reduction=16, module='conv3'),
            dict(num_chs=384, reduction=16, module='conv4'),
            dict(num_chs=256, reduction=16, module='conv5'),
            dict(num_chs=256, reduction=r5, module='pool5'),
            dict(num_chs=fc_dim, reduction=r5, module='fc6'),
            dict(num_chs=fc_dim, reduction=r5, module='fc7'),
        ]

    def reset_classifier(self, out_dim: int):
        self.out_dim = out_dim
        self.head = nn.Conv2d(self.fc_dim, out_dim, 1)

    def forward_features(self, L: torch.Tensor) -> torch.Tensor:
        x = (L - L_CENT) / self.l_norm
        for n in _TRUNK:
            x = getattr(self, n)(x)
        return x

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, L: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(L))


class AlexNetTransfer(nn.Module):
    """Plain AlexNet conv1..conv5 + pool5 (standard geometry) for transfer, BN folded into the convs.

    Input is the L channel in [0, 100], seen as (L - 50) / 100 (the export folds the pretext net's own input scale
    into conv1). 227x227 -> pool5 6x6. Taps (post-ReLU): conv1..conv5, pool5.
    """
    supports_points = False

    def __init__(self):
        super().__init__()
        cin = 1
        for name, (cout, k, s, p, g) in _CONVS.items():
            self.add_module(name, nn.Sequential(nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g),
                                                nn.ReLU(inplace=True)))
            cin = cout
            if name in ('conv1', 'conv2'):
                self.add_module(name.replace('conv', 'pool'), nn.MaxPool2d(3, 2))
        self.pool5 = nn.MaxPool2d(3, 2)
        red = dict(conv1=4, pool1=8, conv2=8, pool2=16, conv3=16, conv4=16, conv5=16, pool5=32)
        chs = dict(conv1=96, pool1=96, conv2=256, pool2=256, conv3=384, conv4=384, conv5=256, pool5=256)
        self.feature_info = [dict(num_chs=chs[n], reduction=red[n], module=n) for n in red]

    def forward_features(self, L: torch.Tensor) -> torch.Tensor:
        x = (L - L_CENT) / L_NORM
        for n in _TRUNK[:-2]:
            x = getattr(self, n)(x)
        return x

    def forward(self, L: torch.Tensor) -> torch.Tensor:
        return self.forward_features(L)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, bias: Optional[torch.Tensor] = None):
    """Return (weight, bias) of a conv equivalent to ``bn(conv(x))`` with ``bn`` in eval mode (affine or not)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    b0 = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    b = (b0 - bn.running_mean) * scale
    if bn.bias is not None:
        b = b + bn.bias
    return w, b


@torch.no_grad()
def export_alexnet_transfer(model: AlexNetCC) -> AlexNetTransfer:
    """Fold BN of conv1..conv5 (and the input scale) into conv weights/biases; return the standard-geometry AlexNet.

    The weights are the trained ones; only the geometry changes (conv1 pad 0, unpadded pools, pool5 3/2), as in the
    release's transfer nets. The export of a ``geometry='standard'`` net computes exactly that net's conv1..conv5.
    """
    out = AlexNetTransfer().to(next(model.parameters()).device)
    for n in _CONVS:
        conv, bn = getattr(model, n)[0], getattr(model, n)[1]
        w, b = (conv.weight, conv.bias) if isinstance(bn, nn.Identity) else fold_conv_bn(conv, bn)
        if n == 'conv1':  # the export sees (L - 50) / L_NORM, the net (L - 50) / l_norm
            w = w * (L_NORM / model.l_norm)
        getattr(out, n)[0].weight.copy_(w)
        getattr(out, n)[0].bias.copy_(b)
    return out


@register_model
def alexnet_cc(out_dim: int = 313, fc_dim: int = 4096, **kwargs) -> AlexNetCC:
    """Cross-channel AlexNet (Zhang et al. ECCV16) as released, dense 1/16 logits; ``fc_dim`` sets fc6/fc7 width."""
    return AlexNetCC(out_dim=out_dim, fc_dim=fc_dim, **kwargs)
