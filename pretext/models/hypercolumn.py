"""VGG-16 hypercolumn colorizer.

Paper: G. Larsson, M. Maire, G. Shakhnarovich, "Learning Representations for Automatic
Colorization", ECCV 2016 (and "Colorization as a Proxy Task for Visual Understanding", CVPR 2017).

A VGG-16 trunk (13 3x3 convs, 64-128-256-512-512, optional BatchNorm, fc6/fc7 as convs) runs on the
grey input. For each output pixel a hypercolumn is formed by bilinearly sampling several trunk maps at
that pixel's location and concatenating them; a small MLP (1x1 convs) maps it to the output
distribution. Training samples only P random points per image (Larsson's sparse training): the
feature maps are sampled at those points with ``grid_sample`` and the upsampled dense hypercolumn
tensor (B, sum C, H, W) is never built. Dense inference samples every pixel centre, a chunk of rows
at a time, so memory stays bounded by ``dense_chunk`` pixels per image.

Heads: ``head='ab313'`` (313 ab-bin logits, the Zhang et al. target) or ``head='hue_chroma'``
(Larsson's separate hue and chroma histograms, ``n_hue + n_chroma`` logits; targets and loss in
``pretext.hue_chroma``).
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model

__all__ = ['VGG16Hypercolumn', 'pixel_centre_points']

from ..color import L_CENT, L_NORM  # noqa: E402 - the constants live in one place

# stage widths and number of convs of VGG-16 (configuration D)
_VGG16 = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
DEFAULT_TAPS = ('conv1_2', 'conv2_2', 'conv3_3', 'conv4_3', 'conv5_3', 'fc7')


def pixel_centre_points(h: int, w: int, device=None, dtype=torch.float32):
    """Grid-sample coordinates (align_corners=False) of the pixel centres: (ys (h,), xs (w,))."""
    ys = (2 * torch.arange(h, device=device, dtype=dtype) + 1) / h - 1
    xs = (2 * torch.arange(w, device=device, dtype=dtype) + 1) / w - 1
    return ys, xs


def _conv(cin, cout, k, p, bn):
    layers = [nn.Conv2d(cin, cout, k, padding=p, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class VGG16Hypercolumn(nn.Module):
    """VGG-16 + hypercolumn MLP: L (B,1,H,W) in [0,100] -> logits (B,out_dim,H,W) or (B,out_dim,P,1).

    Args:
        head: 'ab313' (out_dim=313 default) or 'hue_chroma' (out_dim = n_hue + n_chroma).
        out_dim: overrides the ab313 output width.
        n_hue, n_chroma: histogram sizes for the hue_chroma head.
        width_mult: scales every trunk width (tests use e.g. 1/8).
        fc_dim: fc6/fc7 width (4096 in VGG-16).
        fc6_kernel: fc6 kernel on the 1/32 pool5 map (7 as in VGG-16), padding keeps the size.
        bn: BatchNorm after each conv (helps training from scratch; VGG-16 itself has none).
        taps: trunk layers sampled into the hypercolumn.
        hidden: MLP hidden width (1024 in Larsson et al.).
        dense_chunk: pixels per image per chunk in dense (points=None) inference.
    """
    supports_points = True

    def __init__(self, head: str = 'ab313', out_dim: Optional[int] = None, n_hue: int = 32, n_chroma: int = 32,
                 width_mult: float = 1.0, fc_dim: int = 4096, fc6_kernel: int = 7, bn: bool = True,
                 taps: Sequence[str] = DEFAULT_TAPS, hidden: int = 1024, dense_chunk: int = 16384):
        super().__init__()
        if head == 'ab313':
            out_dim = 313 if out_dim is None else out_dim
        elif head == 'hue_chroma':
            if out_dim is not None and out_dim != n_hue + n_chroma:
                raise ValueError(f'hue_chroma head has out_dim = n_hue + n_chroma = {n_hue + n_chroma}')
            out_dim = n_hue + n_chroma
        else:
            raise ValueError(f"head must be 'ab313' or 'hue_chroma', got {head!r}")
        self.head_type, self.n_hue, self.n_chroma = head, n_hue, n_chroma
        self.dense_chunk = dense_chunk

        self.feature_info = []
        self.trunk_order = []
        cin, reduction = 1, 1
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
        self.fc6 = _conv(cin, fc_dim, fc6_kernel, fc6_kernel // 2, bn)
        self.fc7 = _conv(fc_dim, fc_dim, 1, 0, bn)
        self.trunk_order += ['fc6', 'fc7']
        self.feature_info += [dict(num_chs=fc_dim, reduction=reduction, module='fc6'),
                              dict(num_chs=fc_dim, reduction=reduction, module='fc7')]

        chs = {f['module']: f['num_chs'] for f in self.feature_info}
        unknown = [t for t in taps if t not in chs]
        if unknown:
            raise ValueError(f'unknown hypercolumn taps {unknown}; available: {list(chs)}')
        self.taps = tuple(taps)
        self.hypercolumn_dim = sum(chs[t] for t in self.taps)
        self.hidden = hidden
        self.out_dim = out_dim
        # the MLP runs on (B, C, P, 1) or (B, C, rows, W): 1x1 convs == per-point Linear layers
        self.head = nn.Sequential(
            nn.Conv2d(self.hypercolumn_dim, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, 1),
        )

    def reset_classifier(self, out_dim: int):
        self.out_dim = out_dim
        self.head[-1] = nn.Conv2d(self.hidden, out_dim, 1)

    def _trunk(self, L: torch.Tensor, keep: Sequence[str]) -> Dict[str, torch.Tensor]:
        x = (L - L_CENT) / L_NORM
        out = {}
        last = max(self.trunk_order.index(k) for k in keep)
        for name in self.trunk_order[:last + 1]:
            x = getattr(self, name)(x)
            if name in keep:
                out[name] = x
        return out

    def forward_features(self, L: torch.Tensor) -> torch.Tensor:
        """Deepest trunk map (fc7), (B, fc_dim, H/32, W/32)."""
        return self._trunk(L, ('fc7',))['fc7']

    def forward_hypercolumn_taps(self, L: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The trunk maps that make up the hypercolumn, name -> (B, C, h, w)."""
        return self._trunk(L, self.taps)

    def _sample(self, taps: Dict[str, torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
        # grid (B, h', w', 2) -> hypercolumns (B, sum C, h', w'); 'border' padding == bilinear
        # upsampling with align_corners=False (edge pixels clamp to the edge feature).
        cols = [F.grid_sample(taps[t], grid.to(taps[t].dtype), mode='bilinear', padding_mode='border',
                              align_corners=False) for t in self.taps]
        return torch.cat(cols, dim=1)

    def forward_head(self, taps: Dict[str, torch.Tensor], points: Optional[torch.Tensor] = None,
                     out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Hypercolumn MLP on the tap dict from ``forward_hypercolumn_taps``.

        points (B, P, 2) (x, y in [-1, 1], align_corners=False) -> (B, out_dim, P, 1);
        points None -> dense (B, out_dim, H, W) with (H, W) = out_size, computed in row chunks.
        """
        if points is not None:
            if points.dim() != 3 or points.shape[-1] != 2:
                raise ValueError(f'points must be (B, P, 2), got {tuple(points.shape)}')
            return self.head(self._sample(taps, points.unsqueeze(2)))
        h, w = out_size
        ref = taps[self.taps[0]]
        b = ref.shape[0]
        ys, xs = pixel_centre_points(h, w, device=ref.device)
        rows = max(1, self.dense_chunk // w)
        out = []
        for y0 in range(0, h, rows):
            y = ys[y0:y0 + rows]
            grid = torch.stack(torch.broadcast_tensors(xs[None, :], y[:, None]), dim=-1)  # (r, w, 2) as (x, y)
            out.append(self.head(self._sample(taps, grid.expand(b, -1, -1, -1))))
        return torch.cat(out, dim=2)

    def forward(self, L: torch.Tensor, points: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_hypercolumn_taps(L), points, out_size=L.shape[-2:])


@register_model
def vgg16_hypercolumn(**kwargs) -> VGG16Hypercolumn:
    """Larsson et al. ECCV16 VGG-16 hypercolumn colorizer (ab313 or hue_chroma head)."""
    return VGG16Hypercolumn(**kwargs)
