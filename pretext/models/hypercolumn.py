"""VGG-16 hypercolumn colorizer, as released.

Paper: G. Larsson, M. Maire, G. Shakhnarovich, "Learning Representations for Automatic Colorization",
ECCV 2016 (and "Colorization as a Proxy Task for Visual Understanding", CVPR 2017). Release:
gustavla/autocolorize ``train/train_vgg16.prototxt`` and its ``SparseHypercolumnExtractor`` layer.

Network (``train_vgg16.prototxt``): VGG-16's 13 3x3 convs (64-128-256-512-512), each followed by BatchNorm
without affine parameters (Caffe ``BatchNorm``, lr_mult 0, no ``Scale``) and ReLU, 2x2 max-pools; fc6 a 7x7
conv (pad 3) and fc7 a 1x1 conv, each with BatchNorm, ReLU and Dropout 0.5. The input is the release's grey
level minus its mean 0.4488 (``take_mean``); crosschannel models take L, so the grey is recovered from L
(``color.l_to_grey``; the target feeds the L of the release's grey, see ``pretext.hue_chroma.model_grey_l``).

Hypercolumn (``columns``): for each sampled pixel (y, x), the input ('data'), the 13 convs, fc6 and fc7
(12,417 channels) are read bilinearly at (y / s, x / s) of each map (s = its stride: 1, 1, 1, 2, 2, 4, ...,
32), clamped to [0, size - 1.0001] (``SparseHypercolumnExtractor``, offsets 0). Head: ``colorize_fc1`` 1024
+ ReLU + Dropout 0.5, then the 32 hue and 32 chroma logits (``prediction_h4``, ``prediction_c4``, one layer
here: the two outputs are independent). Training samples P points per image (the trainer), so the dense
hypercolumn tensor (B, 12417, H, W) is never built; dense inference samples every pixel, a chunk of rows at a
time (the release's deploy net approximates this at 1/4 resolution).

Weights start as the release's fillers (xavier, biases 0, ``colorize_fc1`` N(0, 1e-4^2)), or from an ImageNet
VGG-16 (``load_torchvision_vgg16``: torchvision's ``vgg16`` state dict, conv1 summed over RGB for the grey
input) through the builder's ``pretrained`` argument.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model
from ..color import L_CENT, L_NORM, l_to_grey
from ..runtime import UserError

__all__ = ['VGG16Hypercolumn', 'pixel_centre_points', 'load_torchvision_vgg16', 'RELEASE_TAPS', 'DATA_OFFSET']

# stage widths and number of convs of VGG-16 (configuration D)
_VGG16 = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
#: the release's hypercolumn: data, the 13 convs, fc6, fc7 (``columns`` layer of train_vgg16.prototxt)
RELEASE_TAPS = ('data',) + tuple(f'conv{s}_{i}' for s, (_, n) in enumerate(_VGG16, 1) for i in range(1, n + 1)) + \
    ('fc6', 'fc7')
#: the release's input: 0.33333 * sum over B, G, R of (channel - 0.4488) = grey - 0.99999 * 0.4488
DATA_OFFSET = 0.33333 * 3 * 0.4488
BN_MOMENTUM = 1 - 0.999  # Caffe BatchNorm moving_average_fraction default 0.999
FC1_STD = 1e-4  # colorize_fc1 weight_filler gaussian std 0.0001
# torchvision vgg16: conv layer indices in ``features`` and its input normalisation
_TV_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_TV_MEAN = (0.485, 0.456, 0.406)
_TV_STD = (0.229, 0.224, 0.225)


def pixel_centre_points(h: int, w: int, device=None, dtype=torch.float32):
    """Grid-sample coordinates (align_corners=False) of the pixel centres: (ys (h,), xs (w,))."""
    ys = (2 * torch.arange(h, device=device, dtype=dtype) + 1) / h - 1
    xs = (2 * torch.arange(w, device=device, dtype=dtype) + 1) / w - 1
    return ys, xs


def _conv(cin, cout, k, p, bn, dropout=0.0):
    layers = [nn.Conv2d(cin, cout, k, padding=p, bias=True)]
    if bn:
        layers.append(nn.BatchNorm2d(cout, affine=False, momentum=BN_MOMENTUM))
    layers.append(nn.ReLU(inplace=True))
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _xavier_(w: torch.Tensor):
    """Caffe's xavier filler: U(-a, a), a = sqrt(3 / fan_in), fan_in = count / num_output."""
    a = math.sqrt(3.0 / (w.numel() / w.shape[0]))
    nn.init.uniform_(w, -a, a)


