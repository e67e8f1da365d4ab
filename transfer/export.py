"""``crosschannel export``: a crosschannel network as a checkpoint for another framework.

    crosschannel export --format mmseg --checkpoint runs/alexnet_cc/checkpoint.pth -o alexnet_cc_mmseg.pth
    crosschannel export --format mmseg --checkpoint runs/seg/colorization/checkpoint.pth -o fcn_mmseg.pth

``mmseg``: the transfer backbone (``transfer.backbone``, BN folded, conv1 padded for FCN) with every key under the
``backbone.`` prefix, as mmsegmentation's ``init_cfg=dict(type='Pretrained', prefix='backbone.')`` and
``CrossChannelEncoder`` (``transfer.mmseg_backbone``) read it. From a ``transfer seg`` checkpoint the whole
fine-tuned FCN goes out: ``backbone.*`` and ``decode_head.conv_seg.*`` / ``decode_head.upscore.weight``
(``FCNCropHead``). The file holds tensors and plain containers only, so ``torch.load(weights_only=True)`` (mmengine's
default loader under torch >= 2.6) reads it; ``meta.crosschannel.spec`` describes the network's structure
(:func:`backbone_spec`), which :func:`skeleton` rebuilds without weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn

from pretext.runtime import UserError, load_checkpoint, log, save_checkpoint

from .backbone import (
    INPUT_MODES,
    RANDOM_INITS,
    TransferNet,
    _conv1_l_to_lab,
    _replace_first_conv,
    alexnet_transfer_net,
    describe,
    transfer_net_from_model,
    vgg16_transfer_net,
)

FORMATS = ("mmseg",)
EXPORT_FORMAT = "crosschannel/mmseg-v1"


def _first_conv(net: TransferNet) -> nn.Conv2d | None:
    first = getattr(net, net.stage_names[0])
    return first[0] if isinstance(first, nn.Sequential) and isinstance(first[0], nn.Conv2d) else None


def backbone_spec(net: TransferNet) -> dict:
    """What :func:`skeleton` needs to rebuild ``net``'s structure: architecture, input kind, fc width, conv1 padding,
    pooling rounding and, for pretext models other than the AlexNet, the pretext model's name and arguments."""
    conv = _first_conv(net)
    return {"arch": net.arch, "input_kind": net.input_kind, "fc_dim": net.channels("fc7") if net.has_fc else 0,
            "conv1_padding": int(conv.padding[0]) if conv is not None else None,
            "model_name": net.info.get("model_name") if net.info.get("source") == "checkpoint" else None,
            "model_kwargs": dict(net.info.get("model_kwargs") or {}),
            "pool_ceil_mode": next((m.ceil_mode for m in net.modules() if isinstance(m, nn.MaxPool2d)), None),
            "reduction": net.reduction(net.stage_names[-1]), "num_features": net.num_features}


def skeleton(spec: dict) -> TransferNet:
    """An untrained network of the structure ``spec`` describes (:func:`backbone_spec`); load the weights after."""
    arch, kind, pad = spec["arch"], spec["input_kind"], spec.get("conv1_padding")
    if arch in ("alexnet_cc", "alexnet"):
        net = alexnet_transfer_net(arch, kind, "conv", spec["fc_dim"], pad)
    elif arch == "vgg16":
        net = vgg16_transfer_net(kind, "conv", spec["fc_dim"], pad)
    elif spec.get("model_name"):
        from pretext.models import create_model

        net = transfer_net_from_model(create_model(spec["model_name"], **spec.get("model_kwargs", {})),
                                      spec["model_name"], "conv", pad)
        if kind == "Lab":
            _replace_first_conv(net, _conv1_l_to_lab, "Lab")
    else:
        raise UserError(f"cannot rebuild a '{arch}' network from its spec {spec}")
    if net.input_kind != kind:
        raise UserError(f"rebuilt {arch} takes {net.input_kind} input, the spec says {kind}")
    if spec.get("pool_ceil_mode") is not None:  # FCN rounds pooled sizes up (transfer.fcn.fcn_backbone)
        for m in net.modules():
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = bool(spec["pool_ceil_mode"])
    return net


