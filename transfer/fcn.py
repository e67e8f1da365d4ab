"""FCN-32s on a transfer backbone, as shelhamer/fcn.berkeleyvision.org builds it (Long, Shelhamer, Darrell, "Fully
Convolutional Networks for Semantic Segmentation", CVPR 2015 / PAMI 2016; ``voc-fcn-alexnet``, ``voc-fcn32s``).

backbone (conv1 padded by 100, fc6 / fc7 as convolutions) -> ``score`` (1x1, zero init) -> ``upscore`` (a per-class
transposed convolution holding the bilinear kernel of ``surgery.upsample_filt``, frozen) -> crop to the input at the
offset of the release's crop layer. :func:`coord_offset` measures where a trunk's outputs sit on its input (Caffe's
``coord_map``), so that AlexNet gets 18, VGG-16 19, and zhang_vgg / timm trunks their own offsets. Used by the native
trainer (``transfer.segmentation``), the mmseg head (``transfer.mmseg_backbone``) and the exporter.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretext.runtime import UserError, log

from .backbone import TransferNet, build_backbone
from .voc import NUM_SEG_CLASSES, VOID

FCN_PADDING = 100  #: conv1 padding of the FCN nets with fc6/fc7 (voc-fcn-alexnet/net.py, voc-fcn32s/net.py)


def bilinear_kernel(size: int) -> torch.Tensor:
    """(size, size) bilinear interpolation kernel, as fcn.berkeleyvision.org ``surgery.upsample_filt``: factor
    f = ceil(size / 2), centre f - 1 (odd size) or f - 0.5 (even), value (1 - |i - c| / f)(1 - |j - c| / f)."""
    f = (size + 1) // 2
    c = f - 1 if size % 2 == 1 else f - 0.5
    t = 1 - (torch.arange(size, dtype=torch.float64) - c).abs() / f
    return (t[:, None] * t[None, :]).float()


class BilinearUpsample(nn.Module):
    """FCN's ``upscore`` + ``crop``: a per-class transposed convolution (kernel ``kernel``, stride ``stride``,
    no bias) holding the bilinear kernel, frozen (lr_mult 0), then the crop of the input's size at ``offset``."""

    def __init__(self, channels: int, stride: int, kernel: int, offset: int):
        super().__init__()
        self.stride, self.kernel, self.offset = stride, kernel, offset
        self.weight = nn.Parameter(bilinear_kernel(kernel).expand(channels, 1, kernel, kernel).clone(),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = F.conv_transpose2d(x, self.weight.to(x.dtype), stride=self.stride, groups=x.shape[1])
        h, w = int(size[0]), int(size[1])
        o = self.offset
        if y.shape[-2] < o + h or y.shape[-1] < o + w:
            raise ValueError(f"upsampled scores {tuple(y.shape[-2:])} do not cover the {h}x{w} input at offset {o}: "
                             "the trunk needs more padding (conv1_padding) for this input size")
        return y[..., o:o + h, o:o + w]

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, offset={self.offset}, frozen"


def _linearised(net: TransferNet) -> nn.Module:
    """A one-channel copy of ``net``'s stages whose every output is a positive average of its receptive field: each
    convolution keeps its geometry (kernel, stride, padding, dilation) on one channel with equal weights summing to
    1 and no bias, BatchNorm becomes the identity, max pools become average pools of the same geometry, dropout is
    off. Its gradients then spread symmetrically over each receptive field, and it is cheap to run."""
    probe = nn.Sequential(*[copy.deepcopy(getattr(net, n)) for n in net.stage_names]).float().cpu().eval()
    for name, m in list(probe.named_modules()):
        parent = probe.get_submodule(name.rpartition(".")[0]) if "." in name else probe
        attr = name.rpartition(".")[2]
        if isinstance(m, nn.Conv2d):
            try:  # the same class: e.g. timm's Conv2dSame pads in forward
                one = type(m)(1, 1, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, bias=False)
            except TypeError:
                one = nn.Conv2d(1, 1, m.kernel_size, m.stride, m.padding, m.dilation, bias=False)
            nn.init.constant_(one.weight, 1.0 / one.weight.numel())
            setattr(parent, attr, one)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            setattr(parent, attr, nn.Identity())
        elif isinstance(m, nn.MaxPool2d):
            setattr(parent, attr, nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode))
    return probe.requires_grad_(False)


