"""What a colorization network predicts: one object per target, holding everything between ab and the loss.

``TARGETS`` maps a target name to its class. A target says

* ``out_channels``: how many channels the network's output has;
* ``model_input(rgb, lab)``: what the network sees (L by default; Larsson et al.'s grey input differs);
* ``valid(ab_t)``: which images count (the release's grey-image mask by default);
* ``encode(ab_t)``: what the loss compares the output with, from ab at the output's positions (a grid of
  subsampled pixels, or sampled points: the trainer decides where, see ``pretext.train.output_and_targets``);
* ``loss(out, encoded, mask)``: ``(loss to backprop, {name: scalar tensor to log})``;
* ``decode(out, T)``: the output -> an ab point estimate (B, 2, h, w) in Lab units.

A checkpoint records the target's name (and the bins for ``ab313``); :func:`get_target` rebuilds a target that can
decode, without the training-only settings (prior, loss options).

    target = TARGETS["ab313"](bins=load_bins(), class_weights=w)
    out = model(target.model_input(rgb, lab))
    loss, logs = target.loss(out, target.encode(ab_t), target.valid(ab_t))
"""
from __future__ import annotations

import torch

from . import hue_chroma
from .color import AB_SCALE
from .encoding import SoftEncoder, annealed_mean, load_bins, nongray_mask, pixel_weights, rebalance_weights
from .losses import l2_ab_loss, rebalanced_softmax_loss
from .runtime import UserError

__all__ = ["Target", "AB313", "L2", "HueChroma", "TARGETS", "get_target"]

GREY_THRESH = 5.0  #: |a| or |b| above which a target cell is coloured (``NonGrayMaskLayer``, thresh 5)


class Target:
    """Base class: the defaults every target shares. ``bins`` is only used by ``ab313``."""

    name = ""

    def __init__(self, bins: torch.Tensor | None = None, grey_thresh: float = GREY_THRESH, normalize: str = "batch"):
        self.bins = bins
        self.grey_thresh = float(grey_thresh)
        self.normalize = normalize

    @classmethod
    def from_config(cls, cfg, prior: dict | None) -> "Target":
        """Build from a ``PretextConfig`` (and the loaded prior, where the target uses one)."""
        return cls(grey_thresh=cfg.grey_thresh, normalize=cfg.loss_norm)

    @property
    def out_channels(self) -> int:
        raise NotImplementedError

    def model_kwargs(self, model_name: str) -> dict:
        """Builder arguments the target needs from the model (its output width)."""
        return {"out_dim": self.out_channels}

    def model_input(self, rgb: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """What the network sees: L (B, 1, H, W) in [0, 100]."""
        return lab[:, :1]

    def valid(self, ab_t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: images whose target has colour (the release's ``NonGrayMaskLayer`` on the subsampled ab)."""
        return nongray_mask(ab_t, self.grey_thresh)

    def encode(self, ab_t: torch.Tensor):
        return ab_t

    def loss(self, out: torch.Tensor, encoded, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def decode(self, out: torch.Tensor, T: float = 0.38) -> torch.Tensor:
        raise NotImplementedError


class AB313(Target):
    """Zhang et al.: a distribution over the quantised ab bins, soft-encoded targets, class rebalancing.

    Args:
        bins: (Q, 2) bin centres (default: the 313 of ``pts_in_hull.npy``).
        class_weights: (Q,) rebalancing weights (``rebalance_weights``), or None for the un-rebalanced loss.
        k, sigma: soft-encoding neighbours and Gaussian width (the release: 10 and 5, ``NNEncLayer``).
        normalize: ``"batch"`` (as released) or ``"pixel"``; see ``losses.rebalanced_softmax_loss``.
    """

    name = "ab313"

    def __init__(self, bins: torch.Tensor | None = None, class_weights: torch.Tensor | None = None, k: int = 10,
                 sigma: float = 5.0, grey_thresh: float = GREY_THRESH, normalize: str = "batch"):
        super().__init__(load_bins() if bins is None else torch.as_tensor(bins, dtype=torch.float32),
                         grey_thresh, normalize)
        self.class_weights = class_weights
        self.k, self.sigma = int(k), float(sigma)
        self._encoder: SoftEncoder | None = None  # built at the first encode (its tables take a moment)

    @classmethod
    def from_config(cls, cfg, prior: dict | None) -> "AB313":
        weights = None
        if cfg.loss == "rebal":
            if prior is None:
                raise UserError("loss 'rebal' needs a prior: run `crosschannel prior DATA -o prior.npz` and set "
                                "prior=prior.npz")
            weights = rebalance_weights(prior["probs"], cfg.lam, cfg.rebalance_mode)
        bins = prior["bins"] if prior is not None else None
        return cls(bins, weights, cfg.k, cfg.sigma, cfg.grey_thresh, cfg.loss_norm)

    @property
    def out_channels(self) -> int:
        return self.bins.shape[0]

    def encode(self, ab_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._encoder is None:
            self._encoder = SoftEncoder(self.bins, k=self.k, sigma=self.sigma)
        return self._encoder.to(ab_t.device)(ab_t.float())

    def loss(self, out, encoded, mask):
        idx, w = encoded
        pw = pixel_weights(self.class_weights, idx, w) if self.class_weights is not None else None
        loss, weighted = rebalanced_softmax_loss(out, idx, w, pw, mask, self.normalize)
        return loss, {"loss": loss.detach(), "loss_weighted": weighted}

    def decode(self, out, T=0.38):
        return annealed_mean(out, self.bins, T)


class L2(Target):
    """Zhang et al.'s regression baseline (eq. 1): ab / 110 predicted directly, Euclidean loss."""

    name = "l2"

    @property
    def out_channels(self) -> int:
        return 2

    def loss(self, out, encoded, mask):
        loss = l2_ab_loss(out, encoded, mask, self.normalize)
        return loss, {"loss": loss.detach()}

    def decode(self, out, T=0.38):
        return out.float() * AB_SCALE


class HueChroma(Target):
    """Larsson et al.'s hue / chroma histograms (``pretext.hue_chroma``); the temperature does not apply."""

    name = "hue_chroma"

    @property
    def out_channels(self) -> int:
        return hue_chroma.N_HUE + hue_chroma.N_CHROMA

    def model_kwargs(self, model_name: str) -> dict:
        kw = super().model_kwargs(model_name)
        if model_name == "vgg16_hypercolumn":
            kw["head"] = "hue_chroma"
        return kw

    def loss(self, out, encoded, mask):
        loss = hue_chroma.hue_chroma_loss(out, encoded, mask=mask)
        return loss, {"loss": loss.detach()}

    def decode(self, out, T=0.38):
        return hue_chroma.decode_ab(out.float())


TARGETS: dict[str, type[Target]] = {"ab313": AB313, "l2": L2, "hue_chroma": HueChroma}


def get_target(name: str, bins: torch.Tensor | None = None) -> Target:
    """A target able to decode (and encode) ``name``; ``bins`` for ``ab313`` (default: the 313 reference bins)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target '{name}' (expected one of {', '.join(TARGETS)})")
    return TARGETS[name](bins=bins)
