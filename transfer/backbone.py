"""Checkpoint -> transfer network: the one backbone builder of ``transfer/`` (classification, detection,
segmentation), with the baselines of Zhang et al. Table 2 built the same way.

API (what the task modules use)
-------------------------------
``build_backbone(checkpoint=None, random_init=None, supervised=None, *, input="gray", fc="conv",
conv1_padding=None, images=None, rescale=True, seed=0, fc_dim=4096, device=None) -> TransferNet``; one source:

* ``checkpoint``: a pretext checkpoint (``pretext.train``'s format: ``model_name``, ``model_kwargs``, ``model``).
  ``alexnet_cc`` goes through ``pretext.models.alexnet_cc.export_alexnet_transfer`` (standard AlexNet geometry,
  BatchNorm folded into conv1..conv5); fc6/fc7 are folded the same way (the release's ``batch_norm_absorb.py``
  covers every conv+BN pair, fc6/fc7 included) and lose the pretext dilation (the release's ``*_nobn.prototxt``).
  ``zhang_vgg`` keeps its blocks conv1..conv7 (stride 8; BN after ReLU cannot be folded into the conv before it);
  ``timm:<name>`` keeps its ``features_only`` trunk. Neither has fc6/fc7.
* ``random_init``: the colorization AlexNet geometry, untrained: ``gaussian`` (bvlc_reference_caffenet's fillers:
  conv N(0, 0.01), fc6/fc7 N(0, 0.005), biases 0/1/0/1/1 and 1/1; Table 2's "Gaussian" row) or the data-dependent
  init of ``pretext.init`` on ``images`` (``kmeans``, ``pca``, ``dd_gaussian``: Kraehenbuehl et al. 2016).
* ``supervised``: ``alexnet:WEIGHTS`` or ``vgg16:WEIGHTS``, a torchvision state-dict file the user supplies (no
  downloads), in torchvision's geometry (AlexNet: 64/192/384/256/256 channels, conv1 padding 2, no groups).

``input``: ``gray`` (the network sees L, as pretrained; supervised nets see the desaturated image through conv1
summed over RGB) or ``color`` (colorization nets see Lab: conv1's a and b weights start at zero, so the network
starts as the grey one; supervised nets see RGB as trained). ``fc``: ``conv`` (fc6 a 6x6 -- VGG 7x7 --
convolution, fc7 1x1: classification and FCN) or ``linear`` (``nn.Linear(256*6*6, 4096)``: the Fast R-CNN box
head). ``conv1_padding`` overrides conv1's padding (FCN: 100). ``rescale`` (checkpoints only, on ``images``):
the release's ``postprocess_model.sh`` after BN absorption, magic_init's between-layer rescaling
(``pretext.init.between_layer_rescale``) with a random 1000-way 1x1 layer on fc7 as the release's rescaling net
has; skipped, with a log line, for networks with BatchNorm.

``TransferNet`` (an ``nn.Module``; forward takes the *network input*, see below):

* ``prepare(rgb)``: RGB (B, 3, H, W) in [0, 1] -> the network input (L, Lab, RGB or grey, per ``input_kind``),
  batched on the caller's device with ``pretext.color``. Normalisation ((L - 50) / 100, ImageNet mean/std) is the
  network's own first module ``norm`` (no parameters).
* ``stage_names``: the stages in order, e.g. AlexNet ``conv1 pool1 conv2 pool2 conv3 conv4 conv5 pool5 fc6 drop6
  fc7 drop7``; each stage is a submodule of that name (``conv1.0`` is conv1's ``nn.Conv2d``).
* ``forward_features(x, until=None)``: run the stages up to and including ``until`` (default: the last).
* ``trunk(until)``: a module (sharing parameters) from the input to stage ``until``: detection uses
  ``trunk("conv5")`` (AlexNet/VGG conv5 at stride 16, no pool5), with ``channels("conv5")`` as ``out_channels``.
* ``box_head()``: ``Flatten -> fc6 -> drop6 -> fc7 -> drop7`` (needs ``fc="linear"``), for RoI-pooled 6x6 (VGG 7x7)
  features; ``num_features`` is its width (4096).
* ``stages_from(name)``: the stages from ``name`` on (freezing: train from ``fc6``, from ``conv1``...).
* ``feature_info``: ``dict(num_chs, reduction, module)`` per stage (timm's convention); ``info``: where the
  weights came from, the key conversion, the rescaling ratios (for results files).
* ``has_fc``: whether fc6/fc7 exist (AlexNet, VGG16); ``fc_kernel``: fc6's spatial extent (6 or 7).

Key conversion is explicit (:func:`convert_state_dict`): every source key is mapped or listed as dropped; any
missing or unexpected key is a one-line :class:`pretext.runtime.UserError` naming the file and the keys.

Geometry: the colorization AlexNet (``arch`` 'alexnet_cc': 96/256/384/384/256 channels, groups 2 in conv2/4/5,
conv1 padding 0) pools 3/2 rounding up as Caffe does (227 px -> conv5 13x13 -> pool5 6x6; the FCN crop offsets of
the release assume Caffe's rounding); torchvision's AlexNet/VGG round down as they were trained. ``device`` builds
(and rescales) on that device; ``images`` are moved there. Other helpers: :func:`network_input` (the conversion
behind ``prepare``), :func:`weight_layers` (conv/linear layers of some stages, e.g. for parameter groups),
:func:`rescale_backbone` / :class:`RescaleNet` (the rescaling alone), :func:`describe` (one line for logs).

Examples::

    rgb = next(iter(loader))[0]                                   # real training images, (B, 3, H, W) in [0, 1]
    # detection (Fast R-CNN on conv5): body at stride 16, box head from the pretrained fc6/fc7
    net = build_backbone(ckpt, input="gray", fc="linear", images=rgb, device=dev)
    body, head = net.trunk("conv5"), net.box_head()               # body(net.prepare(rgb)): (B, 256, ~H/16, ~W/16)
    body.out_channels = net.channels("conv5")                     # torchvision's FasterRCNN wants it
    # segmentation (FCN-32s): conv1 padded by 100, fc6 6x6 and fc7 1x1 convolutions
    net = build_backbone(ckpt, input="color", fc="conv", conv1_padding=100, images=rgb, device=dev)
    score_in = net(net.prepare(rgb))                              # drop7 output, (B, 4096, h, w) at stride 32
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn

from pretext.color import L_CENT, L_NORM, gray_rgb, rgb_to_l, rgb_to_lab
from pretext.runtime import UserError, load_checkpoint

log = logging.getLogger("crosschannel")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_MODES = ("gray", "color")
FC_LAYOUTS = ("conv", "linear")
RANDOM_INITS = ("gaussian", "kmeans", "pca", "dd_gaussian")
SUPERVISED_ARCHS = ("alexnet", "vgg16")
INPUT_KINDS = {"L": 1, "Lab": 3, "rgb": 3, "grey": 1}  #: network input kind -> channels


# --------------------------------------------------------------------------------------------- input
def network_input(rgb: torch.Tensor, kind: str) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> what a network of ``kind`` takes (float32, same device).

    ``L``: (B, 1) lightness in [0, 100]; ``Lab``: (B, 3) CIE Lab; ``rgb``: the RGB itself; ``grey``: (B, 1) the
    desaturated image (same L, ab = 0) in sRGB [0, 1].
    """
    if kind == "L":
        return rgb_to_l(rgb)
    if kind == "Lab":
        return rgb_to_lab(rgb)
    if kind == "rgb":
        return rgb.float()
    if kind == "grey":
        return gray_rgb(rgb)[:, :1]
    raise ValueError(f"unknown input kind {kind!r}; one of {list(INPUT_KINDS)}")


