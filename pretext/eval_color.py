"""Score colorizations: ``crosschannel eval-color --checkpoint CKPT --data DIR -o report_dir``.

Every colour image is desaturated (only its L is kept), colorized, and compared with the original:

* Zhang et al. 2016, Table 1: AuC of the CMF of the per-pixel ab L2 error over thresholds 0..150 (normalised to
  100), and the class-rebalanced AuC (pixels weighted by 1 / prior of their ground-truth bin, lambda = 0; by default
  capped at 10 x the mean weight, a departure from the paper's uncapped weights that keeps one odd image from
  owning the score; ``--max-weight 0`` gives the paper's uncapped weights, ``--max-weight W`` another cap). The prior is that of the training data, not of the evaluated
  images: the checkpoint's (or its config's prior file), else the shipped one (``pretext/data/prior_sample.npz``),
  or ``--prior FILE``; ``--prior-source evaluated`` estimates it from the evaluated images as before (then one
  random-noise image among 45 photos gives its saturated bins a tiny prior and dominates the score). The report
  names the prior and the share of the weight carried by pixels of bins the prior considers rare;
* Larsson et al. 2016: PSNR of the 8-bit RGB result (peak 255), RMSE of ab (Lab units) and MSE of 8-bit RGB;
* optionally the top-1/top-5 accuracy of a classifier on ground-truth, grey and recolorized images of an
  ImageNet-layout folder (Zhang's "VGG Top-1" column);
* the same numbers for two baselines: all-gray (ab = 0) and random: as Zhang et al., the colours of a random
  training image (``--random-from DIR``, seeded), else those of another test image (a seeded derangement); the
  report says which. The random image's ab is resized to this image.

As the release (richzhang/colorization: ``train/readme`` evaluates at 256x256, ``colorizers/util.py`` +
``demo_release.py``): every model sees L resized to 256 x 256 (``--size``), its ab prediction is resized bilinearly
to the image and joined to the image's own L, and the RGB result (PSNR, MSE, classifier input, pictures) is Lab ->
sRGB with R, G, B clipped (``--gamut clip``; ``chroma`` keeps L exactly, as ``crosschannel colorize`` does). Errors
are measured at the full resolution of the image (after an optional ``--eval-size`` downscale). Each image weighs
the same in the CMF (its pixels count 1 / (H W)). AuC is the mean of the CMF over t = 0..150; the trapezoid rule
/ 150 is also in the report, and in its table where the two differ by more than 0.1.
Grey images are skipped (they have no colour to recover) and counted; unreadable ones are listed as failed.
Writes ``report.json`` (all numbers, curves, per-image scores), ``report.md`` (the papers' table), ``cmf.png``
(error CMF curves, model vs baselines) and ``best_worst.png`` (ground truth / grey / colorized).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .color import rgb_to_lab
from .data import DecodedImages, is_grey, list_images, pil_to_tensor, read_image, resize_shorter
from .data import UnreadableImage
from .encoding import SoftEncoder, gaussian_smooth_prior, load_bins
from .metrics import (
    MAX_THRESHOLD,
    RARE_FACTOR,
    ab_l2_error,
    auc_from_cmf,
    auc_trapezoid_from_cmf,
    cmf_from_histogram,
    error_bins,
    mean_finite_aware,
    mse,
    psnr_from_mse,
    rebalanced_cmf,
    rebalanced_weight_stats,
    rmse_ab,
    topk_correct,
)
from .predict import compose_rgb, predict_ab_lowres, resize_l, to_uint8
from .published import published
from .runtime import UserError, atomic_write_text, log, select_device, setup_logging

METHODS = ("model", "gray", "random")
DEFAULT_MAX_WEIGHT = 10.0  #: cap of the rebalancing weights (x their mean under the prior); the paper: uncapped
NETWORK_SIZE = 256  #: network input of every model (richzhang/colorization train/readme: "full 256x256 resolution")
AUC_SHOW_BOTH = 0.1  #: the table shows the trapezoid AuC too where it differs from the mean by more than this
PUBLISHED_BENCHMARK = "eval_color"
NT = MAX_THRESHOLD + 2  # histogram bins: ceil(err) = 0..150 and overflow
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def derangement_cycle(n: int, seed: int = 0) -> list[int]:
    """A seeded random cyclic order of ``range(n)``: image ``order[k]`` takes the ab of image ``order[k - 1]``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def derangement(n: int, seed: int = 0) -> list[int]:
    """Deterministic permutation without fixed points for n >= 2 (the random baseline's pairing): ``out[i]`` is
    the image whose ab image ``i`` receives. It is one cycle of :func:`derangement_cycle`."""
    order = derangement_cycle(n, seed)
    out = list(range(n))
    if n >= 2:
        for k, i in enumerate(order):
            out[i] = order[k - 1]
    return out