class VGG16Hypercolumn(nn.Module):
    """VGG-16 + hypercolumn MLP: L (B,1,H,W) in [0,100] -> logits (B,out_dim,H,W) or (B,out_dim,P,1).

    Args:
        head: 'ab313' (out_dim 313 default) or 'hue_chroma' (out_dim = n_hue + n_chroma, the release; the
            ``hue_chroma`` target asks for it).
        out_dim: output width (must equal n_hue + n_chroma for the hue_chroma head).
        n_hue, n_chroma: histogram sizes of the hue_chroma head (32 each).
        width_mult: scales every trunk width (tests use e.g. 1/8).
        fc_dim: fc6/fc7 width (4096).
        fc6_kernel: fc6 kernel (7, padding 3 keeps the 1/32 map's size).
        bn: BatchNorm (no affine) after every conv, as released for training from scratch; ImageNet VGG-16 has none.
        dropout: after fc6, fc7 and the head's hidden layer (0.5).
        taps: maps sampled into the hypercolumn ('data' is the normalised input).
        hidden: MLP hidden width (``colorize_fc1``: 1024).
        input_norm: 'release_grey' (grey level from L, minus the release's mean) or 'lab' ((L - 50) / 100).
        sampling: 'release' (pixel (y, x) read at (y / s, x / s), clamped) or 'centre' (pixel centres aligned:
            align_corners=False bilinear, border clamped).
        init: 'release' (Caffe xavier / gaussian fillers of train_vgg16.prototxt) or 'torch' (PyTorch defaults).
        dense_chunk: pixels per image per chunk in dense (points=None) inference.
    """
    supports_points = True

    def __init__(self, head: str = 'ab313', out_dim: Optional[int] = None, n_hue: int = 32, n_chroma: int = 32,
                 width_mult: float = 1.0, fc_dim: int = 4096, fc6_kernel: int = 7, bn: bool = True,
                 dropout: float = 0.5, taps: Sequence[str] = RELEASE_TAPS, hidden: int = 1024,
                 input_norm: str = 'release_grey', sampling: str = 'release', init: str = 'release',
                 dense_chunk: int = 16384):
        super().__init__()
        if head == 'ab313':
            out_dim = 313 if out_dim is None else out_dim
        elif head == 'hue_chroma':
            if out_dim is not None and out_dim != n_hue + n_chroma:
                raise ValueError(f'hue_chroma head has out_dim = n_hue + n_chroma = {n_hue + n_chroma}')
            out_dim = n_hue + n_chroma
        else:
            raise ValueError(f"head must be 'hue_chroma' or 'ab313', got {head!r}")
        for key, value, allowed in (('input_norm', input_norm, ('release_grey', 'lab')),
                                    ('sampling', sampling, ('release', 'centre')), ('init', init, ('release', 'torch'))):
            if value not in allowed:
                raise ValueError(f'{key} must be one of {allowed}, got {value!r}')
        self.head_type, self.n_hue, self.n_chroma = head, n_hue, n_chroma
        self.input_norm, self.sampling, self.dense_chunk = input_norm, sampling, dense_chunk

        self.feature_info = []
        self.trunk_order = []
        cin, reduction = 1, 1
        chs, red = {'data': 1}, {'data': 1}
        for s, (width, n) in enumerate(_VGG16, start=1):
            cout = max(1, int(round(width * width_mult)))
            for i in range(1, n + 1):
                name = f'conv{s}_{i}'
                self.add_module(name, _conv(cin, cout, 3, 1, bn))
                self.feature_info.append(dict(num_chs=cout, reduction=reduction, module=name))
                self.trunk_order.append(name)
                cin = cout
            self.add_module(f'pool{s}', nn.MaxPool2d(2, 2))
            self.trunk_order.append(f'pool{s}')
            reduction *= 2
        self.fc6 = _conv(cin, fc_dim, fc6_kernel, fc6_kernel // 2, bn, dropout)
        self.fc7 = _conv(fc_dim, fc_dim, 1, 0, bn, dropout)
        self.trunk_order += ['fc6', 'fc7']
        self.feature_info += [dict(num_chs=fc_dim, reduction=reduction, module='fc6'),
                              dict(num_chs=fc_dim, reduction=reduction, module='fc7')]
        for f in self.feature_info:
            chs[f['module']], red[f['module']] = f['num_chs'], f['reduction']

        unknown = [t for t in taps if t not in chs]
        if unknown:
            raise ValueError(f'unknown hypercolumn taps {unknown}; available: {list(chs)}')
        self.taps = tuple(taps)
        self.tap_stride = {t: red[t] for t in self.taps}  # the release's per-layer ``scale``
        self.hypercolumn_dim = sum(chs[t] for t in self.taps)
        self.hidden, self.fc_dim, self.out_dim = hidden, fc_dim, out_dim
        # 1x1 convs on (B, C, P, 1) or (B, C, rows, W) == per-point InnerProduct layers
        self.head = nn.Sequential(nn.Conv2d(self.hypercolumn_dim, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Conv2d(hidden, out_dim, 1))
        if init == 'release':
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The release's fillers: xavier convs and predictions, zero biases, ``colorize_fc1`` N(0, 1e-4^2)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _xavier_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head[0].weight, 0.0, FC1_STD)

    def reset_classifier(self, out_dim: int):
        self.out_dim = out_dim
        self.head[-1] = nn.Conv2d(self.hidden, out_dim, 1)

    def normalise_input(self, L: torch.Tensor) -> torch.Tensor:
        """The network's input (the release's ``data``) from L (B, 1, H, W) in [0, 100]."""
        if self.input_norm == 'lab':
            return (L - L_CENT) / L_NORM
        return l_to_grey(L) - DATA_OFFSET

    def _trunk(self, L: torch.Tensor, keep: Sequence[str]) -> Dict[str, torch.Tensor]:
        x = self.normalise_input(L)
        out = {'data': x} if 'data' in keep else {}
        deep = [k for k in keep if k != 'data']
        if not deep:
            return out
        last = max(self.trunk_order.index(k) for k in deep)
        for name in self.trunk_order[:last + 1]:
            x = getattr(self, name)(x)
            if name in keep:
                out[name] = x
        return out

    def forward_features(self, L: torch.Tensor) -> torch.Tensor:
        """Deepest trunk map (fc7), (B, fc_dim, H/32, W/32)."""
        return self._trunk(L, ('fc7',))['fc7']

    def forward_hypercolumn_taps(self, L: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The maps that make up the hypercolumn, name -> (B, C, h, w)."""
        return self._trunk(L, self.taps)

    def _sample(self, taps: Dict[str, torch.Tensor], py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
        """Hypercolumns at input pixel coordinates py, px (B, h', w') -> (B, sum C, h', w')."""
        cols = []
        for t in self.taps:
            fmap = taps[t]
            h, w = fmap.shape[-2:]
            if self.sampling == 'release':
                # SparseHypercolumnExtractor: (y - offset) / scale, clamped to [0, size - 1.0001], bilinear
                ly = (py / self.tap_stride[t]).clamp(min=0).clamp(max=max(h - 1.0001, 0))
                lx = (px / self.tap_stride[t]).clamp(min=0).clamp(max=max(w - 1.0001, 0))
                gy = 2 * ly / (h - 1) - 1 if h > 1 else torch.zeros_like(ly)
                gx = 2 * lx / (w - 1) - 1 if w > 1 else torch.zeros_like(lx)
                align = True
            else:  # pixel centres aligned across scales (align_corners=False); 'border' == edge clamping
                gy = (2 * py + 1) / (h * self.tap_stride[t]) - 1
                gx = (2 * px + 1) / (w * self.tap_stride[t]) - 1
                align = False
            grid = torch.stack([gx, gy], dim=-1).to(fmap.dtype)
            cols.append(F.grid_sample(fmap, grid, mode='bilinear', padding_mode='border', align_corners=align))
        return torch.cat(cols, dim=1)

    def forward_head(self, taps: Dict[str, torch.Tensor], points: Optional[torch.Tensor] = None,
                     out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Hypercolumn MLP on the tap dict from ``forward_hypercolumn_taps``.

        points (B, P, 2) (x, y in [-1, 1], align_corners=False: pixel (i, j) of an (H, W) input is
        ((2j + 1) / W - 1, (2i + 1) / H - 1)) -> (B, out_dim, P, 1); points None -> dense (B, out_dim, H, W), in
        row chunks. ``out_size`` is the input's (H, W).
        """
        h, w = out_size
        if points is not None:
            if points.dim() != 3 or points.shape[-1] != 2:
                raise ValueError(f'points must be (B, P, 2), got {tuple(points.shape)}')
            px = ((points[..., 0].float() + 1) * w - 1) / 2  # input pixel coordinates
            py = ((points[..., 1].float() + 1) * h - 1) / 2
            return self.head(self._sample(taps, py.unsqueeze(-1), px.unsqueeze(-1)))
        ref = taps[self.taps[0]]
        b = ref.shape[0]
        ys = torch.arange(h, device=ref.device, dtype=torch.float32)
        xs = torch.arange(w, device=ref.device, dtype=torch.float32)
        rows = max(1, self.dense_chunk // w)
        out = []
        for y0 in range(0, h, rows):
            py, px = torch.broadcast_tensors(ys[y0:y0 + rows, None], xs[None, :])
            out.append(self.head(self._sample(taps, py.expand(b, -1, -1), px.expand(b, -1, -1))))
        return torch.cat(out, dim=2)

    def forward(self, L: torch.Tensor, points: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_hypercolumn_taps(L), points, out_size=L.shape[-2:])


def _tv_error(path, problem: str) -> UserError:
    return UserError(f'{path}: not a torchvision vgg16 state dict ({problem})')


@torch.no_grad()
def load_torchvision_vgg16(model: VGG16Hypercolumn, path) -> VGG16Hypercolumn:
    """Load torchvision's ImageNet ``vgg16`` weights (a saved ``state_dict``) into the trunk of ``model``.

    conv1_1 sees one grey channel: its weights are summed over R, G, B after folding torchvision's input
    normalisation ((rgb - mean) / std) and the model's input offset into them, so that the grey image g fed to
    conv1_1 gives what VGG-16's conv1_1 gives for the RGB image (g, g, g) (away from the zero padding).
    fc6 / fc7 (``classifier.0`` / ``classifier.3``) become the 7x7 and 1x1 convs; ``classifier.6`` (the 1000
    ImageNet classes) and the hypercolumn head are not used. The model must have VGG-16's widths.
    """
    path = Path(path)
    if model.input_norm != 'release_grey':
        raise ValueError("load_torchvision_vgg16: the model must take the grey input (input_norm='release_grey')")
    if not path.is_file():
        raise UserError(f'{path}: VGG-16 weights not found')
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error means a wrong file for the user
        raise _tv_error(path, f'{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ""}') from None
    if isinstance(sd, dict) and 'state_dict' in sd and isinstance(sd['state_dict'], dict):
        sd = sd['state_dict']
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise _tv_error(path, 'expected a dict of tensors')
    convs = [n for n in model.trunk_order if n.startswith('conv')]
    want = {}
    for i, c in zip(_TV_CONVS, convs):
        conv = getattr(model, c)[0]
        want[f'features.{i}.weight'], want[f'features.{i}.bias'] = conv.weight.shape, conv.bias.shape
    want['features.0.weight'] = torch.Size((want['features.0.weight'][0], 3, 3, 3))  # RGB
    want.update({'classifier.0.weight': torch.Size((model.fc_dim, model.fc6[0].weight[0].numel())),
                 'classifier.0.bias': model.fc6[0].bias.shape,
                 'classifier.3.weight': torch.Size((model.fc_dim, model.fc_dim)),
                 'classifier.3.bias': model.fc7[0].bias.shape})
    missing = [k for k in want if k not in sd]
    if missing:
        raise _tv_error(path, f'missing {", ".join(missing[:3])}{" ..." if len(missing) > 3 else ""}')
    wrong = [f'{k} {tuple(sd[k].shape)} != {tuple(s)}' for k, s in want.items() if sd[k].shape != s]
    if wrong:
        raise _tv_error(path, f'shape {wrong[0]}: the model must have VGG-16 widths (width_mult 1, fc_dim 4096)')
    for i, c in zip(_TV_CONVS, convs):
        conv = getattr(model, c)[0]
        if i:  # conv1_1: below
            conv.weight.copy_(sd[f'features.{i}.weight'])
        conv.bias.copy_(sd[f'features.{i}.bias'])
    w = sd['features.0.weight'].double()  # (64, 3, 3, 3)
    mean = torch.tensor(_TV_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(_TV_STD, dtype=torch.float64).view(1, 3, 1, 1)
    # VGG sees (g - mean_c) / std_c with g = data + DATA_OFFSET, data being what conv1_1 here sees
    model.conv1_1[0].weight.copy_((w / std).sum(1, keepdim=True))
    model.conv1_1[0].bias.copy_(sd['features.0.bias'].double() + (w * (DATA_OFFSET - mean) / std).sum((1, 2, 3)))
    model.fc6[0].weight.copy_(sd['classifier.0.weight'].view_as(model.fc6[0].weight))
    model.fc6[0].bias.copy_(sd['classifier.0.bias'])
    model.fc7[0].weight.copy_(sd['classifier.3.weight'].view_as(model.fc7[0].weight))
    model.fc7[0].bias.copy_(sd['classifier.3.bias'])
    return model


@register_model
def vgg16_hypercolumn(pretrained: str = '', **kwargs) -> VGG16Hypercolumn:
    """Larsson et al. ECCV16 VGG-16 hypercolumn colorizer; ``pretrained``: a torchvision ``vgg16`` state dict file."""
    model = VGG16Hypercolumn(**kwargs)
    if pretrained:
        load_torchvision_vgg16(model, pretrained)
    return model