class InputNorm(nn.Module):
    """Fixed per-channel ``(x - shift) / scale`` (no parameters): L -> (L - 50) / 100 as in pretext training; Lab
    -> the same for L and ab / 100 (the same factor, so Lab is scaled isotropically); RGB -> ImageNet mean/std;
    grey -> the mean of the ImageNet means and stds (see :func:`_conv1_rgb_to_grey`)."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in INPUT_KINDS:
            raise ValueError(f"unknown input kind {kind!r}")
        shift, scale = {
            "L": ((L_CENT,), (L_NORM,)),
            "Lab": ((L_CENT, 0.0, 0.0), (L_NORM,) * 3),
            "rgb": (IMAGENET_MEAN, IMAGENET_STD),
            "grey": ((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)),
        }[kind]
        self.kind = kind
        self.register_buffer("shift", torch.tensor(shift).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(scale).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.shift.shape[1]:
            raise ValueError(f"{self.kind} input needs {self.shift.shape[1]} channel(s), got shape {tuple(x.shape)}")
        return (x - self.shift) / self.scale

    def extra_repr(self) -> str:
        return self.kind


# --------------------------------------------------------------------------------------------- the network
class TransferNet(nn.Module):
    """An encoder for fine-tuning: ``norm`` then named stages in order (see the module docstring)."""

    def __init__(self, arch: str, input_kind: str, stages: list[tuple[str, nn.Module]], reductions: dict[str, int],
                 channels: dict[str, int], fc: str | None = None, fc_kernel: int = 0):
        super().__init__()
        self.arch, self.input_kind, self.fc, self.fc_kernel = arch, input_kind, fc, fc_kernel
        self.norm = InputNorm(input_kind)
        self.stage_names = [n for n, _ in stages]
        for n, m in stages:
            self.add_module(n, m)
        self.feature_info = [dict(num_chs=channels[n], reduction=reductions[n], module=n) for n in self.stage_names]
        self.info: dict = {"arch": arch, "input_kind": input_kind, "fc": fc}

    @property
    def has_fc(self) -> bool:
        return "fc6" in self.stage_names

    @property
    def num_features(self) -> int:
        return self.feature_info[-1]["num_chs"]

    def channels(self, stage: str) -> int:
        return self._info(stage)["num_chs"]

    def reduction(self, stage: str) -> int:
        return self._info(stage)["reduction"]

    def _info(self, stage: str) -> dict:
        for f in self.feature_info:
            if f["module"] == stage:
                return f
        raise ValueError(f"{self.arch} has no stage {stage!r}; stages: {self.stage_names}")

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        return network_input(rgb, self.input_kind)

    def stages_from(self, name: str) -> list[str]:
        self._info(name)
        return self.stage_names[self.stage_names.index(name):]

    def forward_features(self, x: torch.Tensor, until: str | None = None) -> torch.Tensor:
        if until is not None:
            self._info(until)
        x = self.norm(x)
        for n in self.stage_names:
            if n == "fc6" and self.fc == "linear":
                x = x.flatten(1)
            x = getattr(self, n)(x)
            if n == until:
                break
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def trunk(self, until: str = "conv5") -> nn.Sequential:
        """Input -> stage ``until``, sharing this network's modules (state-dict keys as here)."""
        names = self.stage_names[: self.stage_names.index(self._info(until)["module"]) + 1]
        return nn.Sequential(OrderedDict([("norm", self.norm)] + [(n, getattr(self, n)) for n in names]))

    def box_head(self) -> nn.Sequential:
        """Flatten -> fc6 -> drop6 -> fc7 -> drop7 for RoI-pooled features (needs ``fc='linear'``)."""
        if self.fc != "linear":
            raise ValueError("box_head() needs fc6/fc7 as linear layers: build_backbone(..., fc='linear')")
        return nn.Sequential(OrderedDict([("flatten", nn.Flatten(1))] +
                                         [(n, getattr(self, n)) for n in ("fc6", "drop6", "fc7", "drop7")]))


