"""The frozen encoder of a probe: a colorization checkpoint, a random init, or a supervised ceiling.

A colorization model with a transfer export (the cross-channel AlexNet) is probed, by default, in the geometry
transfer uses (``geometry='transfer'``: BatchNorm folded, pool5 max 3/2, as the released linear test's net);
``geometry='pretext'`` probes the pretext network itself.

Colorization encoders see only L (computed on the device from the RGB batch with ``pretext.color.rgb_to_l``);
supervised torchvision/timm models see ImageNet-normalised RGB. Taps are read with forward hooks and the
forward pass stops as soon as the last requested tap has been computed (no fc6/fc7 work for conv taps).

The encoder is kept in eval mode (``train()`` is a no-op): BatchNorm statistics would otherwise drift with the
probe's data (MoCo's linear evaluation does the same). :func:`snapshot` / :func:`check_unchanged` prove that its
parameters and buffers are bit-identical after training.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from pretext.color import rgb_to_l
from pretext.models.alexnet_cc import export_alexnet_transfer
from pretext.runtime import UserError, load_checkpoint, load_config

GEOMETRIES = ("transfer", "pretext")
# pretext model name -> its transfer network (same weights, standard geometry)
TRANSFER_EXPORTS = {"alexnet_cc": export_alexnet_transfer}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision module paths of the taps named as in the papers (post-ReLU activations)
TORCHVISION_TAPS = {
    "alexnet": {"conv1": "features.1", "conv2": "features.4", "conv3": "features.7", "conv4": "features.9",
                "conv5": "features.11", "pool5": "features.12", "fc6": "classifier.2", "fc7": "classifier.5"},
    "vgg16": {"conv1": "features.3", "conv2": "features.8", "conv3": "features.15", "conv4": "features.22",
              "conv5": "features.29", "pool5": "features.30", "fc6": "classifier.1", "fc7": "classifier.4"},
}


class _StopForward(Exception):
    """Raised by the last tap's hook: the rest of the network is not needed."""


@dataclass
class EncoderSpec:
    """Where the encoder came from (stored in probe checkpoints and results)."""
    kind: str  # 'checkpoint' | 'random' | 'supervised'
    name: str
    source: str = ""
    label: str = ""
    extra: dict = field(default_factory=dict)


