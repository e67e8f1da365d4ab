"""Image sources for every entry point: folder trees (ImageNet / ImageFolder layout or flat), list files, globs;
the datasets over them, and the training input pipeline.

Decoding (:mod:`pretext.decode`) is robust: an unreadable file raises :class:`UnreadableImage` (one line naming
the file and the reason), and datasets turn that into a placeholder sample flagged ``ok=False`` so that a
training run skips and counts it instead of crashing.

Training (:class:`TrainCrops`): the crop is drawn from the header's size with the same random calls as
:func:`train_transform`'s torchvision transforms, the JPEG is decoded at the largest draft scale that keeps the
crop at or above the output size, cropped and resized once, and handed over as uint8; :func:`batch_to_device`
moves the batch to the device and converts it there (``decode: gpu`` decodes the JPEGs there too).
"""
from __future__ import annotations

import glob
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .decode import (Crop, EncodedCrop, JpegBatch, UnreadableImage, collate_encoded, decode_crop, encode_crop,
                     gpu_decode_unavailable, is_grey_hwc, read_image, to_rgb)
from .runtime import UserError

# read_image, to_rgb and UnreadableImage live in pretext.decode and are re-exported here, where callers import them
__all__ = ["IMAGE_EXTS", "UnreadableImage", "read_image", "to_rgb", "is_image_file", "list_file_entry", "list_images",
           "resize_shorter", "pil_to_tensor", "is_grey", "grey_mask", "DecodedImages", "ImageDataset", "train_transform",
           "eval_transform", "CropSampler", "resolve_decode", "first_usable", "unreadable_reason", "TrainCrops",
           "batch_to_device"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm")


def is_image_file(p: str | os.PathLike) -> bool:
    return str(p).lower().endswith(IMAGE_EXTS)


def _inside(real: str, folders: Sequence[str]) -> bool:
    return any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def _walk_images(root: Path, recursive: bool, skip_real: Sequence[str] = ()) -> list[Path]:
    """Image files in ``root`` (and below, if ``recursive``), following directory symlinks. Each real folder is
    entered once (its realpath is remembered), so a symlink loop ends and a folder reached by two routes is listed
    once, by the route that comes first in name order. Folders whose realpath is in ``skip_real`` are not entered."""
    found: list[Path] = []
    visited = set(skip_real)
    stack = [root]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in visited or _inside(real, skip_real):
            continue
        visited.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            warnings.warn(f"{d}: cannot list ({e.strerror})")
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir():  # follows symlinks
                    subdirs.append(Path(e.path))
                elif is_image_file(e.name) and e.is_file():
                    found.append(Path(e.path))
            except OSError:  # a dangling or unreadable entry
                continue
        if recursive:
            stack.extend(reversed(subdirs))  # depth first, in name order
    return sorted(found)


def _component_regex(part: str) -> str:
    """One path component of a glob pattern as a regex (``*`` and ``?`` stay inside the component)."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        j = part.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif j > 0:
            body = part[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_images(pattern: str, skip_real: Sequence[str] = ()) -> list[Path]:
    """Image files matching a glob pattern, sorted. A pattern with ``**`` (any number of folders, including none) is
    matched while walking the folder before it with :func:`_walk_images` (symlinks followed, each real folder
    once), instead of :func:`glob.glob`, which follows symlink loops until the path is too long."""
    parts = Path(pattern).parts
    if "**" not in parts:
        return sorted(Path(q) for q in glob.glob(pattern) if is_image_file(q) and os.path.isfile(q))
    k = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:k]) if k else Path(".")
    rest = parts[k:]
    rx = "".join("(?:[^/]*/)*" if part == "**" else _component_regex(part) + ("/" if i < len(rest) - 1 else "")
                 for i, part in enumerate(rest))
    if rest[-1] == "**":
        rx += ".*"
    match = re.compile(rx).fullmatch
    return [q for q in _walk_images(base, True, skip_real) if match(q.relative_to(base).as_posix())]


#: a Caffe ImageData line: ``path label`` with the label an integer after whitespace (the path ends in an image suffix)
_CAFFE_LINE = re.compile(r"(.*\S)\s+-?\d+")


def list_file_entry(line: str) -> str | None:
    """The path of one line of a list file, or None for a blank line or a ``#`` comment.

    Format: one path per line, taken whole (spaces inside it are part of it; surrounding whitespace is dropped).
    Anything after a TAB is a label column (``path<TAB>label``) and ignored here. For Caffe's ImageData lists
    (``path label``, separated by a space), a line that does not end in an image suffix but reads
    ``<path with an image suffix> <integer>`` is taken as path and label."""
    line = line.split("\t", 1)[0].strip()
    if not line or line.startswith("#"):
        return None
    if not is_image_file(line):
        m = _CAFFE_LINE.fullmatch(line)
        if m and is_image_file(m.group(1)):
            return m.group(1)
    return line


def list_images(sources: str | os.PathLike | Sequence[str | os.PathLike], recursive: bool = True,
                exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Expand files, folders, globs and list files into a de-duplicated list of image paths (each source's images
    sorted; sources in the given order).

    * folders: recursive (``recursive=False``: that folder only), following directory symlinks with loop detection
      (every real folder is entered once);
    * list files (``.txt``, ``.lst``, ``.list``): one path per line (paths may contain spaces), relative paths
      resolved against the list file's folder; ``#`` starts a comment line; a label column may follow a TAB
      (``path<TAB>label``), and Caffe's ``path label`` lines are understood (see :func:`list_file_entry`);
    * globs (``*``, ``?``, ``[``; ``**`` recursive): image files that match, each real file once;
    * any other file: taken as an image.

    ``exclude``: folders never read from (e.g. an output folder inside an input folder): images inside them are
    dropped from folders, globs and list files alike.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    skip = [os.path.realpath(e) for e in exclude]
    out: list[Path] = []
    for src in sources:
        s = str(src)
        p = Path(s)
        if p.is_dir():
            out.extend(_walk_images(p, recursive, skip))
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):
            for line in p.read_text().splitlines():
                entry = list_file_entry(line)
                if entry is not None:
                    q = Path(entry)
                    out.append(q if q.is_absolute() else p.parent / q)
        elif p.is_file():
            out.append(p)
        elif glob.has_magic(s):
            out.extend(_glob_images(s, skip))
        else:
            raise UserError(f"{s}: no such file or folder")
    if skip:
        out = [q for q in out if not _inside(os.path.realpath(q), skip)]
    seen, uniq = set(), []
    for q in out:
        if q not in seen:
            seen.add(q)
            uniq.append(q)
    return uniq


def resize_shorter(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize so that the shorter side is ``size`` (aspect ratio kept, sides at least 1 pixel)."""
    s = size / min(img.size)
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), resample=resample)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 (3, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None].repeat(3, axis=2)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def is_grey(rgb: torch.Tensor, tol: float = 2.0 / 255.0) -> bool:
    """True if an RGB image (3, H, W) carries no colour (every channel within ``tol`` of the channels' mean;
    ``tol`` in [0, 1] units, also for uint8 images)."""
    if rgb.dtype == torch.uint8:
        if rgb.device.type == "cpu":
            return is_grey_hwc(rgb.permute(1, 2, 0).numpy(), tol * 255)
        return bool(grey_mask(rgb[None], tol)[0])
    return bool(((rgb - rgb.mean(dim=0, keepdim=True)).abs().amax() <= tol).item())