def _plain(obj):
    """Keep what ``torch.load(weights_only=True)`` accepts: dicts, lists, str, numbers, bool, None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def mmseg_state(net: TransferNet, head: dict[str, torch.Tensor] | None = None, source: dict | None = None) -> dict:
    """The mmseg checkpoint dict: ``state_dict`` (``backbone.*``, and ``decode_head.*`` from ``head``) and
    ``meta.crosschannel`` (format, spec, where the weights came from)."""
    sd = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    sd.update({f"decode_head.{k}": v.detach().cpu().contiguous() for k, v in (head or {}).items()})
    meta = {"crosschannel": {"format": EXPORT_FORMAT, "spec": backbone_spec(net), "source": _plain(source or net.info)}}
    return {"meta": meta, "state_dict": sd}


def load_export(path: str | Path) -> dict:
    """An export written by :func:`mmseg_state`, read with ``weights_only=True``; one-line error otherwise."""
    obj = load_checkpoint(path, weights_only=True)
    meta = (obj.get("meta") or {}).get("crosschannel") or {}
    if meta.get("format") != EXPORT_FORMAT or "state_dict" not in obj:
        raise UserError(f"{path}: not a crosschannel mmseg export (crosschannel export --format mmseg)")
    return obj


def load_backbone_weights(net: nn.Module, state: dict, path: str | Path, prefix: str = "backbone.") -> None:
    """Load the ``prefix`` keys of an export into ``net`` strictly; missing / unexpected keys are one line naming
    the file."""
    sd = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    target = net.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    wrong = [k for k in sd if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"{path}: the exported weights do not fit the network: missing {missing[:6]}, unexpected "
                        f"{unexpected[:6]}, shape mismatch {wrong[:6]}")
    net.load_state_dict(sd, strict=True)


def _from_seg_checkpoint(ckpt: dict, path: str) -> tuple[TransferNet, dict]:
    spec = ckpt.get("spec")
    if not spec:
        raise UserError(f"{path}: this segmentation checkpoint has no network spec (written by an older version)")
    net = skeleton(spec)
    net.info.update(ckpt.get("backbone_info") or {})
    model = ckpt["model"]
    load_backbone_weights(net, {"state_dict": model}, path)
    head = {"conv_seg.weight": model["score.weight"], "conv_seg.bias": model["score.bias"],
            "upscore.weight": model["upscore.weight"]}
    return net, head


def main(args) -> int:
    from .fcn import fcn_backbone
    from .seg_data import centre_crops
    from .segmentation import FORMAT as SEG_FORMAT

    out = Path(args.out)
    head, source = None, None
    if args.checkpoint and Path(args.checkpoint).is_file():
        ckpt = load_checkpoint(args.checkpoint)
        if ckpt.get("format") == SEG_FORMAT:
            net, head = _from_seg_checkpoint(ckpt, args.checkpoint)
            source = {"transfer_seg_checkpoint": str(args.checkpoint), "iter": ckpt.get("iter"),
                      "backbone": ckpt.get("backbone_info")}
        del ckpt
    if head is None:
        images = None
        if args.rescale_images:
            from pretext.data import list_images, pil_to_tensor, read_image

            files = list_images(args.rescale_images)[: args.num_images]
            images = centre_crops(pil_to_tensor(read_image(f)) for f in files)
        elif args.checkpoint:
            log.info("no --rescale-images: the checkpoint is exported without the release's rescaling")
        net = fcn_backbone(args.checkpoint, args.random_init, args.supervised, input=args.input, images=images,
                           rescale=images is not None, seed=args.seed, conv1_padding=args.conv1_padding)
    save_checkpoint(mmseg_state(net, head, source), out)
    log.info("%s: %s%s, %d tensors under backbone.%s", out, describe(net),
             "" if head is None else " + FCN head", len(net.state_dict()), "" if head is None else " and decode_head.")
    print(out)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("transfer.export", description="Export a crosschannel network for another "
                                "framework (mmsegmentation: keys under 'backbone.', weights_only-safe).")
    p.add_argument("--format", required=True, choices=FORMATS)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="pretext checkpoint, or a 'transfer seg' checkpoint (whole FCN)")
    src.add_argument("--random-init", choices=RANDOM_INITS, help="an untrained colorization AlexNet")
    src.add_argument("--supervised", help="alexnet:WEIGHTS | vgg16:WEIGHTS (torchvision state dict)")
    p.add_argument("--input", default="gray", choices=INPUT_MODES)
    p.add_argument("--conv1-padding", type=int, default=-1, help="-1: 100 for nets with fc6/fc7 (FCN), else none")
    p.add_argument("--rescale-images", help="images (folder, list or glob) for the release's rescaling")
    p.add_argument("--num-images", type=int, default=80, help="how many of them (default 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="output .pth")
    return p


if __name__ == "__main__":
    import sys

    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