class FrozenEncoder(nn.Module):
    """Wrap a network: RGB batch (B, 3, H, W) in [0, 1] -> dict tap -> activation, no gradients, eval mode.

    Args:
        model: the network.
        taps: tap name -> submodule path (as in ``model.named_modules()``).
        input_mode: 'L' (colorization encoders) or 'rgb' (normalised with ``mean``/``std``).

    ``early_stop`` (default True) ends the forward pass at the last requested tap; False runs the whole
    ``forward_features`` (only useful to benchmark against naive per-layer runs).
    """

    def __init__(self, model: nn.Module, taps: dict[str, str], input_mode: str = "L",
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tap_modules = dict(taps)
        self.input_mode = input_mode
        self.early_stop = True
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        modules = dict(model.named_modules())
        missing = [m for m in self.tap_modules.values() if m not in modules]
        if missing:
            raise UserError(f"encoder has no module(s) {missing} for the requested taps")
        self._modules_by_tap = {t: modules[m] for t, m in self.tap_modules.items()}

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # frozen: BatchNorm keeps its pretrained statistics

    @property
    def taps(self) -> list[str]:
        return list(self.tap_modules)

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        if self.input_mode == "L":
            return rgb_to_l(rgb)
        return (rgb - self.mean) / self.std

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        wanted = list(taps or self.taps)
        out: dict[str, torch.Tensor] = {}
        handles = []
        for t in wanted:
            def hook(_m, _inp, output, t=t):
                out[t] = output
                if self.early_stop and len(out) == len(wanted):
                    raise _StopForward
            handles.append(self._modules_by_tap[t].register_forward_hook(hook))
        x = self.prepare(rgb)
        fn = getattr(self.model, "forward_features", self.model.forward)
        try:
            fn(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return {t: out[t] for t in wanted}

    @torch.no_grad()
    def tap_shapes(self, size: int) -> dict[str, tuple[int, ...]]:
        """Per-tap activation shape (without batch) for a ``size`` x ``size`` input."""
        p = next(iter(self.model.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        feats = self(torch.rand(1, 3, size, size, device=dev))
        return {t: tuple(v.shape[1:]) for t, v in feats.items()}


# --------------------------------------------------------------------------------------------- sanity check
def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer (by name), kept on the CPU (no accelerator memory held for the run)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict(keep_vars=True).items()}


def check_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Raise RuntimeError unless every parameter and buffer is bit-identical to ``before`` (MoCo's sanity check)."""
    now = module.state_dict(keep_vars=True)
    changed = [k for k in before if k not in now or now[k].shape != before[k].shape
               or not torch.equal(now[k].detach().cpu(), before[k])]
    changed += [k for k in now if k not in before]
    if changed:
        raise RuntimeError(f"frozen encoder changed during probe training ({len(changed)} tensors, e.g. "
                           f"{changed[:5]}): the probe results are invalid")


def fingerprint(module: nn.Module) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of all parameters and buffers (first 16 hex digits)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- builders
def _default_taps(model: nn.Module) -> list[str]:
    return [f["module"] for f in getattr(model, "feature_info", [])]


def _resolve_taps(requested: list[str], available: dict[str, str], what: str) -> dict[str, str]:
    unknown = [t for t in requested if t not in available]
    if unknown:
        raise UserError(f"{what}: unknown tap(s) {unknown}; available: {list(available)}")
    return {t: available[t] for t in requested}


def _load_weights(model: nn.Module, path: str) -> None:
    p = Path(path)
    sd = load_checkpoint(p, weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{p}: weights do not match the model ({str(e).splitlines()[0][:300]})") from None


def to_geometry(model: nn.Module, name: str, geometry: str) -> tuple[nn.Module, str]:
    """The network whose taps are probed: ``transfer`` turns a pretext model that has a transfer export (the
    cross-channel AlexNet: BatchNorm folded, pool5 max 3/2 as in the released feature_learning_tests/linear net)
    into that network; ``pretext`` keeps the pretext network. Returns (model, geometry actually used)."""
    if geometry not in GEOMETRIES:
        raise UserError(f"geometry must be one of {GEOMETRIES}, got '{geometry}'")
    export = TRANSFER_EXPORTS.get(name)
    if geometry == "pretext" or export is None:
        return model, "pretext"
    return export(model.eval()), "transfer"


def build_encoder(taps: list[str] | None, checkpoint: str | None = None, random_init: str | None = None,
                  supervised: str | None = None, model_kwargs: dict | None = None,
                  seed: int = 0, geometry: str = "transfer") -> tuple[FrozenEncoder, EncoderSpec]:
    """Build the frozen encoder from exactly one source.

    Args:
        taps: tap names (None: every tap of the model's ``feature_info``).
        checkpoint: a pretext checkpoint (``model_name``, ``model_kwargs``, ``model``).
        random_init: a registry model name, built with ``model_kwargs`` from seed ``seed``.
        supervised: ``NAME[:WEIGHTS]`` (torchvision) or ``timm:NAME[:WEIGHTS]``; WEIGHTS is a state-dict file
            (no downloads). Without WEIGHTS the model is randomly initialised (for tests only).
        geometry: for colorization encoders, ``transfer`` (default: the network transfer uses, see
            :func:`to_geometry`) or ``pretext``.
    """
    from pretext.models import create_model, model_from_checkpoint

    given = [s for s in (checkpoint, random_init, supervised) if s]
    if len(given) != 1:
        raise UserError("give exactly one encoder: --checkpoint PATH, --random-init MODEL or --supervised NAME[:WEIGHTS]")
    if checkpoint:
        ckpt = load_checkpoint(checkpoint)
        if "model_name" not in ckpt or "model" not in ckpt:
            raise UserError(f"{checkpoint}: not a pretext checkpoint (needs 'model_name' and 'model')")
        try:
            model = model_from_checkpoint(ckpt)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{checkpoint}: cannot rebuild {ckpt['model_name']} ({str(e).splitlines()[0][:300]})") from None
        step = ckpt.get("step")
        spec = EncoderSpec("checkpoint", ckpt["model_name"], str(checkpoint),
                           f"colorization ({ckpt['model_name']}{f', step {step}' if step is not None else ''})",
                           {"step": step, "target": ckpt.get("target")})
    elif random_init:
        torch.manual_seed(seed)
        try:
            model = create_model(random_init, **(model_kwargs or {}))
        except (ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"--random-init {random_init}: {e}") from None
        spec = EncoderSpec("random", random_init, "", f"random init ({random_init})", {"model_kwargs": model_kwargs or {}})
    else:
        return _build_supervised(supervised, taps, seed)
    model, spec.extra["geometry"] = to_geometry(model, spec.name, geometry)
    available = {t: t for t in _default_taps(model)}
    return FrozenEncoder(model, _resolve_taps(taps or list(available), available, spec.name), "L"), spec


def _build_supervised(spec_str: str, taps: list[str] | None, seed: int) -> tuple[FrozenEncoder, EncoderSpec]:
    s = spec_str
    is_timm = s.startswith("timm:")
    s = s.removeprefix("timm:").removeprefix("torchvision:")
    name, _, weights = s.partition(":")
    torch.manual_seed(seed)
    if is_timm:
        import timm

        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as e:
            raise UserError(f"--supervised timm:{name}: {e}") from None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        available = {t: t for t in _default_taps(model)}
    else:
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError as e:
            raise UserError(f"--supervised {name}: {e}") from None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        available = dict(TORCHVISION_TAPS.get(name, {}))
        available.update({n: n for n, _ in model.named_modules() if n and n not in available})
    if weights:
        _load_weights(model, weights)
    label = f"supervised ({name})" if weights else f"supervised architecture, random weights ({name})"
    spec = EncoderSpec("supervised", ("timm:" if is_timm else "") + name, weights, label)
    default = list(TORCHVISION_TAPS[name]) if (not is_timm and name in TORCHVISION_TAPS) else _default_taps(model)
    return FrozenEncoder(model, _resolve_taps(taps or default, available, name), "rgb", mean, std), spec


# --------------------------------------------------------------------------------------------- command line
_SOURCES = ("checkpoint", "random_init", "supervised")


def add_encoder_args(p) -> None:
    """The encoder source flags shared by ``linear_probe.train`` and ``linear_probe.svm`` (exactly one)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="pretext checkpoint to evaluate")
    src.add_argument("--random-init", dest="random_init", metavar="MODEL", help="a randomly initialised MODEL")
    src.add_argument("--supervised", metavar="NAME[:WEIGHTS]",
                     help="supervised ceiling: torchvision NAME or timm:NAME with a weights file")


# model_kwargs entries that size a layer: a typo such as fc_dim 40960000 would allocate tens of GB before failing
_LAYER_WIDTHS = ("fc_dim", "hidden", "out_dim", "n_hue", "n_chroma")
MAX_WIDTH = 65536
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_model_kwargs(kwargs: dict, key: str = "model_kwargs") -> None:
    """Refuse (one line) model_kwargs values that cannot build a network, before anything is allocated: every
    integer is a size or count (1 .. 2^20; layer widths such as fc_dim at most 65536), every float finite and
    >= 0 (dropout 0 is valid)."""
    for k, v in kwargs.items():
        name = f"config key '{key}.{k}'"
        if isinstance(v, bool) or v is None or isinstance(v, (str, list, tuple, dict)):
            continue
        if isinstance(v, int):
            hi = MAX_WIDTH if k in _LAYER_WIDTHS else 2 ** 20
            if not 1 <= v <= hi:
                raise UserError(f"{name}: must be an integer in 1..{hi}, got {v}")
        elif isinstance(v, float):
            if not math.isfinite(v) or v < 0:
                raise UserError(f"{name}: must be a finite number >= 0, got {v}")
            if k in _LAYER_WIDTHS:
                raise UserError(f"{name}: must be an integer, got {v}")


def check_device(name: str) -> None:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` (anything else is one line, not torch's traceback)."""
    if not _DEVICE.match(name or ""):
        raise UserError(f"config key 'device': must be auto, cpu, mps, cuda or cuda:N; got {name!r}")


def check_encoder_source(cfg) -> None:
    """Exactly one encoder source, valid model_kwargs and device (for the configs' ``validate()``)."""
    check_model_kwargs(dict(cfg.model_kwargs))
    check_device(cfg.device)


def load_encoder_config(cls, args):
    """Config from ``--config``/``--set``; an encoder source given on the command line replaces the config's."""
    overrides = list(args.overrides or [])
    for key in _SOURCES:
        value = getattr(args, key, None)
        if value:
            overrides += [f"{k}=" for k in _SOURCES if k != key] + [f"{key}={value}"]
    cfg = load_config(cls, args.config, overrides)
    if sum(bool(getattr(cfg, k)) for k in _SOURCES) != 1:
        raise UserError("give exactly one encoder: --checkpoint PATH, --random-init MODEL or --supervised NAME[:WEIGHTS]")
    return cfg
