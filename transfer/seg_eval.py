"""Semantic segmentation scores as shelhamer/fcn.berkeleyvision.org ``score.py`` computes them, and the stand-alone
scorer over prediction PNGs::

    crosschannel transfer seg-eval --pred preds/ --gt VOCdevkit/VOC2011/SegmentationClass --list seg11valid

One confusion matrix ``hist`` (rows: ground truth, columns: prediction) is summed over the whole split; pixels whose
ground truth is not a class index (255 = void) are left out. From it (score.py ``do_seg_tests``):

* pixel accuracy ``diag.sum() / hist.sum()`` (score.py's "overall accuracy");
* per-class accuracy ``diag / hist.sum(1)`` and its nanmean over the classes present in the ground truth;
* per-class IoU ``diag / (hist.sum(1) + hist.sum(0) - diag)``: NaN for a class absent from both prediction and truth,
  0 for a class predicted but absent from the truth; mean IoU is their nanmean;
* frequency-weighted IoU ``sum(freq * iu)`` over the classes with ``freq = hist.sum(1) / hist.sum() > 0``.

The same function scores the native trainer, the mmsegmentation engine and the PNG folders, so their numbers agree.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pretext.runtime import UserError, atomic_write_text, log

from .voc import NUM_SEG_CLASSES, VOC_CLASSES, VOID, read_ids, read_mask

SEG_CLASSES = ("background",) + VOC_CLASSES
BENCHMARK = "voc_seg11valid"  #: published.tsv benchmark of the FCN / Zhang Table 2 protocol


# --------------------------------------------------------------------------------------------- scores
def confusion(gt: torch.Tensor | np.ndarray, pred: torch.Tensor | np.ndarray, n: int = NUM_SEG_CLASSES) -> torch.Tensor:
    """(n, n) int64 confusion matrix of one image or a batch (any matching shapes), rows = ground truth.

    Ground-truth values outside ``0..n-1`` (void) are skipped; predictions must be in ``0..n-1``. Runs on the
    tensors' device (one ``bincount``)."""
    gt, pred = torch.as_tensor(gt), torch.as_tensor(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {tuple(gt.shape)} and prediction {tuple(pred.shape)} differ in shape")
    gt, pred = gt.reshape(-1).long(), pred.reshape(-1).long().to(gt.device)
    k = (gt >= 0) & (gt < n)
    return torch.bincount(n * gt[k] + pred[k], minlength=n * n).reshape(n, n)


def scores(hist: np.ndarray | torch.Tensor, classes: tuple[str, ...] = SEG_CLASSES) -> dict:
    """score.py's figures from a confusion matrix (see the module docstring). Fractions in [0, 1]; classes with an
    undefined value (NaN) are reported as None."""
    h = np.asarray(torch.as_tensor(hist).cpu().numpy() if isinstance(hist, torch.Tensor) else hist, np.float64)
    if h.sum() == 0:
        raise UserError("no labelled pixels to score (every ground-truth pixel is void)")
    diag = np.diag(h)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_cls = diag / h.sum(1)
        iu = diag / (h.sum(1) + h.sum(0) - diag)
    freq = h.sum(1) / h.sum()
    nan_none = lambda a: {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, a)}  # noqa: E731
    return {
        "mIoU": float(np.nanmean(iu)),
        "pixel_acc": float(diag.sum() / h.sum()),
        "mean_acc": float(np.nanmean(acc_cls)),
        "fwIoU": float((freq[freq > 0] * iu[freq > 0]).sum()),
        "iou": nan_none(iu),
        "acc": nan_none(acc_cls),
        "classes_scored": int((~np.isnan(iu)).sum()),
        "pixels": int(h.sum()),
    }


# --------------------------------------------------------------------------------------------- PNG folders
def save_prediction(pred: np.ndarray, path: Path) -> None:
    """A (H, W) prediction as a VOC palette PNG (what score.py writes, with the VOC colours)."""
    from PIL import Image

    from .voc import voc_palette

    im = Image.fromarray(np.asarray(pred, np.uint8), mode="P")
    im.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def shipped_list(name: str) -> Path | None:
    """A split list shipped with the package (``transfer/data/<name>.txt``, e.g. seg11valid), or None."""
    from importlib import resources

    p = resources.files("transfer").joinpath(f"data/{name}.txt")
    return Path(str(p)) if p.is_file() else None


def resolve_list(spec: str) -> Path:
    """A list file path, or the name of a shipped list (``seg11valid``)."""
    p = Path(spec)
    if p.is_file():
        return p
    shipped = shipped_list(spec)
    if shipped is not None:
        return shipped
    raise UserError(f"{spec}: list file not found (give a file of image ids, or 'seg11valid')")