def _decode_eval(path, size: int, eval_size: int = 0):
    """Decode, optionally downscale, to Lab (in a loader worker); None for a grey image."""
    img = read_image(path, min_size=eval_size)  # JPEG draft decoding, never below ``eval_size``
    if eval_size and min(img.size) > eval_size:
        img = resize_shorter(img, eval_size)
    rgb = pil_to_tensor(img)
    if is_grey(rgb):
        return None, "grey"
    lab = rgb_to_lab(rgb)
    L = lab[:1]
    return dict(rgb8=to_uint8(rgb), L=L, ab=lab[1:], x=resize_l(L[None], size)[0]), None


def _decode_random_ab(candidates, eval_size: int = 0):
    """ab (2, H, W) of the first readable image among ``candidates`` (the random baseline's training image)."""
    for p in candidates:
        try:
            img = read_image(p, min_size=eval_size)  # decoded as the test images are
        except UnreadableImage:
            continue
        if eval_size and min(img.size) > eval_size:
            img = resize_shorter(img, eval_size)
        return dict(ab=rgb_to_lab(pil_to_tensor(img))[1:], path=str(p)), None
    return None, "no readable training image"


def random_training_picks(n: int, num_train: int, seed: int = 0, tries: int = 5) -> list[list[int]]:
    """For each of ``n`` test images, a seeded random training index and the next ``tries - 1`` as fallbacks."""
    first = torch.randint(num_train, (n,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return [[(r + m) % num_train for m in range(min(tries, num_train))] for r in first]


def _thumb(rgb8: torch.Tensor, h: int = 160) -> torch.Tensor:
    w = max(1, round(rgb8.shape[-1] * h / rgb8.shape[-2]))
    t = F.interpolate(rgb8[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    return t.round().to(torch.uint8)


def _classifier_input(rgb8: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Resize the shorter side to size*256/224, centre-crop ``size``, ImageNet-normalise: (3, size, size)."""
    x = rgb8[None].float() / 255.0
    H, W = x.shape[-2:]
    s = round(size * 256 / 224) / min(H, W)
    x = F.interpolate(x, size=(max(size, round(H * s)), max(size, round(W * s))), mode="bilinear", antialias=True,
                      align_corners=False)
    t, l = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., t:t + size, l:l + size]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


class _Scores:
    """Accumulators of one method: per-ground-truth-bin error histograms and per-image numbers."""

    def __init__(self, Q: int):
        self.Q = Q
        self.hist = torch.zeros(Q, NT, dtype=torch.float64)
        self.per_image: dict[int, dict] = {}

    def add(self, i: int, q: torch.Tensor, L, gt_ab, gt8, ab, gamut: str) -> torch.Tensor:
        e = error_bins(ab_l2_error(ab, gt_ab))
        h = torch.bincount((q * NT + e).reshape(-1), minlength=self.Q * NT).view(self.Q, NT).double()
        self.hist += h / e.numel()
        out8 = to_uint8(compose_rgb(L, ab, gamut))
        m = mse(out8, gt8)
        self.per_image[i] = dict(auc=auc_from_cmf(cmf_from_histogram(h.sum(0))), rmse=rmse_ab(ab, gt_ab), mse=m,
                                 psnr=psnr_from_mse(m))
        return out8

    def summary(self, prior: torch.Tensor, max_weight: float | None = None) -> dict:
        if not self.per_image:
            return dict(auc=math.nan, auc_rebal=math.nan, auc_trapz=math.nan, auc_rebal_trapz=math.nan, psnr=math.nan,
                        rmse=math.nan, mse=math.nan, cmf=[], cmf_rebal=[])
        cmf = cmf_from_histogram(self.hist.sum(0))
        cmf_r = rebalanced_cmf(self.hist, prior, max_weight)
        vals = list(self.per_image.values())
        return dict(auc=auc_from_cmf(cmf), auc_rebal=auc_from_cmf(cmf_r), auc_trapz=auc_trapezoid_from_cmf(cmf),
                    auc_rebal_trapz=auc_trapezoid_from_cmf(cmf_r),
                    psnr=mean_finite_aware(v["psnr"] for v in vals), rmse=float(np.mean([v["rmse"] for v in vals])),
                    mse=float(np.mean([v["mse"] for v in vals])), cmf=cmf.tolist(), cmf_rebal=cmf_r.tolist())


@torch.inference_mode()
def evaluate(model: torch.nn.Module, target: str, bins: torch.Tensor | None, paths: Sequence[str | os.PathLike],
             prior_probs: torch.Tensor | str | None, size: int = NETWORK_SIZE,
             out_dir: str | os.PathLike | None = None,
             T: float = 0.38, device: str | torch.device = "cpu", *, prior_bins: torch.Tensor | None = None,
             prior_source: str | None = None, eval_size: int = 0, batch_size: int = 8, workers: int = 0, seed: int = 0,
             classifier: torch.nn.Module | None = None, labels: Sequence[int | None] | None = None,
             autocast_dtype: torch.dtype | None = None, gamut: str = "clip", channels_last: bool = False,
             num_show: int = 4, progress: bool = False, name: str = "model",
             random_from: Sequence[str | os.PathLike] | None = None,
             max_weight: float | None = DEFAULT_MAX_WEIGHT) -> dict:
    """Evaluate a colorizer on image files against the all-gray and random baselines (see the module docstring).

    Args:
        model, target, bins: the network and how to decode it (``pretext.targets``).
        paths: image files. prior_probs: (Q,) prior over ``prior_bins`` (default ``bins``) for the rebalanced
            AuC, named by ``prior_source``; None: the shipped prior (:func:`pretext.prior.load_shipped_prior`);
            ``"evaluated"``: computed from the evaluated images (their ground-truth ab, Gaussian-smoothed).
        max_weight: cap of the rebalancing weights 1 / p (normalised to mean 1 under the prior; default
            :data:`DEFAULT_MAX_WEIGHT`; None: uncapped, as the paper).
        size: network input size. eval_size: downscale images whose shorter side exceeds it (0: full size).
        classifier / labels: optional classifier (ImageNet-normalised 224 input) and per-path class indices.
        gamut: how RGB is formed ('clip': Lab -> sRGB clipped, as the release; 'chroma': chroma fitting).
        random_from: training images for the random baseline (None: another test image).
    Returns:
        dict with 'model', 'gray', 'random' (auc, auc_rebal, auc_trapz, auc_rebal_trapz, psnr, rmse, mse, cmf,
        cmf_rebal; plus top1/top5 with a classifier), 'ground_truth', 'num_images', 'failed', 'skipped_grey',
        'prior_source', 'rebalancing' (prior, cap, weight shares), 'random_source', 'auc_integration', 'gamut',
        'published', 'images' (with 'random_from').
    """
    from .prior import load_shipped_prior

    if isinstance(prior_probs, str) and prior_probs != "evaluated":
        raise UserError(f"prior '{prior_probs}': give probabilities, None (the shipped prior) or 'evaluated'")
    from_data = isinstance(prior_probs, str)
    if prior_probs is None:
        shipped = load_shipped_prior()
        prior_probs, prior_bins, prior_source = shipped["probs"], shipped["bins"], shipped["description"]
    if max_weight is not None and not (math.isfinite(max_weight) and max_weight > 0):
        raise UserError(f"max weight {max_weight}: must be > 0")
    device = torch.device(device)
    model = model.eval().to(device)
    bins_dev = bins.to(device) if bins is not None else None
    gt_bins = prior_bins if prior_bins is not None else (bins.cpu() if bins is not None else load_bins())
    gt_bins = torch.as_tensor(gt_bins, dtype=torch.float32)
    Q = gt_bins.shape[0]
    if not from_data and len(prior_probs) != Q:
        raise UserError(f"prior has {len(prior_probs)} probabilities but {Q} bins")
    enc = SoftEncoder(gt_bins, k=1)
    paths = [Path(p) for p in paths]
    n = len(paths)
    # process in the derangement's cyclic order: the random baseline of an image is the previous usable image's ab
    order = derangement_cycle(n, seed)
    scores = {m: _Scores(Q) for m in METHODS}
    gt_counts = torch.zeros(Q, dtype=torch.float64)
    failed, grey, images = [], [], {}
    acc = {m: {1: 0, 5: 0} for m in ("ground_truth", "gray", "model")}
    n_labelled = 0
    keep: list[tuple[float, str, list[torch.Tensor]]] = []  # (AuC, path, thumbnails) of the best/worst so far
    first = prev = prev_i = None  # (index, L, ab, q, rgb8) of the first usable image; the previous one's ab, index

    if classifier is not None:
        classifier = classifier.eval().to(device)
    decoded = DecodedImages([paths[i] for i in order], functools.partial(_decode_eval, size=size, eval_size=eval_size))
    loader = torch.utils.data.DataLoader(decoded, batch_size=max(1, batch_size), num_workers=workers, collate_fn=list)
    rand_batches = iter(())
    if random_from:
        train = [Path(p) for p in random_from]
        picks = random_training_picks(n, len(train), seed)
        rand = DecodedImages([tuple(train[k] for k in picks[i]) for i in order],
                             functools.partial(_decode_random_ab, eval_size=eval_size))
        rand_batches = iter(torch.utils.data.DataLoader(rand, batch_size=max(1, batch_size), num_workers=workers,
                                                        collate_fn=list))
    bar = tqdm(total=n, unit="img", desc="eval-color", disable=not progress)
    for batch in loader:
        rand_ab = {j: item for j, item, _ in next(rand_batches, [])}
        ok = []
        for j, item, reason in batch:
            i = order[j]
            if reason == "grey":
                grey.append(str(paths[i]))
            elif item is None:
                failed.append(f"{paths[i]}: {reason}")
                log.warning("skipped %s: %s", paths[i], reason)
            else:
                ok.append((i, dict(item, random=rand_ab.get(j))))
        bar.update(len(batch))
        if not ok:
            continue
        x = torch.stack([it["x"] for _, it in ok]).to(device)
        ab_low = predict_ab_lowres(model, x, target, bins_dev, T, autocast_dtype, channels_last).cpu()
        for j, (i, it) in enumerate(ok):
            L, gt_ab, gt8 = it["L"], it["ab"], it["rgb8"]
            H, W = L.shape[-2:]
            q = enc.nearest(gt_ab[None])[0]
            gt_counts += torch.bincount(q.reshape(-1), minlength=Q).double()
            ab = F.interpolate(ab_low[j:j + 1], size=(H, W), mode="bilinear", align_corners=False)[0]
            out8 = scores["model"].add(i, q, L, gt_ab, gt8, ab, gamut)
            gray8 = scores["gray"].add(i, q, L, gt_ab, gt8, torch.zeros_like(gt_ab), gamut)
            random_path = None
            if random_from:
                if it["random"] is not None:
                    random_path = it["random"]["path"]
                    rand = F.interpolate(it["random"]["ab"][None], size=(H, W), mode="bilinear", align_corners=False)[0]
                    scores["random"].add(i, q, L, gt_ab, gt8, rand, gamut)
            elif prev is None:
                first = (i, L, gt_ab, q, gt8)
            else:
                random_path = str(paths[prev_i])
                rand = F.interpolate(prev[None], size=(H, W), mode="bilinear", align_corners=False)[0]
                scores["random"].add(i, q, L, gt_ab, gt8, rand, gamut)
            prev, prev_i = gt_ab, i
            images[i] = dict(path=str(paths[i]), size=[W, H], random_from=random_path,
                             **{m: scores[m].per_image.get(i) for m in ("model", "gray")})
            if classifier is not None and labels is not None and labels[i] is not None:
                xs = torch.stack([_classifier_input(v) for v in (gt8, gray8, out8)]).to(device)
                logits = classifier(xs).float().cpu()
                lab = torch.full((3,), int(labels[i]))
                for r, m in enumerate(("ground_truth", "gray", "model")):
                    c = topk_correct(logits[r:r + 1], lab[r:r + 1])
                    acc[m][1] += c[1]
                    acc[m][5] += c[5]
                n_labelled += 1
            keep.append((scores["model"].per_image[i]["auc"], str(paths[i]), [_thumb(gt8), _thumb(gray8), _thumb(out8)]))
            if len(keep) > 4 * num_show:
                keep.sort(key=lambda r: r[0])
                keep = keep[:num_show] + keep[-num_show:]
    bar.close()
    if not random_from and first is not None and prev is not None and len(scores["model"].per_image) >= 2:
        i, L, gt_ab, q, gt8 = first  # close the cycle: the first image takes the last one's ab
        rand = F.interpolate(prev[None], size=tuple(L.shape[-2:]), mode="bilinear", align_corners=False)[0]
        scores["random"].add(i, q, L, gt_ab, gt8, rand, gamut)
        images[i]["random_from"] = str(paths[prev_i])
    n_ok = len(scores["model"].per_image)
    if n_ok == 0:
        raise UserError(f"no colour images to evaluate ({len(failed)} unreadable, {len(grey)} grey of {n})")
    for i in images:
        images[i]["random"] = scores["random"].per_image.get(i)

    if from_data:
        prior = gaussian_smooth_prior(gt_counts / gt_counts.sum(), gt_bins)
        prior_source = "computed from the evaluated images (--prior-source evaluated)"
    else:
        prior = torch.as_tensor(prior_probs, dtype=torch.float64)
        prior_source = prior_source or "given"
    result = {m: scores[m].summary(prior, max_weight) for m in METHODS}
    # the ground-truth mass per bin as the CMF counts it (every image weighs 1): where the rebalanced weight sits
    rebalancing = dict(prior=prior_source, max_weight=max_weight, rare_factor=RARE_FACTOR, num_bins=Q,
                       **rebalanced_weight_stats(scores["model"].hist.sum(1), prior, max_weight))
    rebalancing["top_bin_ab"] = gt_bins[rebalancing["top_bin"]].tolist()
    result["ground_truth"] = dict(auc=100.0, auc_rebal=100.0, auc_trapz=100.0, auc_rebal_trapz=100.0, psnr=math.inf,
                                  rmse=0.0, mse=0.0)
    if classifier is not None:
        for m in ("ground_truth", "gray", "model"):
            result[m]["top1"] = 100.0 * acc[m][1] / max(1, n_labelled)
            result[m]["top5"] = 100.0 * acc[m][5] / max(1, n_labelled)
        result["num_labelled"] = n_labelled
    random_source = (f"the colours of a random training image ({len(random_from)} in --random-from, seed {seed})"
                     if random_from else f"the colours of another test image (seeded derangement, seed {seed})")
    result.update(name=name, num_images=n_ok, failed=failed, skipped_grey=grey, prior_source=prior_source,
                  rebalancing=rebalancing,
                  size=size, eval_size=eval_size, temperature=T, seed=seed, gamut=gamut, random_source=random_source,
                  auc_integration="mean of the CMF at t = 0, 1, ..., 150 (151 samples) x 100; auc_trapz: trapezoid "
                                  "rule over [0, 150] / 150 x 100",
                  published=published(PUBLISHED_BENCHMARK), images=[images[i] for i in sorted(images)])
    if out_dir is not None:
        keep.sort(key=lambda r: r[0])
        best = keep[::-1][:num_show]
        worst = keep[:num_show] if len(keep) > num_show else []
        write_report(result, Path(out_dir), best, worst)
    return result


# --------------------------------------------------------------------------------------------- report
def _clean(o):
    """JSON without NaN/Infinity tokens: inf -> "inf", nan -> null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else (None if math.isnan(o) else ("inf" if o > 0 else "-inf"))
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}"


def _auc_differs(r: dict) -> bool:
    """Whether the mean-of-CMF and trapezoid AuCs of any row differ by more than :data:`AUC_SHOW_BOTH`."""
    for key in METHODS:
        m = r[key]
        for a, b in (("auc", "auc_trapz"), ("auc_rebal", "auc_rebal_trapz")):
            if m.get(b) is not None and not math.isnan(m[a]) and abs(m[a] - m[b]) > AUC_SHOW_BOTH:
                return True
    return False


RARE_SHARE_NOTE = 0.5  #: the report warns when rare bins carry more than this share of the rebalanced weight


def rebalancing_notes(r: dict) -> list[str]:
    """The report's lines on the rebalancing weights: cap, and how much weight pixels of rare bins carry."""
    rb = r.get("rebalancing")
    if not rb:
        return []
    cap = (f"capped at {rb['max_weight']:g} x the mean (--max-weight)" if rb.get("max_weight") is not None
           else "uncapped, as the paper (--max-weight 0)")
    lines = [f"Rebalancing weights 1 / p (normalised to 1 on average under the prior), {cap}. Rare bins (prior below "
             f"1 / ({rb['rare_factor']:g} x {rb['num_bins']} bins)) hold "
             f"{100 * rb['rare_mass_share']:.2f}% of the evaluated pixels and carry {100 * rb['rare_weight_share']:.1f}% "
             f"of the rebalanced weight; the heaviest bin (ab {rb['top_bin_ab']}) alone "
             f"{100 * rb['top_bin_weight_share']:.1f}%."]
    if rb["rare_weight_share"] > RARE_SHARE_NOTE:
        lines.append("**Note:** most of the rebalanced weight sits on pixels of colours the prior considers rare, so "
                     "the rebalanced AuC mostly measures those few pixels; compare with a prior of the training data "
                     "(--prior) or capped weights (--max-weight).")
    return lines


def published_table(rows: list[dict]) -> str:
    """Published figures of this protocol (``pretext/data/published.tsv``) as Markdown."""
    head = f"Published figures (pretext/data/published.tsv, benchmark `{PUBLISHED_BENCHMARK}`):"
    if not rows:
        return head + " none in the table (see PROVENANCE.md for the figures that could not be verified)."
    lines = [head, "", "| method | setting | metric | value | source |", "|---|---|---|---|---|"]
    lines += [f"| {p['method']} | {p['setting']} | {p['metric']} | {p['value']:.2f} | {p['source']} |" for p in rows]
    return "\n".join(lines)


def markdown_table(r: dict) -> str:
    """The papers' table: Zhang et al. Table 1 columns plus Larsson et al.'s PSNR / RMSE, published figures below."""
    cls = "top1" in r["model"]
    both = _auc_differs(r)
    head = "| Method | AuC non-rebal (%) | AuC rebal (%) |"
    sep = "|---|---:|---:|"
    if both:
        head += " AuC non-rebal, trapezoid (%) | AuC rebal, trapezoid (%) |"
        sep += "---:|---:|"
    head += " PSNR (dB) | RMSE (ab) | MSE (RGB, 8-bit) |"
    sep += "---:|---:|---:|"
    if cls:
        head += " Top-1 (%) | Top-5 (%) |"
        sep += "---:|---:|"
    rows = [head, sep]
    from_train = "random training image" in r.get("random_source", "")
    for key, label in (("ground_truth", "Ground truth"), ("gray", "Gray (ab = 0)"),
                       ("random", f"Random (ab of {'a random training' if from_train else 'another test'} image)"),
                       ("model", f"Ours ({r.get('name', 'model')})")):
        m = r[key]
        row = f"| {label} | {_fmt(m['auc'])} | {_fmt(m['auc_rebal'])} |"
        if both:
            row += f" {_fmt(m.get('auc_trapz'))} | {_fmt(m.get('auc_rebal_trapz'))} |"
        row += f" {_fmt(m['psnr'])} | {_fmt(m['rmse'])} | {_fmt(m['mse'], 1)} |"
        if cls:
            row += f" {_fmt(m.get('top1'), 1)} | {_fmt(m.get('top5'), 1)} |"
        rows.append(row)
    decoding = ("Lab -> sRGB with R, G, B clipped, as the release" if r.get("gamut", "clip") == "clip"
                else "Lab -> sRGB with chroma reduced into the gamut (L kept)")
    notes = [f"{r['num_images']} colour images ({len(r['skipped_grey'])} grey skipped, {len(r['failed'])} unreadable); "
             f"network input {r['size']}x{r['size']} (L resized), prediction resized to the image, T = "
             f"{r['temperature']}, errors at "
             + (f"shorter side <= {r['eval_size']} px." if r["eval_size"] else "full resolution."),
             f"RGB (PSNR, MSE, classifier, pictures): {decoding}.",
             f"Random baseline: {r.get('random_source', 'another test image')}.",
             f"Rebalanced AuC prior: {r['prior_source']}.",
             *rebalancing_notes(r),
             "AuC: area under the CMF of per-pixel ab L2 error, thresholds 0..150, normalised to 100 (Zhang et al. 2016), "
             "integrated as the mean of the CMF at t = 0, 1, ..., 150"
             + ("; the trapezoid rule / 150 differs by more than 0.1 here and is shown beside it." if both else
                " (the trapezoid rule / 150 is within 0.1 here; both are in report.json)."),
             "PSNR: 8-bit RGB, peak 255, mean over images; RMSE: ab in Lab units (Larsson et al. 2016)."]
    if cls:
        notes.append(f"Classifier accuracy over {r['num_labelled']} labelled images.")
    return ("\n".join(rows) + "\n\n" + "\n".join(notes) + "\n\n" + published_table(r.get("published", [])) + "\n")


def write_report(r: dict, out_dir: Path, best, worst) -> None:
    """report.json, report.md, cmf.png (matplotlib, without pyplot) and best_worst.png (PIL)."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(_clean(r), indent=1))
    atomic_write_text(out_dir / "report.md", f"# Colorization evaluation: {r.get('name', 'model')}\n\n" + markdown_table(r))

    t = np.arange(MAX_THRESHOLD + 1)
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "cmf", "non-rebalanced"), (axes[1], "cmf_rebal", "class-rebalanced")):
        for m, style in (("model", "-"), ("gray", "--"), ("random", ":")):
            if r[m].get(key):
                auc = r[m]["auc" if key == "cmf" else "auc_rebal"]
                ax.plot(t, np.asarray(r[m][key]) * 100, style, label=f"{m} (AuC {_fmt(auc)})")
        ax.set(xlabel="ab L2 error threshold", ylabel="pixels within threshold (%)", title=f"CMF, {title}",
               xlim=(0, MAX_THRESHOLD), ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.25)
    fig.savefig(out_dir / "cmf.png", dpi=100)

    rows = [("best", rec) for rec in best] + [("worst", rec) for rec in worst]
    if rows:
        _image_grid(rows).save(out_dir / "best_worst.png")


def _image_grid(rows, pad: int = 4, caption: int = 14) -> Image.Image:
    """Rows of (ground truth | grey input | colorized) thumbnails, each row captioned with its rank and AuC."""
    from PIL import ImageDraw

    widths = [sum(t.shape[-1] for t in rec[2]) + pad * (len(rec[2]) + 1) for _, rec in rows]
    row_h = max(rec[2][0].shape[-2] for _, rec in rows) + caption + pad
    canvas = Image.new("RGB", (max(widths), row_h * len(rows) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (kind, (auc, path, thumbs)) in enumerate(rows):
        y = k * row_h + pad
        draw.text((pad, y), f"{kind}: {Path(path).name}  AuC {auc:.1f}   (ground truth | grey | colorized)", fill="black")
        x = pad
        for t in thumbs:
            canvas.paste(Image.fromarray(t.permute(1, 2, 0).numpy()), (x, y + caption))
            x += t.shape[-1] + pad
    return canvas


# --------------------------------------------------------------------------------------------- CLI
def folder_labels(roots: Sequence[str], paths: Sequence[Path]) -> list[int | None]:
    """Class index of each image from an ImageNet-layout folder (ROOT/<class>/<image>): class folders named by
    integers give that index, otherwise the index in the sorted list of class folders (torchvision ImageFolder)."""
    labels: list[int | None] = []
    classes = {}
    for root in roots:
        r = Path(root)
        if r.is_dir():
            names = sorted(d.name for d in r.iterdir() if d.is_dir())
            numeric = bool(names) and all(re.fullmatch(r"\d+", d) for d in names)
            classes[r.resolve()] = {d: (int(d) if numeric else k) for k, d in enumerate(names)}
    for p in paths:
        parent = p.resolve().parent
        table = classes.get(parent.parent, {})
        labels.append(table.get(parent.name))
    return labels


def load_classifier(name: str, weights: str | None) -> torch.nn.Module:
    """A torchvision (``resnet50``) or timm (``timm:vgg16`` or any timm name) classifier with weights from a file."""
    import torchvision

    try:
        if name.startswith("timm:"):
            raise ValueError
        model = torchvision.models.get_model(name, weights=None)
    except ValueError:
        import timm

        try:
            model = timm.create_model(name.removeprefix("timm:"), pretrained=False)
        except Exception:  # noqa: BLE001 - timm raises RuntimeError for unknown names
            raise UserError(f"--classifier {name}: not a torchvision or timm model name") from None
    if weights is None:
        raise UserError("--classifier needs --classifier-weights (a state dict file); nothing is downloaded")
    if not Path(weights).is_file():
        raise UserError(f"{weights}: classifier weights not found")
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{weights}: weights do not fit classifier '{name}' ({str(e).splitlines()[0][:200]})") from None
    return model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("crosschannel eval-color", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="crosschannel checkpoint or official ECCV16 weights")
    p.add_argument("--data", required=True, nargs="+", help="image folder(s), files, globs or list files")
    p.add_argument("-o", "--output", default="eval_color", help="report folder")
    p.add_argument("--prior", default=None, metavar="FILE",
                   help="prior file from 'crosschannel prior' for the rebalanced AuC (default: see --prior-source)")
    p.add_argument("--prior-source", default="auto", metavar="SOURCE",
                   help="auto (default: --prior, else the checkpoint's training prior, else the shipped one) | "
                        "checkpoint | shipped | evaluated (estimated from the evaluated images, the old behaviour)")
    p.add_argument("--max-weight", type=float, default=DEFAULT_MAX_WEIGHT, metavar="W",
                   help=f"cap the rebalancing weights 1/p at W times their mean under the prior (default "
                        f"{DEFAULT_MAX_WEIGHT:g}; 0: uncapped, as the paper)")
    p.add_argument("--size", type=int, default=NETWORK_SIZE,
                   help=f"network input size, for every model (default {NETWORK_SIZE}, as the release evaluates)")
    p.add_argument("--random-from", default=None, nargs="+", metavar="DIR",
                   help="training images for the random baseline (default: another test image)")
    p.add_argument("--eval-size", type=int, default=0, help="downscale images to this shorter side first (0: full size)")
    p.add_argument("--temperature", type=float, default=0.38)
    p.add_argument("--max-images", type=int, default=0, help="evaluate at most N images (evenly spaced; 0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline's derangement")
    p.add_argument("--classifier", default=None, help="torchvision/timm model name for the classification column")
    p.add_argument("--classifier-weights", default=None, help="state dict of the classifier")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--gamut", choices=("clip", "chroma"), default="clip",
                   help="how RGB is formed: clip (Lab -> sRGB clipped, as the release) or chroma (keeps L)")
    p.add_argument("--no-progress", action="store_true")
    return p


PRIOR_SOURCES = ("auto", "checkpoint", "shipped", "evaluated")


def check_args(args) -> None:
    """Refuse bad values in one line before anything is loaded or any folder created."""
    from .colorize import SIZE_RANGE

    lo, hi = SIZE_RANGE
    if not lo <= args.size <= hi:
        raise UserError(f"--size {args.size}: the network input size must be between {lo} and {hi} pixels")
    if args.eval_size != 0 and not lo <= args.eval_size:
        raise UserError(f"--eval-size {args.eval_size}: must be 0 (full size) or at least {lo} pixels")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature}: must be >= 0 (0: the mode, 1: the mean, 0.38 as the paper)")
    for key, least in (("max_images", 0), ("workers", 0), ("batch_size", 1)):
        if getattr(args, key) < least:
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= {least}")
    if args.prior_source not in PRIOR_SOURCES:
        raise UserError(f"--prior-source {args.prior_source}: must be one of {', '.join(PRIOR_SOURCES)}")
    if args.prior and args.prior_source != "auto":
        raise UserError(f"--prior {args.prior} and --prior-source {args.prior_source}: give one of them")
    if not (math.isfinite(args.max_weight) and args.max_weight >= 0):
        raise UserError(f"--max-weight {args.max_weight}: must be >= 0 (a multiple of the mean weight; 0: uncapped)")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UserError(f"-o {args.output}: is a file, not a report folder")


def resolve_prior(args, col) -> tuple:
    """(probs or None or 'evaluated', bins or None, description) of ``--prior`` / ``--prior-source``."""
    from .prior import load_prior

    if args.prior:
        d = load_prior(args.prior)
        return d["probs"], d["bins"], f"{args.prior} (--prior)"
    if args.prior_source == "evaluated":
        return "evaluated", None, None
    if args.prior_source in ("auto", "checkpoint") and col.prior is not None:
        bins = col.bins.cpu() if col.bins is not None else None
        return col.prior, bins, f"the training prior stored in the checkpoint ({args.checkpoint})"
    if args.prior_source == "checkpoint":
        raise UserError(f"--prior-source checkpoint: {args.checkpoint} holds no prior; give --prior FILE")
    return None, None, None  # evaluate() loads the shipped prior and names it


def main(args) -> int:
    from .colorize import AMP, load_colorizer

    check_args(args)
    setup_logging()
    device = select_device(args.device)
    col = load_colorizer(args.checkpoint, device, channels_last=True)
    prior_probs, prior_bins, source = resolve_prior(args, col)
    paths = list_images(args.data)
    if not paths:
        raise UserError(f"{' '.join(args.data)}: no images found")
    if args.max_images and len(paths) > args.max_images:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, args.max_images)]
    classifier = labels = None
    if args.classifier:
        classifier = load_classifier(args.classifier, args.classifier_weights)
        labels = folder_labels(args.data, paths)
        if not any(v is not None for v in labels):
            raise UserError(f"{' '.join(args.data)}: no ImageNet-layout class folders (DATA/<class>/<image>) "
                            "for the classifier")
    random_from = list_images(args.random_from) if args.random_from else None
    if args.random_from and not random_from:
        raise UserError(f"--random-from {' '.join(args.random_from)}: no images found")
    r = evaluate(col.model, col.target, col.bins, paths, prior_probs, size=args.size, out_dir=args.output,
                 T=args.temperature, device=device, prior_bins=prior_bins, prior_source=source, eval_size=args.eval_size,
                 batch_size=args.batch_size, workers=args.workers, seed=args.seed, classifier=classifier, labels=labels,
                 autocast_dtype=AMP[args.amp], gamut=args.gamut, channels_last=col.channels_last,
                 progress=not args.no_progress, name=col.name, random_from=random_from, max_weight=args.max_weight or None)
    print(markdown_table(r))
    print(f"report -> {args.output}/report.md, report.json, cmf.png, best_worst.png")
    for f in r["failed"]:
        print(f"skipped {f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from .runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
