"""Zhang et al. colorization network (VGG-style, dilated).

Paper: R. Zhang, P. Isola, A. A. Efros, "Colorful Image Colorization", ECCV 2016.
Layer for layer as released: richzhang/colorization ``models/colorization_train_val_v2.prototxt`` (training) and
its PyTorch port ``colorizers/eccv16.py`` (``ECCVGenerator``): eight blocks ``model1`` .. ``model8``; blocks 1-7 end
with ReLU then BatchNorm, blocks 5-6 use dilation 2, block 8 upsamples 2x with a transposed conv and ends with the
1x1 conv to the 313 ab-bin logits (``conv8_313``, ``model8.6``). The output is at 1/4 input resolution, the grid on
which the release subsamples its ab targets (``data_ab_ss``, stride 4).

As in the training prototxt, the network sees L - 50 (``data_l_meansub``; no division by 100) and its BatchNorm
layers have no affine parameters (Caffe ``BatchNorm`` with no ``Scale``). The PyTorch port instead feeds
(L - 50) / 100 and has affine BatchNorm; :func:`convert_eccv16_state_dict` maps its weights onto this layout
(``bn_affine=True``).

Here ``modelN`` is called ``convN`` (so that tap names are block names), the last 1x1 conv of
``model8`` is the classifier ``head`` and ``model8.0-5`` form ``conv8`` (post-ReLU, 256 channels).
The official ``model_out`` (a fixed 1x1 conv holding the 313 ab bin centres / 110, applied to the softmax)
is dropped: decoding logits to ab is the target's job (``pretext.targets``); :func:`eccv16_bins` reads the
bin centres it holds.
"""
from typing import Dict

import torch
import torch.nn as nn

from . import register_model

__all__ = ['ZhangVGG', 'convert_eccv16_state_dict', 'load_eccv16_state_dict', 'eccv16_bins',
           'ECCV16_LOGIT_SCALE', 'ECCV16_TEMPERATURE']

from ..color import AB_SCALE, L_CENT  # noqa: E402 - the constants live in one place

# (in, out, stride, dilation) of each 3x3 conv per block; every conv is followed by ReLU,
# blocks 1-7 end with BatchNorm (official order: conv, ReLU, ..., BN).
_CFG = {
    'conv1': [(1, 64, 1, 1), (64, 64, 2, 1)],
    'conv2': [(64, 128, 1, 1), (128, 128, 2, 1)],
    'conv3': [(128, 256, 1, 1), (256, 256, 1, 1), (256, 256, 2, 1)],
    'conv4': [(256, 512, 1, 1), (512, 512, 1, 1), (512, 512, 1, 1)],
    'conv5': [(512, 512, 1, 2)] * 3,
    'conv6': [(512, 512, 1, 2)] * 3,
    'conv7': [(512, 512, 1, 1)] * 3,
}
_OFFICIAL_BLOCKS = tuple(f'model{i}' for i in range(1, 9))
#: the deploy net scales the logits before its softmax (``colorization_deploy_v2.prototxt``, ``conv8_313_rh``)
ECCV16_LOGIT_SCALE = 2.606
#: the annealed-mean temperature of the official forward, relative to the trained logits
ECCV16_TEMPERATURE = 1.0 / ECCV16_LOGIT_SCALE
_PORT_L_NORM = 100.0  # the port feeds (L - 50) / 100 (``colorizers/base_color.py``)
_REDUCTION = {'conv1': 2, 'conv2': 4, 'conv3': 8, 'conv4': 8, 'conv5': 8, 'conv6': 8, 'conv7': 8, 'conv8': 4}


def _block(convs, bn_affine: bool) -> nn.Sequential:
    layers = []
    for cin, cout, stride, dil in convs:
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=dil, dilation=dil), nn.ReLU(inplace=True)]
    layers.append(nn.BatchNorm2d(convs[-1][1], affine=bn_affine))
    return nn.Sequential(*layers)