def _conv(cin, cout, k, s=1, p=0, g=1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g)


def _fc_stages(cin: int, k: int, fc_dim: int, fc: str) -> list[tuple[str, nn.Module]]:
    if fc not in FC_LAYOUTS:
        raise UserError(f"fc must be one of {FC_LAYOUTS}, got '{fc}'")
    if fc == "conv":
        l6, l7 = nn.Conv2d(cin, fc_dim, k), nn.Conv2d(fc_dim, fc_dim, 1)
    else:
        l6, l7 = nn.Linear(cin * k * k, fc_dim), nn.Linear(fc_dim, fc_dim)
    # ReLU not in place: forward hooks on the conv (data-dependent init, rescaling) then see pre-activations
    return [("fc6", nn.Sequential(l6, nn.ReLU())), ("drop6", nn.Dropout(0.5)),
            ("fc7", nn.Sequential(l7, nn.ReLU())), ("drop7", nn.Dropout(0.5))]


# (out, kernel, stride, padding, groups) of conv1..conv5
_ALEXNET_GEOMETRY = {
    # the colorization AlexNet exported to standard geometry (pretext.models.alexnet_cc, CaffeNet without LRN)
    "alexnet_cc": ((96, 11, 4, 0, 1), (256, 5, 1, 2, 2), (384, 3, 1, 1, 1), (384, 3, 1, 1, 2), (256, 3, 1, 1, 2)),
    # torchvision.models.alexnet
    "alexnet": ((64, 11, 4, 2, 1), (192, 5, 1, 2, 1), (384, 3, 1, 1, 1), (256, 3, 1, 1, 1), (256, 3, 1, 1, 1)),
}


