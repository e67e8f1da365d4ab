"""Zhang et al. colorization network (VGG-style, dilated).

Paper: R. Zhang, P. Isola, A. A. Efros, "Colorful Image Colorization", ECCV 2016.
Layer for layer as in the official release, richzhang/colorization ``colorizers/eccv16.py``
(``ECCVGenerator``): eight blocks ``model1`` .. ``model8``; blocks 1-7 end with ReLU then
BatchNorm, blocks 5-6 use dilation 2, block 8 upsamples 2x with a transposed conv and ends with the
1x1 conv to the 313 ab-bin logits (``model8.6``). The output is at 1/4 input resolution.

Here ``modelN`` is called ``convN`` (so that tap names are block names), the last 1x1 conv of
``model8`` is the classifier ``head`` and ``model8.0-5`` form ``conv8`` (post-ReLU, 256 channels).
The official ``model_out`` (a fixed 1x1 conv holding the 313 ab bin centres, applied to the softmax)
is dropped: decoding logits to ab is ``pretext.encoding.annealed_mean``'s job.
"""
from typing import Dict

import torch
import torch.nn as nn

from . import register_model

__all__ = ['ZhangVGG', 'convert_eccv16_state_dict', 'load_eccv16_state_dict']

from ..color import L_CENT, L_NORM  # noqa: E402 - the constants live in one place

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
_REDUCTION = {'conv1': 2, 'conv2': 4, 'conv3': 8, 'conv4': 8, 'conv5': 8, 'conv6': 8, 'conv7': 8, 'conv8': 4}


def _block(convs, norm: bool = True) -> nn.Sequential:
    layers = []
    for cin, cout, stride, dil in convs:
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=dil, dilation=dil), nn.ReLU(inplace=True)]
    if norm:
        layers.append(nn.BatchNorm2d(convs[-1][1]))
    return nn.Sequential(*layers)


class ZhangVGG(nn.Module):
    """ECCV16 colorization network: L (B,1,H,W) in [0,100] -> logits (B, out_dim, H/4, W/4)."""
    supports_points = False

    def __init__(self, out_dim: int = 313):
        super().__init__()
        for name, convs in _CFG.items():
            self.add_module(name, _block(convs))
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
        x = (L - L_CENT) / L_NORM
        for n in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'conv6', 'conv7', 'conv8'):
            x = getattr(self, n)(x)
        return x

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def forward(self, L: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(L))


def convert_eccv16_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map an official ``ECCVGenerator`` state dict onto ``ZhangVGG`` keys.

    ``model{1..7}.*`` -> ``conv{1..7}.*``, ``model8.{0..5}.*`` -> ``conv8.*``, ``model8.6.*`` ->
    ``head.*``; ``model_out.weight`` (the fixed softmax->ab projection) is dropped. Checkpoints saved
    before PyTorch 0.4 lack BatchNorm ``num_batches_tracked``; it is filled with 0 (only used when
    ``momentum=None``). Any other key is passed through unchanged so the strict load reports it.
    """
    out = {}
    for k, v in sd.items():
        if k == 'model_out.weight':
            continue
        if k.startswith('model8.6.'):
            k = 'head.' + k[len('model8.6.'):]
        elif k.split('.')[0] in _OFFICIAL_BLOCKS:
            k = 'conv' + k[len('model'):]
        out[k] = v
    for k in list(out):
        if k.endswith('.running_mean'):
            nbt = k[:-len('running_mean')] + 'num_batches_tracked'
            out.setdefault(nbt, torch.tensor(0, dtype=torch.long))
    return out


def load_eccv16_state_dict(model: ZhangVGG, sd: Dict[str, torch.Tensor]) -> ZhangVGG:
    """Convert an official eccv16 state dict and load it into ``model`` (returned).

    Raises KeyError listing the converted keys that are missing and unexpected, if any.
    """
    new_sd = convert_eccv16_state_dict(sd)
    own = model.state_dict()
    missing = sorted(set(own) - set(new_sd))
    unexpected = sorted(set(new_sd) - set(own))
    if missing or unexpected:
        raise KeyError(f'eccv16 conversion mismatch: missing={missing} unexpected={unexpected}')
    model.load_state_dict(new_sd, strict=True)
    return model


@register_model
def zhang_vgg(out_dim: int = 313, **kwargs) -> ZhangVGG:
    """Zhang et al. ECCV16 colorization net, 313-bin logits at 1/4 resolution."""
    return ZhangVGG(out_dim=out_dim, **kwargs)
