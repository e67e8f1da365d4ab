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
__all__ = ["IMAGE_EXTS", "UnreadableImage", "read_image", "to_rgb", "is_image_file", "list_images", "resize_shorter",
           "pil_to_tensor", "is_grey", "grey_mask", "DecodedImages", "ImageDataset", "train_transform",
           "eval_transform", "CropSampler", "resolve_decode", "TrainCrops", "batch_to_device"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm")


def is_image_file(p: str | os.PathLike) -> bool:
    return str(p).lower().endswith(IMAGE_EXTS)


def list_images(sources: str | os.PathLike | Sequence[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Expand files, folders (recursive), globs and list files (``.txt``: one path per line, relative paths are
    resolved against the list file's folder) into a sorted, de-duplicated list of image paths."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[Path] = []
    for src in sources:
        s = str(src)
        p = Path(s)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            out.extend(sorted(q for q in it if q.is_file() and is_image_file(q)))
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):
            for line in p.read_text().splitlines():
                line = line.strip().split()[0] if line.strip() else ""
                if line and not line.startswith("#"):
                    q = Path(line)
                    out.append(q if q.is_absolute() else p.parent / q)
        elif p.is_file():
            out.append(p)
        elif any(ch in s for ch in "*?["):
            out.extend(sorted(Path(q) for q in glob.glob(s, recursive=True) if is_image_file(q)))
        else:
            raise UserError(f"{s}: no such file or folder")
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


class TrainCrops(torch.utils.data.Dataset):
    """Training images as ``(image, ok, grey)``: ``image`` uint8 (3, size, size), the crop of
    :class:`CropSampler` decoded by :func:`~pretext.decode.decode_crop` (JPEG draft scale, one crop + resize).

    Items are ``(index, sample_seed)`` (the trainer's sampler; the RNG is seeded per sample, so a resumed run sees
    the same crops) or a plain index (current RNG). ``ok`` is False for an unreadable file (zero placeholder,
    one warning naming it); ``grey`` marks images with no colour. ``decode='gpu'``: JPEGs come back as
    :class:`~pretext.decode.EncodedCrop` for the device, collated by ``collate_fn`` into a ``JpegBatch``.
    """

    def __init__(self, paths: Sequence[Path], size: int, crop: str = "rrc", scale_min: float = 0.25,
                 decode: str = "cpu", draft: bool = True):
        if decode not in ("cpu", "gpu"):
            raise UserError(f"decode must be 'cpu' or 'gpu', got '{decode}'")
        self.paths, self.size, self.decode, self.draft = list(paths), size, decode, draft
        self.sampler = CropSampler(size, crop, scale_min)

    @property
    def collate_fn(self):
        return collate_encoded if self.decode == "gpu" else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            item, sample_seed = item
            # the CPU generator is all the crop draws use; torch.manual_seed would also queue a CUDA re-seed with
            # a captured stack trace on every call (milliseconds per sample in a loader worker)
            torch.default_generator.manual_seed(sample_seed)
        path = self.paths[item]
        try:
            if self.decode == "gpu":
                d = encode_crop(path, self.size, self.sampler)
                if isinstance(d, EncodedCrop):
                    return d, True, False  # grey is measured on the device after decoding
            else:
                d = decode_crop(path, self.size, self.sampler, draft=self.draft)
        except UnreadableImage as e:
            warnings.warn(str(e))
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False, False
        return d.image, True, d.grey


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