def alexnet_transfer_net(geometry: str, input_kind: str, fc: str = "conv", fc_dim: int = 4096,
                         conv1_padding: int | None = None) -> TransferNet:
    """AlexNet stages conv1 .. drop7 (uninitialised weights: PyTorch defaults). Pools are 3/2; the colorization
    geometry rounds pooled sizes up as Caffe does (equal at 227 px), torchvision's rounds down as it was trained."""
    cin = INPUT_KINDS[input_kind]
    stages, chs, red = [], {}, {}
    ceil = geometry == "alexnet_cc"
    r = 1
    for i, (cout, k, s, p, g) in enumerate(_ALEXNET_GEOMETRY[geometry], start=1):
        name = f"conv{i}"
        if i == 1 and conv1_padding is not None:
            p = conv1_padding
        stages.append((name, nn.Sequential(_conv(cin, cout, k, s, p, g), nn.ReLU())))
        r *= s
        chs[name], red[name], cin = cout, r, cout
        if i in (1, 2, 5):
            pool = f"pool{i}"
            stages.append((pool, nn.MaxPool2d(3, 2, ceil_mode=ceil)))
            r *= 2
            chs[pool], red[pool] = cout, r
    stages += _fc_stages(cin, 6, fc_dim, fc)
    for n in ("fc6", "drop6", "fc7", "drop7"):
        chs[n], red[n] = fc_dim, r
    return TransferNet(geometry, input_kind, stages, red, chs, fc, 6)


_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16_transfer_net(input_kind: str, fc: str = "conv", fc_dim: int = 4096,
                       conv1_padding: int | None = None) -> TransferNet:
    """torchvision VGG-16 as stages conv1 (both convs of block 1) .. conv5, pool1..pool5, fc6 (7x7) .. drop7."""
    cin = INPUT_KINDS[input_kind]
    stages, chs, red = [], {}, {}
    r = 1
    for b, widths in enumerate(_VGG16_BLOCKS, start=1):
        layers = []
        for j, cout in enumerate(widths):
            p = conv1_padding if (b == 1 and j == 0 and conv1_padding is not None) else 1
            layers += [_conv(cin, cout, 3, 1, p), nn.ReLU()]
            cin = cout
        stages += [(f"conv{b}", nn.Sequential(*layers)), (f"pool{b}", nn.MaxPool2d(2, 2))]
        chs[f"conv{b}"], red[f"conv{b}"] = cin, r
        r *= 2
        chs[f"pool{b}"], red[f"pool{b}"] = cin, r
    stages += _fc_stages(cin, 7, fc_dim, fc)
    for n in ("fc6", "drop6", "fc7", "drop7"):
        chs[n], red[n] = fc_dim, r
    return TransferNet("vgg16", input_kind, stages, red, chs, fc, 7)