def grey_mask(rgb: torch.Tensor, tol: float = 2.0 / 255.0) -> torch.Tensor:
    """:func:`is_grey` of a uint8 batch (B, 3, H, W) -> bool (B,), in exact integer arithmetic:
    |x_c - mean| <= tol  <=>  |3 x_c - (r + g + b)| <= 3 * 255 * tol."""
    x = rgb.to(torch.int16)
    dev = (3 * x - x.sum(dim=1, keepdim=True)).abs_()
    return dev.flatten(1).amax(1) <= 3 * 255 * tol + 1e-6


class DecodedImages(torch.utils.data.Dataset):
    """Image files decoded in loader workers by ``decode(path)``, which returns ``(item, None)`` or ``(None, reason)``
    for a file to skip (e.g. ``"grey"``); an unreadable file gives ``(None, its reason)``. Items are
    ``(index, item or None, reason or None)``. ``decode`` must pickle (a module-level function or a partial of one)."""

    def __init__(self, paths: Sequence[Path], decode: Callable):
        self.paths, self.decode = list(paths), decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            item, reason = self.decode(self.paths[i])
        except UnreadableImage as e:
            return i, None, e.reason
        return i, item, reason


class ImageDataset(torch.utils.data.Dataset):
    """A list of image files; ``__getitem__`` returns ``(image, ok, grey)``.

    ``image`` is ``transform(PIL RGB)`` (a float tensor); ``ok`` is False for an unreadable file (then the
    image is a zero placeholder of ``placeholder_shape`` and the trainer skips it); ``grey`` marks images with
    no colour, which must not be used as colour targets.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable, placeholder_shape: tuple[int, ...]):
        self.paths = list(paths)
        self.transform = transform
        self.placeholder_shape = placeholder_shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = read_image(self.paths[i])
        except UnreadableImage as e:
            warnings.warn(str(e))
            return torch.zeros(self.placeholder_shape), False, False
        x = self.transform(img)
        return x, True, is_grey(x)


def train_transform(size: int, crop: str = "rrc", scale_min: float = 0.25):
    """Training augmentation: RandomResizedCrop (``rrc``) or resize-shorter-side + random crop
    (``resize_crop``, as in Zhang et al.: 256 then crop ``size``), plus horizontal flip; returns [0, 1] tensors."""
    from torchvision.transforms import v2 as T

    if crop == "rrc":
        geo = [T.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True)]
    elif crop == "resize_crop":
        geo = [T.Resize(int(round(size * 256 / 176)), antialias=True), T.RandomCrop(size)]
    else:
        raise UserError(f"crop must be 'rrc' or 'resize_crop', got '{crop}'")
    return T.Compose([*geo, T.RandomHorizontalFlip(), T.PILToTensor(), T.ToDtype(torch.float32, scale=True)])


def eval_transform(size: int, resize: int | None = None):
    """Resize the shorter side to ``resize`` (default size * 256/224) and centre-crop ``size``."""
    from torchvision.transforms import v2 as T

    return T.Compose([T.Resize(resize or int(round(size * 256 / 224)), antialias=True), T.CenterCrop(size),
                      T.PILToTensor(), T.ToDtype(torch.float32, scale=True)])


# --------------------------------------------------------------------------------------------- training pipeline
class CropSampler:
    """The training crop of an upright ``width`` x ``height`` image, drawn with torch's global RNG by the same calls
    in the same order as :func:`train_transform`'s torchvision transforms (``RandomResizedCrop.make_params`` or
    ``Resize`` + ``RandomCrop.make_params``, then ``RandomHorizontalFlip``), so that a per-sample seed picks the
    same crop and flip as those transforms would, without decoding the image first."""

    def __init__(self, size: int, crop: str = "rrc", scale_min: float = 0.25,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if crop not in ("rrc", "resize_crop"):
            raise UserError(f"crop must be 'rrc' or 'resize_crop', got '{crop}'")
        self.size, self.crop, self.scale, self.ratio = size, crop, (scale_min, 1.0), ratio
        self.resize = int(round(size * 256 / 176))  # the resize_crop mode's shorter side (256 for 176)
        # torchvision's float32 log-ratio bounds, as Python floats (the same values)
        self.log_ratio = tuple(float(v) for v in torch.log(torch.tensor(ratio)))
        # one-element buffers: the same draws from the generator as torch.empty(1).uniform_() / torch.randint(...,
        # size=(1,)) / torch.rand(1), without allocating tensors (which costs more than the draws themselves)
        self._f = torch.empty(1)
        self._i = torch.empty(1, dtype=torch.int64)

    def _rrc(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = height * width
        f, i64 = self._f, self._i
        for _ in range(10):
            target_area = area * f.uniform_(self.scale[0], self.scale[1]).item()
            aspect = f.uniform_(self.log_ratio[0], self.log_ratio[1]).exp_().item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = i64.random_(0, height - h + 1).item()
                j = i64.random_(0, width - w + 1).item()
                return i, j, h, w
        in_ratio = width / height  # fallback: central crop
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, width: int, height: int) -> Crop:
        S = self.size
        if self.crop == "rrc":
            i, j, h, w = self._rrc(width, height)
            box, clip = (j, i, j + w, i + h), True  # crop, then resize from the crop's pixels
        else:  # the shorter side resized to self.resize >= S (torchvision's rounding), then a random S x S crop
            short, long = min(width, height), max(width, height)
            new_long = int(self.resize * long / short)
            rw, rh = (self.resize, new_long) if width <= height else (new_long, self.resize)
            top = self._i.random_(0, rh - S + 1).item() if rh > S else 0
            left = self._i.random_(0, rw - S + 1).item() if rw > S else 0
            sx, sy = width / rw, height / rh  # the crop in the original's pixels (clamped: float rounding)
            box, clip = (left * sx, top * sy, min(width, (left + S) * sx), min(height, (top + S) * sy)), False
        flip = self._f.uniform_().item() < 0.5
        return Crop(box, flip, clip)


def resolve_decode(decode: str, device) -> str:
    """The decoder a run uses: ``cpu``, or ``gpu`` where CUDA and nvjpeg are there (else ``cpu``, one warning)."""
    if decode not in ("cpu", "gpu"):
        raise UserError(f"decode must be 'cpu' or 'gpu', got '{decode}'")
    if decode == "gpu":
        why = gpu_decode_unavailable(device)
        if why is not None:
            warnings.warn(f"decode: gpu {why}; decoding on the CPU loader workers instead", stacklevel=2)
            return "cpu"
    return decode


def first_usable(paths: Sequence[Path], colour: bool = True) -> tuple[int | None, dict]:
    """The index of the first image among ``paths`` that decodes (and, with ``colour``, has colour), decoding each
    at a small JPEG draft scale and stopping at the first success: cheap when the data are fine, a full pass only
    when nothing is usable. Returns ``(index or None, counts)`` with counts ``unreadable``, ``grey`` and
    ``example`` (the first unreadable file and its reason, or None)."""
    counts = dict(unreadable=0, grey=0, example=None)
    for i, p in enumerate(paths):
        try:
            img = read_image(p, min_size=32)
        except UnreadableImage as e:
            counts["unreadable"] += 1
            counts["example"] = counts["example"] or f"{p}: {e.reason}"
            continue
        if colour and is_grey(pil_to_tensor(img)):
            counts["grey"] += 1
            continue
        return i, counts
    return None, counts


def unreadable_reason(path) -> str:
    """Why ``path`` cannot be decoded (for the log), or that only some of its crops fail (a truncated file)."""
    try:
        read_image(path)
    except UnreadableImage as e:
        return e.reason
    return "some crops cannot be decoded (truncated or corrupt data)"


class TrainCrops(torch.utils.data.Dataset):
    """Training images as ``(image, ok, grey)``: ``image`` uint8 (3, size, size), the crop of
    :class:`CropSampler` decoded by :func:`~pretext.decode.decode_crop` (JPEG draft scale, one crop + resize).

    Items are ``(index, sample_seed)`` (the trainer's sampler; the RNG is seeded per sample, so a resumed run sees
    the same crops) or a plain index (current RNG). ``grey`` marks images with no colour. ``decode='gpu'``: JPEGs
    come back as :class:`~pretext.decode.EncodedCrop` for the device, collated by ``collate_fn`` into a
    ``JpegBatch``.

    Unreadable files: the sample is the next file in path order that decodes (index + 1, + 2, ..., wrapping), its
    crop drawn with the same sample seed, so the result depends on the item alone (exact resume, any number of
    workers) and no placeholder enters the network; ``ok`` is False only if no file at all decodes (a zero
    placeholder). Each unreadable file is marked in a bitmap shared with the loader workers: the main process
    reads it with :meth:`unreadable` / :meth:`report_unreadable` (distinct files) and restores it on resume with
    :meth:`restore_unreadable`.
    """

    def __init__(self, paths: Sequence[Path], size: int, crop: str = "rrc", scale_min: float = 0.25,
                 decode: str = "cpu", draft: bool = True):
        if decode not in ("cpu", "gpu"):
            raise UserError(f"decode must be 'cpu' or 'gpu', got '{decode}'")
        self.paths, self.size, self.decode, self.draft = list(paths), size, decode, draft
        self.sampler = CropSampler(size, crop, scale_min)
        self._unreadable = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()  # seen by every worker
        self._reported: set[int] = set()  # main process: files already logged

    @property
    def collate_fn(self):
        return collate_encoded if self.decode == "gpu" else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, sample_seed = item if isinstance(item, tuple) else (item, None)
        n = len(self.paths)
        for k in range(n):
            j = (index + k) % n
            if sample_seed is not None:
                # the CPU generator is all the crop draws use; torch.manual_seed would also queue a CUDA re-seed with
                # a captured stack trace on every call (milliseconds per sample in a loader worker)
                torch.default_generator.manual_seed(sample_seed)
            try:
                return self._load(j)
            except UnreadableImage:
                self._unreadable[j] = True  # a replacement follows; the main process logs the file once
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False, False

    def _load(self, index: int):
        path = self.paths[index]
        if self.decode == "gpu":
            d = encode_crop(path, self.size, self.sampler)
            if isinstance(d, EncodedCrop):
                return d, True, False  # grey is measured on the device after decoding
        else:
            d = decode_crop(path, self.size, self.sampler, draft=self.draft)
        return d.image, True, d.grey

    # ------------------------------------------------------------------ unreadable files (main process)
    def num_unreadable(self) -> int:
        """How many distinct files were found unreadable so far (by this process and its loader workers)."""
        return int(self._unreadable.sum())

    def unreadable(self) -> list[str]:
        """The files found unreadable so far, in path order (what a checkpoint stores)."""
        return [str(self.paths[i]) for i in self._unreadable.nonzero().flatten().tolist()]

    def restore_unreadable(self, paths: Sequence[str | os.PathLike]) -> None:
        """Mark the files of a checkpoint's :meth:`unreadable` list (already logged by the earlier run); paths no
        longer in the data are ignored."""
        where = {str(p): i for i, p in enumerate(self.paths)}
        for p in paths:
            i = where.get(str(p))
            if i is not None:
                self._unreadable[i] = True
                self._reported.add(i)

    def report_unreadable(self) -> list[tuple[Path, str]]:
        """Files found unreadable since the last call, each once, with its reason (re-read here, for the log)."""
        new = [i for i in self._unreadable.nonzero().flatten().tolist() if i not in self._reported]
        self._reported.update(new)
        return [(self.paths[i], unreadable_reason(self.paths[i])) for i in new]


def batch_to_device(rgb, ok: torch.Tensor, grey: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """A loader batch -> (float RGB in [0, 1] on ``device``, ok, grey): a uint8 batch is copied (non-blocking from
    pinned memory) and converted there; a ``JpegBatch`` (``decode: gpu``) is decoded and cropped there first."""
    if isinstance(rgb, JpegBatch):
        rgb, on_device, failed = rgb.decode(device)
        ok = ok & ~failed
        grey = torch.where(on_device, grey_mask(rgb).cpu(), grey)
    else:
        rgb = rgb.to(device, non_blocking=True)
    return rgb.float().div_(255.0), ok, grey
