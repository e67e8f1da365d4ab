"""Colorize photographs: ``crosschannel colorize INPUT... -o OUT --checkpoint CKPT``.

Inputs are files, folders (recursive) or globs, in any common format and mode (grey, RGB, RGBA, palette, 16-bit,
CMYK; EXIF orientation applied). The network sees L resized to its input size; the predicted ab is resized back
bilinearly and combined with the *original* full-resolution L, so every output has its input's size and
lightness; alpha is kept where the output format has it. A folder is mirrored under OUT; a single input may be
written to an exact file name; the output format follows the output name; an input is never overwritten. Outputs
that exist are skipped (counted in the summary) unless ``--overwrite``; the output folder is never read as input
(an output folder inside an input folder is left out of it), and one run at a time writes into an output folder
(a :class:`~pretext.runtime.RunLock` on it: a second run is refused in one line naming the first). An unreadable
file gets one line on stderr and a non-zero exit code, the others are still done.

``--checkpoint`` takes a crosschannel checkpoint or the official released ECCV16 weights (a plain state dict with
keys ``model1.0.weight`` ... ``model8.6.weight``, ``model_out.weight``). ``--temperature`` is the annealed-mean
temperature relative to the logits the cross-entropy trained, for both: imported ECCV16 weights are converted to
those logits (``pretext.models.zhang_vgg.convert_eccv16_state_dict``) and decode by default at 1 / 2.606 = 0.3837,
which reproduces the official forward; crosschannel checkpoints at their training config's temperature (0.38).
From Python::

    from pretext.colorize import colorize
    out = colorize(Image.open("old.jpg"), checkpoint="colorization_release_v2-9b330a0b.pth")
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from .color import rgb_to_l
from .data import (
    DecodedImages,
    is_image_file,
    list_images,
    pil_to_tensor,
    read_image,
    to_rgb,
)
from .encoding import load_bins
from .predict import compose_rgb, predict_ab_lowres, prepare_model, resize_l, to_uint8
from .runtime import RunLock, UserError, atomic_write, load_checkpoint, select_device

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_ALPHA = {"JPEG", "MPO", "PPM", "PCX"}  # formats that cannot store an alpha channel
SUFFIX_MAP = {".pgm": ".ppm", ".gif": ".png"}  # grey-only / palette-only formats: write colour elsewhere


# --------------------------------------------------------------------------------------------- model
@dataclasses.dataclass
class Colorizer:
    """A model ready for inference plus what is needed to decode it."""
    model: torch.nn.Module
    target: str  # 'ab313' | 'l2' | 'hue_chroma'
    bins: torch.Tensor | None
    input_size: int
    device: torch.device
    kind: str  # 'crosschannel' | 'eccv16'
    name: str
    prior: torch.Tensor | None = None
    channels_last: bool = True
    temperature: float = 0.38  #: default annealed-mean temperature (--temperature overrides it)


def is_eccv16_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and "model_name" not in obj and any(str(k).startswith("model1.") for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def colorizer_from_object(obj: dict, device: torch.device | str = "cpu", source: str = "<checkpoint>",
                          channels_last: bool = True) -> Colorizer:
    """Build a :class:`Colorizer` from a loaded crosschannel checkpoint dict or an official ECCV16 state dict."""
    from .models import create_model, model_from_checkpoint

    device = torch.device(device)
    if isinstance(obj, dict) and "model_name" in obj and "model" in obj:
        try:
            model = model_from_checkpoint(obj)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            reason = str(e).splitlines()[0][:200]
            raise UserError(f"{source}: weights do not fit model '{obj['model_name']}' ({reason})") from None
        target = obj.get("target", "ab313")
        bins = obj.get("bins")
        bins = torch.as_tensor(bins, dtype=torch.float32) if bins is not None else (load_bins() if target == "ab313" else None)
        prior = obj.get("prior")
        prior = torch.as_tensor(prior, dtype=torch.float64) if prior is not None else None
        size = int(obj.get("input_size") or 256)
        kind, name = "crosschannel", obj["model_name"]
        temperature = float((obj.get("config") or {}).get("temperature", 0.38))
    elif is_eccv16_state_dict(obj):
        from .models.zhang_vgg import ECCV16_TEMPERATURE, eccv16_bins, load_eccv16_state_dict

        model = create_model("zhang_vgg", bn_affine=True)  # the port's BatchNorm layers are affine
        try:
            load_eccv16_state_dict(model, obj)
            bins = eccv16_bins(obj)
        except (KeyError, RuntimeError) as e:
            raise UserError(f"{source}: not the ECCV16 colorization weights ({str(e).splitlines()[0][:200]})") from None
        target, prior, size, kind, name = "ab313", None, 256, "eccv16", "zhang_vgg (ECCV16 release)"
        temperature = ECCV16_TEMPERATURE
    else:
        raise UserError(f"{source}: neither a crosschannel checkpoint (no 'model_name'/'model') "
                        f"nor the official ECCV16 weights (no 'model1.*' keys)")
    model = prepare_model(model, device, channels_last)
    bins = bins.to(device) if bins is not None else None
    return Colorizer(model, target, bins, size, device, kind, name, prior, channels_last, temperature)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, device: str, channels_last: bool) -> Colorizer:
    return colorizer_from_object(load_checkpoint(path, map_location="cpu"), device, path, channels_last)


def load_colorizer(path: str | os.PathLike, device: torch.device | str = "cpu", channels_last: bool = True) -> Colorizer:
    """Load (once; cached by path, modification time and device) a crosschannel checkpoint or ECCV16 weights."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: checkpoint not found")
    return _load_cached(str(p.resolve()), p.stat().st_mtime_ns, str(torch.device(device)), channels_last)