def coord_offset(net: TransferNet) -> float:
    """``c`` such that output column ``x`` of ``net`` (its last stage) is centred on input column ``reduction * x + c``
    (Caffe's ``coord_map``: AlexNet with conv1 padded by 100 gives 13, VGG-16 12.5).

    Measured, so that any trunk works (dilated zhang_vgg, timm): on a linearised copy (:func:`_linearised`), the
    gradient of one central output with respect to the input is a symmetric bump over its receptive field; its
    centroid is the centre. Rounded to a half pixel. Trunks with global operations (squeeze-excitation) have no local
    receptive field: 0 ('same' padding), with a warning."""
    s = net.reduction(net.stage_names[-1])
    probe = _linearised(net)
    h, w = 2 * s + 1, 32 * s
    while w <= 16384:
        x = torch.ones(1, 1, h, w, requires_grad=True)
        try:
            y = probe(x)
        except RuntimeError as e:  # too small for a valid convolution (fc6 without padding): a taller, wider strip
            if "size" not in str(e).lower():
                raise
            h, w = 2 * h, 2 * w
            continue
        j = y.shape[-1] // 2
        y[0, :, y.shape[-2] // 2, j].sum().backward()
        g = x.grad[0, 0].abs().sum(0).double()
        if g.sum() > 0 and g[0] == 0 and g[-1] == 0:
            centre = float((g * torch.arange(w, dtype=torch.float64)).sum() / g.sum())
            return round(2 * (centre - s * j)) / 2
        w *= 2  # the receptive field reaches the strip's ends
    # global operations (squeeze-excitation, attention) give every output the whole image as receptive field
    log.warning("%s: its outputs see the whole image (global pooling or attention); assuming the centred features "
                "of 'same' padding (output x at input %d * x)", net.arch, s)
    return 0.0


def upsample_geometry(net: TransferNet, kernel: int = 0, offset: int = -1) -> tuple[int, int, int]:
    """(stride, kernel, crop offset) of the FCN upsampling for ``net``: stride = the trunk's reduction; kernel 63 for
    AlexNet (voc-fcn-alexnet) and 2 x stride otherwise (voc-fcn32s 64, voc-fcn8s 16); offset = the deconvolution's
    centre (kernel - 1) / 2 minus :func:`coord_offset`, as ``caffe.coord_map.crop`` derives it (rounded half up)."""
    s = net.reduction(net.stage_names[-1])
    if not kernel:
        kernel = 63 if net.arch.startswith("alexnet") and s == 32 else 2 * s
    if offset < 0:
        offset = math.floor((kernel - 1) / 2 - coord_offset(net) + 0.5)
        if offset < 0:
            raise UserError(f"{net.arch}: derived crop offset {offset} < 0; set crop_offset or a larger "
                            "upsample_kernel")
    return s, kernel, offset


class FCN(nn.Module):
    """FCN-32s (any stride): backbone -> ``score`` (1x1, zero init: Caffe's default filler) -> frozen bilinear
    upsampling cropped to the input. ``forward`` takes the network input (``backbone.prepare(rgb)``) and returns
    logits (B, num_classes, H, W)."""

    def __init__(self, backbone: TransferNet, num_classes: int = NUM_SEG_CLASSES, kernel: int = 0, offset: int = -1):
        super().__init__()
        self.backbone = backbone
        stride, kernel, offset = upsample_geometry(backbone, kernel, offset)
        self.score = nn.Conv2d(backbone.num_features, num_classes, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        self.upscore = BilinearUpsample(num_classes, stride, kernel, offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upscore(self.score(self.backbone(x)), x.shape[-2:])


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Caffe's ``SoftmaxWithLoss`` with ``ignore_label: 255, normalize: true``: cross-entropy summed over the pixels
    that are not void, divided by their number (at least 1, so an all-void image gives 0). Computed in float32."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=VOID, reduction="sum")
    return ce / (target != VOID).sum().clamp(min=1)


def set_conv1_padding(net: TransferNet, padding: int) -> None:
    """Pad the first convolution (FCN's ``pad: 100``); a no-op for timm trunks, which keep their own stem."""
    first = getattr(net, net.stage_names[0])
    if isinstance(first, nn.Sequential) and isinstance(first[0], nn.Conv2d):
        first[0].padding = (padding, padding)
        net.info["conv1_padding"] = padding
    else:
        log.info("%s: conv1 padding does not apply (its stem is kept as it is)", net.arch)


def fcn_backbone(checkpoint: str | None = None, random_init: str | None = None, supervised: str | None = None, *,
                 input: str = "gray", images: torch.Tensor | None = None, rescale: bool = True, seed: int = 0,
                 fc_dim: int = 4096, conv1_padding: int = -1, dropout: float = 0.5) -> TransferNet:
    """The transfer backbone for FCN: built (rescaled / initialised on ``images``) in its classification geometry,
    as the release rescaled it, then conv1 padded (``-1``: 100 for nets with fc6/fc7) and dropout set."""
    backbone = build_backbone(checkpoint, random_init, supervised, input=input, fc="conv", images=images,
                              rescale=rescale, seed=seed, fc_dim=fc_dim)
    pad = conv1_padding if conv1_padding >= 0 else (FCN_PADDING if backbone.has_fc else -1)
    if pad >= 0:
        set_conv1_padding(backbone, pad)
    for m in backbone.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
        # Caffe rounds pooled sizes up; FCN's 100 px padding covers the input only with that rounding (torchvision's
        # AlexNet / VGG-16 round down: same coordinate map, one output row and column fewer at the far border)
        if isinstance(m, nn.MaxPool2d) and backbone.arch in ("alexnet", "vgg16"):
            m.ceil_mode = True
    return backbone