# --------------------------------------------------------------------------------------------- key conversion
def convert_state_dict(src: dict[str, torch.Tensor], key_map: dict[str, str], net: nn.Module, what: str,
                       drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Rename ``src`` keys by ``key_map`` onto ``net``'s state dict and load it strictly.

    Keys starting with a prefix in ``drop`` are discarded on purpose (e.g. the old classifier); any other key
    without a mapping is *unexpected*, any key of ``net`` left unfilled is *missing*: both are a one-line error
    naming ``what``. A tensor whose shape differs from the target but has as many elements is reshaped (fc6 as a
    6x6 convolution <-> as a linear layer on the flattened 256x6x6 map, same memory order); other shape mismatches
    are errors. Returns the dict that was loaded.
    """
    target = net.state_dict()
    out, unexpected, dropped = {}, [], []
    for k, v in src.items():
        if k in key_map:
            out[key_map[k]] = v
        elif any(k.startswith(d) for d in drop):
            dropped.append(k)
        else:
            unexpected.append(k)
    missing = [k for k in target if k not in out]
    unexpected += [k for k in out if k not in target]
    if missing or unexpected:
        raise UserError(f"{what}: cannot convert the weights: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                        f", unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k, v in out.items():
        want = target[k].shape
        if v.shape != want:
            if v.numel() != target[k].numel():
                raise UserError(f"{what}: '{k}' has shape {tuple(v.shape)}, the network needs {tuple(want)}")
            out[k] = v.reshape(want)
    net.load_state_dict(out, strict=True)
    if dropped:
        log.info("%s: dropped %d key(s) on purpose: %s", what, len(dropped), ", ".join(dropped))
    return out


def _stage_key_map(net: TransferNet, src_names: list[str]) -> dict[str, str]:
    """Map the i-th weight/bias pair of ``src_names`` (module paths in the source) onto the i-th conv/linear layer of
    ``net``'s stages, in order."""
    dst = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(dst) != len(src_names):
        raise ValueError(f"{len(src_names)} source layers for {len(dst)} layers of {net.arch}")
    return {f"{s}.{p}": f"{d}.{p}" for s, d in zip(src_names, dst) for p in ("weight", "bias")}


# --------------------------------------------------------------------------------------------- input adaptation
@torch.no_grad()
def _conv1_l_to_lab(conv: nn.Conv2d) -> nn.Conv2d:
    """conv1 on L -> conv1 on Lab with the a and b weights zero: on any Lab image it computes what it computed on L."""
    new = nn.Conv2d(3, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                    conv.bias is not None).to(conv.weight.device)
    new.weight.zero_()
    new.weight[:, :1] = conv.weight
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new


@torch.no_grad()
def _conv1_rgb_to_grey(conv: nn.Conv2d) -> nn.Conv2d:
    """conv1 of an ImageNet-normalised RGB network -> conv1 on one grey channel: the weights summed over R, G, B
    with the normalisation folded in. With x = (g - m_avg) / s_avg the grey input (:class:`InputNorm` 'grey') and
    x_c = (g - m_c) / s_c what the RGB network saw for a grey image (R = G = B = g):
    sum_c W_c x_c = (sum_c W_c s_avg / s_c) x + sum_c W_c (m_avg - m_c) / s_c, so the summed weights carry the
    s_avg / s_c factors and the bias absorbs the second term. Interior outputs equal the RGB network on the
    desaturated image; outputs that touch conv1's zero padding differ (the padding is zero in x, not in x_c)."""
    m = torch.tensor(IMAGENET_MEAN, dtype=conv.weight.dtype, device=conv.weight.device)
    s = torch.tensor(IMAGENET_STD, dtype=conv.weight.dtype, device=conv.weight.device)
    m_avg, s_avg = m.mean(), s.mean()
    w = conv.weight  # (out, 3, k, k)
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                    True).to(w.device)
    new.weight.copy_((w * (s_avg / s).view(1, 3, 1, 1)).sum(1, keepdim=True))
    b0 = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=w.device)
    new.bias.copy_(b0 + (w * ((m_avg - m) / s).view(1, 3, 1, 1)).sum((1, 2, 3)))
    return new