def score_folders(pred_dir: str | Path, gt_dir: str | Path, list_file: str | None = None,
                  n: int = NUM_SEG_CLASSES) -> tuple[np.ndarray, list[str]]:
    """Confusion matrix of ``pred_dir/<id>.png`` against ``gt_dir/<id>.png`` over the ids of ``list_file`` (default:
    every PNG in ``pred_dir``). One-line errors naming the file: a missing prediction or ground truth, sizes that
    differ, indices outside 0..n-1 (and 255 in the ground truth)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if (gt_dir / "SegmentationClass").is_dir():
        gt_dir = gt_dir / "SegmentationClass"
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise UserError(f"{d}: {what} folder not found")
    if list_file:
        ids = read_ids(resolve_list(list_file))
    else:
        ids = sorted(p.stem for p in pred_dir.glob("*.png"))
        if not ids:
            raise UserError(f"{pred_dir}: no prediction PNGs")
    hist = np.zeros((n, n), np.int64)
    for i in ids:
        pp, gp = pred_dir / f"{i}.png", gt_dir / f"{i}.png"
        if not pp.is_file():
            raise UserError(f"{pp}: prediction missing for listed image {i}")
        gt = read_mask(gp, num_classes=n)
        pred = read_mask(pp, (gt.shape[1], gt.shape[0]), num_classes=n)
        if (pred == VOID).any():
            raise UserError(f"{pp}: a prediction holds void ({VOID}) pixels; predictions are class indices 0..{n - 1}")
        hist += confusion(gt, pred, n).numpy()
    return hist, ids


# --------------------------------------------------------------------------------------------- reports
def published_mIoU(method: str, setting: str) -> float | None:
    from pretext.published import published

    rows = published(BENCHMARK, method=method, setting=setting, metric="mIU")
    return rows[0]["value"] if rows else None


def plot_iou(results: dict[str, dict], png: Path, title: str = "VOC segmentation: IoU per class") -> None:
    """Grouped bars: IoU per class (%) for each run, mean IoU in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    k = max(1, len(results))
    x = np.arange(len(SEG_CLASSES))
    for j, (name, r) in enumerate(results.items()):
        vals = [100 * (v or 0.0) for v in r["iou"].values()]
        ax.bar(x + (j - (k - 1) / 2) * 0.8 / k, vals, 0.8 / k, label=f"{name} (mIoU {100 * r['mIoU']:.1f})")
    ax.set_xticks(x, SEG_CLASSES, rotation=45, ha="right")
    ax.set(ylabel="IoU (%)", ylim=(0, 100), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _pct(v) -> str:
    return f"{100 * v:.1f}" if v is not None else "n/a"


def markdown(results: dict[str, dict], header: list[str]) -> str:
    """Summary table (ours beside the published mIU) and the IoU per class of each run."""
    md = [*header, "", "| run | mIoU (%) | published mIU (%) | pixel acc. (%) | mean acc. (%) | fwIoU (%) | images |",
          "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        pub = r.get("published_mIoU")
        md.append(f"| {name} | {_pct(r['mIoU'])} | {f'{pub:.1f}' if pub is not None else '-'} | {_pct(r['pixel_acc'])} "
                  f"| {_pct(r['mean_acc'])} | {_pct(r['fwIoU'])} | {r.get('images', '-')} |")
    md += ["", "## IoU per class (%)", "", "| class | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for c in SEG_CLASSES:
        md.append(f"| {c} | " + " | ".join(_pct(r["iou"][c]) for r in results.values()) + " |")
    return "\n".join(md) + "\n"


def write_report(out_dir: Path, results: dict[str, dict], header: list[str], extra: dict | None = None) -> None:
    """``results.json`` (``extra`` + runs), ``results.md`` and ``iou_per_class.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps({**(extra or {}), "runs": results}, indent=2))
    atomic_write_text(out_dir / "results.md", markdown(results, header))
    plot_iou(results, out_dir / "iou_per_class.png")


def plot_predictions(samples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], png: Path) -> None:
    """Rows of (image, ground truth, prediction) in VOC colours (void in its palette colour) for a few images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .voc import voc_palette

    if not samples:
        return
    pal = np.array(voc_palette(), np.uint8).reshape(256, 3)
    fig, axes = plt.subplots(len(samples), 3, figsize=(9, 2.8 * len(samples)), squeeze=False)
    for row, (name, rgb, gt, pred) in zip(axes, samples):
        for ax, im, title in zip(row, (rgb, pal[gt], pal[pred]), (name, "ground truth", "prediction")):
            ax.imshow(im)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- entry point
def main(args) -> int:
    hist, ids = score_folders(args.pred, args.gt, args.list)
    res = {**scores(hist), "images": len(ids), "hist": hist.tolist()}
    name = Path(args.pred).name or "predictions"
    if args.method:
        res["published_mIoU"] = published_mIoU(args.method, args.setting)
    print(f"{len(ids)} images, {res['pixels']} labelled pixels: mIoU {_pct(res['mIoU'])}, pixel accuracy "
          f"{_pct(res['pixel_acc'])}, mean accuracy {_pct(res['mean_acc'])}, fwIoU {_pct(res['fwIoU'])}")
    if args.out:
        write_report(Path(args.out), {name: res}, ["# VOC segmentation scores", "",
                     f"Predictions `{args.pred}` against `{args.gt}`" + (f" over `{args.list}`" if args.list else "")
                     + "; scored as fcn.berkeleyvision.org score.py (one confusion matrix over the split)."],
                     {"pred": str(args.pred), "gt": str(args.gt), "list": args.list})
        log.info("results: %s", Path(args.out) / "results.md")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("transfer.seg_eval", description="Score segmentation PNGs against VOC masks "
                                "(mean IoU, pixel accuracy, mean accuracy, fwIoU as fcn.berkeleyvision.org score.py).")
    p.add_argument("--pred", required=True, help="folder of <id>.png predictions (palette or 8-bit class indices)")
    p.add_argument("--gt", required=True, help="SegmentationClass/ folder (or the VOC year folder holding it)")
    p.add_argument("--list", help="file of image ids to score, or 'seg11valid' (default: every PNG in --pred)")
    p.add_argument("--out", "-o", help="write results.json, results.md and iou_per_class.png here")
    p.add_argument("--method", help="published.tsv method to set beside (e.g. zhang_alexnet_cc)")
    p.add_argument("--setting", default="gray", help="published.tsv setting (gray | color)")
    return p


if __name__ == "__main__":
    import sys

    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
