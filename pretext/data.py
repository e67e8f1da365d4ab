"""Image sources for every entry point: folder trees (ImageNet / ImageFolder layout or flat), list files, globs.

Decoding is robust: EXIF orientation applied; grey, RGBA, palette, 16-bit and CMYK images converted to sRGB; an
unreadable file raises :class:`UnreadableImage` (one line naming the file and the reason), and datasets turn
that into a placeholder sample flagged ``ok=False`` so that a training run skips and counts it instead of
crashing.
"""
from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .runtime import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm")
Image.MAX_IMAGE_PIXELS = 40_000 * 40_000  # old scans are large; still refuse decompression bombs beyond this


class UnreadableImage(Exception):
    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


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


def to_rgb(img: Image.Image) -> tuple[Image.Image, Image.Image | None, bool]:
    """Convert any PIL mode to RGB. Returns (rgb, alpha or None, source_was_grey)."""
    alpha = None
    mode = img.mode
    grey = mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA"):
        alpha = img.getchannel("A")
        img = img.convert("RGB") if mode != "LA" else img.convert("L")
        mode = img.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr / peak * 255.0), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, HSV, ...
    return img, alpha, grey


def read_image(path: str | os.PathLike, keep_alpha: bool = False):
    """Decode an image file to an RGB PIL image with EXIF orientation applied.

    Returns the RGB image, or ``(rgb, alpha, was_grey)`` if ``keep_alpha``. Raises :class:`UnreadableImage`.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im) or im
                rgb, alpha, grey = to_rgb(im)
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except Image.DecompressionBombError:
        raise UnreadableImage(path, "image too large") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        reason = "not an image or corrupt" if "cannot identify" in str(e) else f"cannot decode ({str(e).splitlines()[0][:120]})"
        raise UnreadableImage(path, reason) from None
    if rgb.width == 0 or rgb.height == 0:
        raise UnreadableImage(path, "empty image")
    return (rgb, alpha, grey) if keep_alpha else rgb


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
    """True if an RGB image carries no colour (all channels equal within ``tol``)."""
    return bool(((rgb - rgb.mean(dim=0, keepdim=True)).abs().amax() <= tol).item())


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

