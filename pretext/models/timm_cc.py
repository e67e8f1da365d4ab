"""Any timm backbone as a colorization encoder (``timm:<name>``).

Pretext task: Zhang et al., "Colorful Image Colorization", ECCV 2016 (313-bin ab classification from L).
The backbone is ``timm.create_model(name, pretrained=False, in_chans=1, features_only=True)``; a
dense head (3x3 conv-BN-ReLU then 1x1 conv) on the last feature map predicts the bins at that map's
resolution. Taps are timm's feature maps, named by their module inside the wrapper
(``encoder.<timm module name>``, e.g. ``encoder.layer3`` for a ResNet) so forward hooks resolve them
like for every other model.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn

from . import register_model

__all__ = ['TimmColor']

from ..color import L_CENT, L_NORM  # noqa: E402 - the constants live in one place


class TimmColor(nn.Module):
    """timm features_only trunk + dense colour head: L (B,1,H,W) in [0,100] -> (B, out_dim, H/r, W/r).

    Args:
        model_name: timm model name.
        out_dim: output channels (313 ab bins).
        out_indices: timm feature indices to expose as taps (default: all); the head uses the last.
        head_dim: hidden width of the colour head.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``output_stride=8`` for a denser output).
    """
    supports_points = False

    def __init__(self, model_name: str, out_dim: int = 313, out_indices: Optional[Sequence[int]] = None,
                 head_dim: int = 256, **timm_kwargs):
        super().__init__()
        kw = dict(pretrained=False, in_chans=1, features_only=True, **timm_kwargs)
        if out_indices is not None:
            kw['out_indices'] = tuple(out_indices)
        import timm  # imported here: timm takes seconds to import and only this wrapper needs it

        self.encoder = timm.create_model(model_name, **kw)
        fi = self.encoder.feature_info
        self.feature_info = [dict(num_chs=c, reduction=r, module=f'encoder.{m.replace(".", "_")}')
                             for c, r, m in zip(fi.channels(), fi.reduction(), fi.module_name())]
        cin = self.feature_info[-1]['num_chs']
        self.head_dim = head_dim
        self.out_dim = out_dim
        self.neck = nn.Sequential(
            nn.Conv2d(cin, head_dim, 3, padding=1, bias=False), nn.BatchNorm2d(head_dim), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(head_dim, out_dim, 1)

    def reset_classifier(self, out_dim: int):
        self.out_dim = out_dim
        self.head = nn.Conv2d(self.head_dim, out_dim, 1)

    def forward_features(self, L: torch.Tensor) -> torch.Tensor:
        return self.encoder((L - L_CENT) / L_NORM)[-1]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(feats))

    def forward(self, L: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(L))


@register_model
def timm_cc(model_name: str, **kwargs) -> TimmColor:
    """Build through ``create_model('timm:<model_name>', ...)``."""
    return TimmColor(model_name, **kwargs)