class ZhangVGG(nn.Module):
    """ECCV16 colorization network: L (B,1,H,W) in [0,100] -> logits (B, out_dim, H/4, W/4).

    Args:
        out_dim: classifier width (313 ab bins).
        bn_affine: BatchNorm with learnt scale and shift (False as released in the training prototxt; True for the
            PyTorch port's weights).
        l_norm: the network sees (L - 50) / l_norm; 1 as released in the training prototxt (the port uses 100).
    """
    supports_points = False
    target_stride = 4  #: the release subsamples ab with stride 4 (``data_ab_ss``) for this net

    def __init__(self, out_dim: int = 313, bn_affine: bool = False, l_norm: float = 1.0):
        super().__init__()
        if not l_norm > 0:
            raise ValueError(f'l_norm must be > 0, got {l_norm}')
        self.l_norm = float(l_norm)
        for name, convs in _CFG.items():
            self.add_module(name, _block(convs, bn_affine))
        # official model8 indices 0..5; index 6 (the 1x1 classifier) is `head`
        self.conv8 = nn.Sequential(
            nn.ConvTranspose2d(512, 256, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.out_dim = out_dim
        self.head = nn.Conv2d(256, out_dim, 1)
        chs = {n: c[-1][1] for n, c in _CFG.items()}
        chs['conv8'] = 256
        self.feature_info = [dict(num_chs=chs[n], reduction=_REDUCTION[n], module=n) for n in chs]

    def reset_classifier(self, out_dim: int):
        self.out_dim = out_dim
        self.head = nn.Conv2d(256, out_dim, 1)

    def forward_features(self, L: torch.Tensor) -> torch.Tensor:
        x = (L - L_CENT) / self.l_norm
        for n in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'conv6', 'conv7', 'conv8'):
            x = getattr(self, n)(x)
        return x

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, L: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(L))


def convert_eccv16_state_dict(sd: Dict[str, torch.Tensor], l_norm: float = 1.0) -> Dict[str, torch.Tensor]:
    """Map an official ``ECCVGenerator`` state dict onto ``ZhangVGG(bn_affine=True, l_norm=l_norm)`` keys and units.

    ``model{1..7}.*`` -> ``conv{1..7}.*``, ``model8.{0..5}.*`` -> ``conv8.*``, ``model8.6.*`` -> ``head.*``;
    ``model_out.weight`` (the fixed softmax->ab projection) is dropped (see :func:`eccv16_bins`).

    Two changes of units, so that imported weights mean what crosschannel-trained ones mean:

    * conv1's weight is scaled by ``l_norm / 100``: the port feeds (L - 50) / 100, ``ZhangVGG`` (L - 50) / l_norm.
    * the head (weight and bias) is divided by ``ECCV16_LOGIT_SCALE`` (2.606). The Caffe deploy net multiplies the
      trained ``conv8_313`` logits by 2.606 (``conv8_313_rh``) before its softmax; the port has no such layer, takes
      a plain softmax of ``model8.6``'s output and (by its published outputs, which are the saturated Caffe ones)
      holds that product in ``model8.6``. Dividing it out gives back the logits the cross-entropy trained, on which
      the annealed mean at T = 1 / 2.606 (``ECCV16_TEMPERATURE``) is exactly the official forward.

    Checkpoints saved before PyTorch 0.4 lack BatchNorm ``num_batches_tracked``; it is filled with 0 (only used when
    ``momentum=None``). Any other key is passed through unchanged so the strict load reports it.
    """
    out = {}
    for k, v in sd.items():
        if k == 'model_out.weight':
            continue
        if k.startswith('model8.6.'):
            k = 'head.' + k[len('model8.6.'):]
            v = v / ECCV16_LOGIT_SCALE
        elif k.split('.')[0] in _OFFICIAL_BLOCKS:
            k = 'conv' + k[len('model'):]
        if k == 'conv1.0.weight':
            v = v * (l_norm / _PORT_L_NORM)
        out[k] = v
    for k in list(out):
        if k.endswith('.running_mean'):
            nbt = k[:-len('running_mean')] + 'num_batches_tracked'
            out.setdefault(nbt, torch.tensor(0, dtype=torch.long))
    return out


def eccv16_bins(sd: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The (313, 2) ab bin centres an official state dict decodes with: ``model_out.weight`` (2, 313, 1, 1) holds
    them divided by 110 (the port multiplies its output by ``ab_norm`` = 110)."""
    w = sd['model_out.weight']
    return (w.reshape(w.shape[0], w.shape[1]).t().float() * AB_SCALE).contiguous()


def load_eccv16_state_dict(model: ZhangVGG, sd: Dict[str, torch.Tensor]) -> ZhangVGG:
    """Convert an official eccv16 state dict and load it into ``model`` (built with ``bn_affine=True``; returned).

    Raises KeyError listing the converted keys that are missing and unexpected, if any.
    """
    new_sd = convert_eccv16_state_dict(sd, model.l_norm)
    own = model.state_dict()
    missing = sorted(set(own) - set(new_sd))
    unexpected = sorted(set(new_sd) - set(own))
    if missing or unexpected:
        raise KeyError(f'eccv16 conversion mismatch: missing={missing} unexpected={unexpected}')
    model.load_state_dict(new_sd, strict=True)
    return model


@register_model
def zhang_vgg(out_dim: int = 313, **kwargs) -> ZhangVGG:
    """Zhang et al. ECCV16 colorization net as released, 313-bin logits at 1/4 resolution."""
    return ZhangVGG(out_dim=out_dim, **kwargs)