def _first_conv(module: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            return parent, name.rpartition(".")[2], m
    raise ValueError("no convolution found")


def _replace_first_conv(net: TransferNet, fn: Callable[[nn.Conv2d], nn.Conv2d], kind: str) -> None:
    parent, attr, conv = _first_conv(getattr(net, net.stage_names[0]))
    setattr(parent, attr, fn(conv))
    net.input_kind = kind
    net.norm = InputNorm(kind).to(net.norm.shift.device)
    net.info["input_kind"] = kind


# --------------------------------------------------------------------------------------------- sources
@torch.no_grad()
def _fold(conv_bn: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv (+ BatchNorm in eval mode, folded) of a pretext conv-BN-ReLU block."""
    from pretext.models.alexnet_cc import fold_conv_bn

    conv, bn = conv_bn[0], conv_bn[1]
    if isinstance(bn, nn.BatchNorm2d):
        return fold_conv_bn(conv, bn)
    b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    return conv.weight.detach().clone(), b.detach().clone()


def _alexnet_cc_to_transfer(model: nn.Module, fc: str, conv1_padding: int | None, what: str) -> TransferNet:
    from pretext.models.alexnet_cc import export_alexnet_transfer

    model = model.eval()
    exported = export_alexnet_transfer(model)  # conv1..conv5, BN folded, standard geometry
    src = {k: v for k, v in exported.state_dict().items()}
    for n in ("fc6", "fc7"):
        w, b = _fold(getattr(model, n))
        src[f"{n}.0.weight"], src[f"{n}.0.bias"] = w, b
    src.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    net = alexnet_transfer_net("alexnet_cc", "L", fc, model.fc_dim, conv1_padding)
    key_map = {k: k for k in src if not k.startswith("head.")}
    convert_state_dict(src, key_map, net, what, drop=("head.",))
    return net


class _TimmTrunk(nn.Module):
    """A timm ``features_only`` encoder as one stage: its last feature map."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1]


def _from_checkpoint(path: str, fc: str, conv1_padding: int | None) -> TransferNet:
    from pretext.models import model_from_checkpoint

    ckpt = load_checkpoint(path)
    if "model_name" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path}: not a pretext checkpoint (needs 'model_name' and 'model')")
    name = ckpt["model_name"]
    try:
        model = model_from_checkpoint(ckpt)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot rebuild {name} ({str(e).splitlines()[0][:300]})") from None
    net = transfer_net_from_model(model, name, fc, conv1_padding, f"{path} ({name})")
    net.info.update(source="checkpoint", path=str(path), model_name=name, model_kwargs=ckpt.get("model_kwargs") or {},
                    step=ckpt.get("step"))
    return net


def transfer_net_from_model(model: nn.Module, name: str, fc: str = "conv", conv1_padding: int | None = None,
                            what: str = "") -> TransferNet:
    """The transfer network of a pretext model ``name`` (``pretext.models.create_model``'s name), as a checkpoint
    gives it (also used to rebuild an exported network's structure before its weights are loaded)."""
    what = what or name
    if name == "alexnet_cc":
        net = _alexnet_cc_to_transfer(model, fc, conv1_padding, what)
    elif name == "zhang_vgg":
        blocks = [f"conv{i}" for i in range(1, 8)]  # conv8 upsamples for the colour head: not an encoder stage
        info = {f["module"]: f for f in model.feature_info}
        net = TransferNet("zhang_vgg", "L", [(n, copy.deepcopy(getattr(model, n))) for n in blocks],
                          {n: info[n]["reduction"] for n in blocks}, {n: info[n]["num_chs"] for n in blocks})
        if conv1_padding is not None:
            net.conv1[0].padding = (conv1_padding, conv1_padding)
    elif name.startswith("timm:"):
        enc = copy.deepcopy(model.encoder)
        last = model.feature_info[-1]
        net = TransferNet(name, "L", [("encoder", _TimmTrunk(enc))], {"encoder": last["reduction"]},
                          {"encoder": last["num_chs"]})
    else:
        raise UserError(f"{what}: no transfer network for model '{name}' (alexnet_cc, zhang_vgg, timm:<name>)")
    if fc == "linear" and not net.has_fc:
        log.info("%s has no fc6/fc7: fc='linear' does not apply", name)
    return net


# torchvision module paths of the conv/linear layers, in stage order (the old classifier is dropped)
_TORCHVISION_LAYERS = {
    "alexnet": ["features.0", "features.3", "features.6", "features.8", "features.10", "classifier.1", "classifier.4"],
    "vgg16": [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)] + ["classifier.0", "classifier.3"],
}