# --------------------------------------------------------------------------------------------- images
def _finish(L: torch.Tensor, ab_low: torch.Tensor, alpha: Image.Image | None, gamut: str) -> Image.Image:
    """Full-res L (1, H, W) + low-res ab (2, h, w) -> PIL RGB(A) at (W, H)."""
    L = L.to(ab_low.device)
    ab = F.interpolate(ab_low[None], size=tuple(L.shape[-2:]), mode="bilinear", align_corners=False)[0]
    rgb = compose_rgb(L, ab, gamut)
    arr = to_uint8(rgb).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if alpha is not None:
        img.putalpha(alpha)
    return img


def _prepare(rgb: Image.Image, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL RGB -> (L (1, H, W) at full resolution, L (1, size, size) for the network)."""
    L = rgb_to_l(pil_to_tensor(rgb))
    return L, resize_l(L[None], size)[0]


def colorize(image: Image.Image | str | os.PathLike, checkpoint: str | os.PathLike | Colorizer, *,
             size: int | None = None, temperature: float | None = None, device: str = "cpu", amp: str = "none",
             gamut: str = "chroma") -> Image.Image:
    """Colorize one image (PIL image of any mode, or a path) -> PIL image of the same size (RGBA if it had alpha).

    Args:
        checkpoint: path to a crosschannel checkpoint / ECCV16 weights, or a :class:`Colorizer`.
        size: network input size (default: the model's). temperature: annealed-mean T (default: the colorizer's,
            0.38 as in the paper, 1 / 2.606 for the ECCV16 release weights; see the module docstring).
        amp: 'none' | 'bf16' | 'fp16' autocast of the network. gamut: 'chroma' keeps L exactly, 'clip' as the demo.
    """
    col = checkpoint if isinstance(checkpoint, Colorizer) else load_colorizer(checkpoint, device)
    if isinstance(image, (str, os.PathLike)):
        rgb, alpha, _ = read_image(image, keep_alpha=True)
    else:
        img = ImageOps.exif_transpose(image) or image
        rgb, alpha, _ = to_rgb(img)
    L, x = _prepare(rgb, size or col.input_size)
    T = col.temperature if temperature is None else temperature
    ab_low = predict_ab_lowres(col.model, x[None].to(col.device), col.target, col.bins, T, AMP[amp], col.channels_last)
    return _finish(L, ab_low[0], alpha, gamut)


def _decode_input(path, size: int):
    """Decoding in a loader worker: (L at full resolution, L for the network, alpha or None)."""
    rgb, alpha, _ = read_image(path, keep_alpha=True)
    L, x = _prepare(rgb, size)
    return (L, x, alpha), None


def _pil_format(path: Path) -> str | None:
    return Image.registered_extensions().get(path.suffix.lower())


def save_image(img: Image.Image, path: Path) -> None:
    """Write in the format of the file name, atomically (a crash never leaves a half-written image)."""
    fmt = _pil_format(path)
    if fmt is None:
        raise ValueError(f"unknown image format '{path.suffix}'")
    if img.mode == "RGBA" and fmt in NO_ALPHA:
        img = img.convert("RGB")
    atomic_write(path, lambda f: img.save(f, format=fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {})))


def single_output_file(sources: list[str], out: str | os.PathLike) -> bool:
    """Whether OUT is one output file (one input image and OUT an image name that is not a folder)."""
    out = Path(out)
    return (len(sources) == 1 and Path(sources[0]).is_file() and is_image_file(sources[0]) and is_image_file(out)
            and not out.is_dir())


def plan_outputs(sources: list[str], out: str | os.PathLike, ext: str | None = None) -> list[tuple[Path, Path | None]]:
    """(input, output) pairs: a folder is mirrored under OUT, files and globs land in OUT by name, and a single
    input file goes exactly to OUT when OUT has an image suffix. ``ext`` forces the output format. A source that
    does not exist gets the output None (reported per file, like an unreadable one). The output folder is never
    read as input: images inside it (an output folder inside an input folder) are left out, and an input folder
    that is the output folder is refused."""
    out = Path(out)
    single_file = len(sources) == 1 and Path(sources[0]).is_file() and is_image_file(sources[0])
    exclude = [] if single_output_file(sources, out) else [out]
    for s in sources:
        if Path(s).is_dir() and out.exists() and os.path.realpath(s) == os.path.realpath(out):
            raise UserError(f"-o {out} is the input folder {s}: choose another output folder")
    pairs: list[tuple[Path, Path | None]] = []
    for s in sources:
        root = Path(s) if Path(s).is_dir() else None
        try:
            files = list_images([s], exclude=exclude)
        except UserError:
            pairs.append((Path(s), None))
            continue
        for f in files:
            if single_file and is_image_file(out) and not out.is_dir():
                pairs.append((f, out))
                continue
            rel = f.relative_to(root) if root is not None else Path(f.name)
            suffix = ext or SUFFIX_MAP.get(rel.suffix.lower(), rel.suffix)
            pairs.append((f, out / rel.with_suffix(suffix)))
    if not single_file and is_image_file(out) and not out.is_dir() and len(pairs) > 1 and any(o for _, o in pairs):
        raise UserError(f"{out}: {len(pairs)} inputs need an output folder, not a file name")
    return pairs


# --------------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("crosschannel colorize", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive), globs or list files")
    p.add_argument("-o", "--output", required=True, help="output folder, or a file name for a single input")
    p.add_argument("--checkpoint", required=True, help="crosschannel checkpoint or official ECCV16 weights (.pth)")
    p.add_argument("--temperature", type=float, default=None,
                   help="annealed-mean temperature (0: mode, 1: mean; default: the checkpoint's, 0.38 for crosschannel "
                        "runs, 1/2.606 for the ECCV16 release weights)")
    p.add_argument("--size", type=int, default=None, help="network input size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=sorted(AMP), default="none", help="reduced-precision network (bf16 on CPU/GPU)")
    p.add_argument("--gamut", choices=("chroma", "clip"), default="chroma",
                   help="out-of-gamut colours: reduce chroma (keeps L exactly) or clip RGB like the reference demo")
    p.add_argument("--ext", default=None, help="force the output format by suffix, e.g. .png")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that exist (default: skip them, counted in the summary)")
    p.add_argument("--no-progress", action="store_true")
    return p


SIZE_RANGE = (32, 2048)  #: accepted network input sizes (below: too little context; above: memory, not quality)


def check_args(args) -> None:
    """Refuse bad values in one line before anything is loaded or created."""
    lo, hi = SIZE_RANGE
    if args.size is not None and not lo <= args.size <= hi:
        raise UserError(f"--size {args.size}: the network input size must be between {lo} and {hi} pixels")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature}: must be >= 0 (0: the mode, 1: the mean, 0.38 as the paper)")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be >= 0 (0: decode in this process)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")


def main(args) -> int:
    check_args(args)
    ext = None if args.ext is None else ("." + args.ext.lstrip(".")).lower()
    if ext is not None and _pil_format(Path("x" + ext)) is None:
        raise UserError(f"--ext {args.ext}: unknown image format")
    pairs = plan_outputs(args.inputs, args.output, ext)
    if not pairs:
        raise UserError(f"{' '.join(args.inputs)}: no images found")
    device = select_device(args.device)
    col = load_colorizer(args.checkpoint, device)
    if single_output_file(args.inputs, args.output):
        return _colorize_all(args, pairs, col, device)
    # one run at a time per output folder: a second run gets one line naming the holder instead of interleaving
    with RunLock(args.output):
        return _colorize_all(args, pairs, col, device)


def _colorize_all(args, pairs, col: Colorizer, device) -> int:
    size = args.size or col.input_size
    failed: list[str] = []
    skipped = 0
    bar = tqdm(total=len(pairs), unit="img", desc="colorize", disable=args.no_progress or len(pairs) < 2, file=sys.stderr)

    def fail(path, reason):
        failed.append(str(path))
        tqdm.write(f"{path}: {reason}", file=sys.stderr)
        bar.update(1)

    inputs = {f.resolve() for f, _ in pairs}
    todo, seen = [], {}
    for f, o in pairs:
        key = o.resolve() if o is not None else None
        if o is None:
            fail(f, "no such file or folder")
        elif key in inputs:
            fail(f, f"output {o} would overwrite an input; choose another -o")
        elif _pil_format(o) is None:
            fail(f, f"output {o}: unknown image format (use --ext)")
        elif key in seen:
            fail(f, f"output {o} is also the output of {seen[key]}; skipped")
        elif o.exists() and not args.overwrite:
            skipped += 1
            bar.update(1)
        else:
            seen[key] = f
            todo.append((f, o))

    inputs = DecodedImages([f for f, _ in todo], functools.partial(_decode_input, size=size))
    loader = torch.utils.data.DataLoader(inputs, batch_size=max(1, args.batch_size),
                                         num_workers=args.workers, collate_fn=list)
    t0, done = time.time(), 0
    for batch in loader:
        ok = []
        for i, item, reason in batch:
            (ok.append((i, item)) if item is not None else fail(todo[i][0], reason))
        if not ok:
            continue
        x = torch.stack([it[1] for _, it in ok]).to(device)
        T = col.temperature if args.temperature is None else args.temperature
        ab_low = predict_ab_lowres(col.model, x, col.target, col.bins, T, AMP[args.amp], col.channels_last)
        for j, (i, (L, _, alpha)) in enumerate(ok):
            src, dst = todo[i]
            try:
                save_image(_finish(L, ab_low[j], alpha, args.gamut), dst)
            except (OSError, ValueError) as e:
                fail(src, f"cannot write {dst} ({str(e).splitlines()[0][:160]})")
                continue
            done += 1
            bar.update(1)
    bar.close()
    dt = time.time() - t0
    notes = ([f"{skipped} skipped: output exists, --overwrite replaces"] if skipped else []) + (
        [f"{len(failed)} failed"] if failed else [])
    print(f"colorized {done}/{len(pairs)} images in {dt:.1f}s -> {args.output}"
          + (f" ({'; '.join(notes)})" if notes else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    from .runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