def _from_supervised(spec: str, fc: str, conv1_padding: int | None) -> TransferNet:
    arch, _, weights = spec.partition(":")
    if arch not in SUPERVISED_ARCHS:
        raise UserError(f"supervised: architecture must be one of {SUPERVISED_ARCHS} (as NAME:WEIGHTS), got '{arch}'")
    if not weights:
        raise UserError(f"supervised: give the weights file, e.g. {arch}:/path/{arch}.pth (nothing is downloaded)")
    sd = load_checkpoint(weights, weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    fc7 = _TORCHVISION_LAYERS[arch][-1] + ".weight"
    if fc7 not in sd:
        raise UserError(f"{weights}: not a torchvision {arch} state dict (no '{fc7}')")
    fc_dim = int(sd[fc7].shape[0])
    net = (alexnet_transfer_net("alexnet", "rgb", fc, fc_dim, conv1_padding) if arch == "alexnet"
           else vgg16_transfer_net("rgb", fc, fc_dim, conv1_padding))
    convert_state_dict(sd, _stage_key_map(net, _TORCHVISION_LAYERS[arch]), net, f"{weights} ({arch})",
                       drop=("classifier.6.",))
    net.info.update(source="supervised", path=str(weights), model_name=arch)
    return net


@torch.no_grad()
def gaussian_init(net: TransferNet, generator: torch.Generator | None = None) -> None:
    """bvlc_reference_caffenet's fillers: conv N(0, 0.01), fc N(0, 0.005); biases conv 0/1/0/1/1, fc6/fc7 1."""
    bias = {"conv1": 0.0, "conv2": 1.0, "conv3": 0.0, "conv4": 1.0, "conv5": 1.0, "fc6": 1.0, "fc7": 1.0}
    for stage in net.stage_names:
        for m in getattr(net, stage).modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = 0.005 if stage.startswith("fc") else 0.01
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
                m.bias.fill_(bias.get(stage, 0.0))


def weight_layers(net: TransferNet, stages: list[str] | None = None) -> list[nn.Module]:
    """The conv/linear layers of ``stages`` (default: all), in order."""
    return [m for s in (stages or net.stage_names) for m in getattr(net, s).modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def _has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


class RescaleNet(nn.Module):
    """The network as the release's rescaling net (``train_val_nobn_rs.prototxt``): the trunk to fc7 (no dropout)
    and a random 1000-way 1x1 layer ``fc8_`` (N(0, 0.01), bias 1) on top, where the gradients are injected."""

    def __init__(self, net: TransferNet, generator: torch.Generator | None = None):
        super().__init__()
        self.net = net
        self.top = "fc7" if net.has_fc else net.stage_names[-1]
        cin = net.channels(self.top)
        self.fc8_ = nn.Linear(cin, 1000) if net.fc == "linear" else nn.Conv2d(cin, 1000, 1)
        with torch.no_grad():
            self.fc8_.weight.copy_(torch.randn(self.fc8_.weight.shape, generator=generator) * 0.01)
            self.fc8_.bias.fill_(1.0)
        self.to(next(net.parameters()).device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8_(self.net.forward_features(x, until=self.top))


def rescale_backbone(net: TransferNet, x: torch.Tensor, seed: int = 0, tol: float = 0.01,
                     max_rounds: int = 10, rescale_net: RescaleNet | None = None) -> list[float] | None:
    """magic_init's between-layer rescaling of ``net`` in place on the network input ``x`` (``net.prepare(rgb)``),
    as the release's ``postprocess_model.sh`` (``magic_init_mod.py -cs``). Returns the final gradient ratios
    (``pretext.init.between_layer_rescale``), or None when skipped (BatchNorm: the ratios would not be those of the
    network that is fine-tuned). ``rescale_net``: the :class:`RescaleNet` to use (default: a new one from
    ``seed``; given, its rescaled top stays inspectable)."""
    if _has_batchnorm(net):
        log.info("rescaling skipped: %s has BatchNorm layers (the release rescaled the BN-free AlexNet)", net.arch)
        net.info["rescale"] = "skipped (BatchNorm)"
        return None
    from pretext.init import between_layer_rescale

    rs = rescale_net or RescaleNet(net, torch.Generator().manual_seed(seed))
    layers = weight_layers(net, net.stage_names[: net.stage_names.index(rs.top) + 1]) + [rs.fc8_]
    ratios = between_layer_rescale(rs, x, forward=None, layers=layers, tol=tol, max_rounds=max_rounds, seed=seed)
    ratios = [float(r) for r in ratios]
    net.info["rescale"] = {"images": int(x.shape[0]), "ratios": ratios}
    return ratios


def _random(kind: str, input_kind: str, fc: str, conv1_padding: int | None, x: torch.Tensor | None,
            seed: int, fc_dim: int, device: torch.device) -> TransferNet:
    if kind not in RANDOM_INITS:
        raise UserError(f"random_init must be one of {RANDOM_INITS}, got '{kind}'")
    net = alexnet_transfer_net("alexnet_cc", input_kind, fc, fc_dim, conv1_padding)
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        gaussian_init(net, g)
        net.to(device)
    else:
        if x is None:
            raise UserError(f"random_init {kind} (data-dependent) needs images")
        from pretext.init import data_dependent_init

        net.to(device)
        mode = "gaussian" if kind == "dd_gaussian" else kind
        report = data_dependent_init(net, x, mode=mode, forward=None, rescale=True, layers=weight_layers(net), seed=seed)
        net.info["init_report"] = {"rounds": report["rounds"], "converged": report["converged"]}
    net.info.update(source="random", init=kind, seed=seed)
    return net


def build_backbone(checkpoint: str | None = None, random_init: str | None = None, supervised: str | None = None, *,
                   input: str = "gray", fc: str = "conv", conv1_padding: int | None = None,
                   images: torch.Tensor | None = None, rescale: bool = True, seed: int = 0,
                   fc_dim: int = 4096, device: torch.device | str | None = None) -> TransferNet:
    """Build the transfer network from exactly one source (see the module docstring).

    Args:
        checkpoint: pretext checkpoint path.
        random_init: ``gaussian`` | ``kmeans`` | ``pca`` | ``dd_gaussian`` (the colorization AlexNet geometry).
        supervised: ``alexnet:WEIGHTS`` | ``vgg16:WEIGHTS`` (torchvision state-dict file).
        input: ``gray`` | ``color``.
        fc: ``conv`` | ``linear`` (fc6/fc7 layout).
        conv1_padding: override conv1's padding (FCN: 100).
        images: RGB (B, 3, H, W) in [0, 1]: the real images for data-dependent init and rescaling.
        rescale: rescale a checkpoint's network on ``images`` (the release's post-processing).
        seed: seed of random weights and of the rescaling's injected gradients.
        fc_dim: fc6/fc7 width of a random network (a checkpoint or a supervised file brings its own).
        device: where the network is built and rescaled / initialised (default: the CPU).
    """
    given = [s for s in (checkpoint, random_init, supervised) if s]
    if len(given) != 1:
        raise UserError("give exactly one backbone source: checkpoint, random_init or supervised")
    if input not in INPUT_MODES:
        raise UserError(f"input must be one of {INPUT_MODES}, got '{input}'")
    if fc not in FC_LAYOUTS:
        raise UserError(f"fc must be one of {FC_LAYOUTS}, got '{fc}'")
    device = torch.device(device or "cpu")
    if images is not None:
        images = images.to(device)
    if checkpoint:
        net = _from_checkpoint(checkpoint, fc, conv1_padding).to(device)
        if input == "color":
            _replace_first_conv(net, _conv1_l_to_lab, "Lab")
        if rescale:
            if images is None:
                raise UserError("rescaling needs images (or turn it off: rescale=false)")
            with torch.no_grad():
                x = net.prepare(images)
            rescale_backbone(net, x, seed)
        else:
            net.info["rescale"] = "off"
    elif supervised:
        net = _from_supervised(supervised, fc, conv1_padding).to(device)
        if input == "gray":
            _replace_first_conv(net, _conv1_rgb_to_grey, "grey")
    else:
        kind = "L" if input == "gray" else "Lab"
        x = None
        if images is not None:
            with torch.no_grad():
                x = network_input(images, kind)
        net = _random(random_init, kind, fc, conv1_padding, x, seed, fc_dim, device)
    net.info["input"] = input
    return net


def describe(net: TransferNet) -> str:
    """One line: source, architecture, input, rescaling."""
    i = net.info
    src = {"checkpoint": f"colorization checkpoint {i.get('path')}", "supervised": f"supervised {i.get('model_name')} "
           f"({i.get('path')})", "random": f"random init ({i.get('init')})"}.get(i.get("source"), "?")
    rs = i.get("rescale")
    rs = f"rescaled on {rs['images']} images" if isinstance(rs, dict) else f"rescale {rs}" if rs else ""
    return f"{src}; {net.arch}, input {net.input_kind}{', ' + rs if rs else ''}"


def check_sources(rows, checkpoint: str | None, supervised: str | None, input: str, fc: str, seed: int) -> None:
    """Before anything is created: each row's backbone source (a pretext checkpoint for 'colorization', a torchvision
    weights file for 'supervised') is read and built once (no rescaling), so that an unreadable or unknown one is
    refused in one line. 'random' has nothing to read (its init is checked with the config)."""
    from pretext.runtime import held_logs

    for row in rows:
        if row == "random":
            continue
        src = dict(checkpoint=checkpoint if row == "colorization" else None,
                   supervised=supervised if row == "supervised" else None)
        with held_logs():  # what building says is said again when the run builds it
            build_backbone(**src, input=input, fc=fc, rescale=False, seed=seed, fc_dim=1)
