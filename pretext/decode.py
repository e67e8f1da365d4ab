"""Image decoding: robust full decodes, and the fast crop decoder of the training pipeline (CPU and device).

Every file goes through here: EXIF orientation applied; grey, RGBA, palette, 16-bit and CMYK images converted to
sRGB; an unreadable file raises :class:`UnreadableImage` (one line naming the file and the reason).

Fast paths (the crop or the output size is known before decoding):

- :func:`read_image` with ``min_size``: a JPEG is decoded at the largest DCT-domain scale (PIL ``draft``: 1/2,
  1/4, 1/8) that keeps its shorter side at or above ``min_size`` (the caller resizes to that size anyway).
- :func:`decode_crop`: the crop is chosen from the header's size (``choose(width, height)``, on the upright
  image), the JPEG is decoded at the largest draft scale that keeps the crop at or above the output size (only
  the rows down to the crop, straight into torch memory), and one crop + resize (PIL's antialiased bilinear,
  computed by torch's uint8 kernel wherever a window reproduces PIL's grid: :func:`_axis_plan`) gives the
  uint8 output, a compact planar (3, size, size) tensor. Never less resolution than a full decode.
- :func:`encode_crop` + :class:`JpegBatch`: the ``decode: gpu`` path. Loader workers read the bytes and choose the
  crop from the header; the training process decodes the batch on the device (``torchvision.io.decode_jpeg``,
  nvjpeg on CUDA) and resamples the same crops with PIL's coefficients (:func:`resize_box`).
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image

Image.MAX_IMAGE_PIXELS = 40_000 * 40_000  # old scans are large; still refuse decompression bombs beyond this

DECODER = "pil-draft-1"  #: names the pixels this module produces (feature caches key on it); change with them
DRAFT_SCALES = (8, 4, 2, 1)  # the DCT-domain reductions libjpeg offers through PIL's Image.draft
_JPEG = ("JPEG", "MPO")
_ORIENTATION_TAG = 0x0112


class UnreadableImage(Exception):
    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@contextlib.contextmanager
def _reading(path):
    """Turn PIL's many exception types for bad files into one :class:`UnreadableImage` naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except UnreadableImage:
        raise
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except Image.DecompressionBombError:
        raise UnreadableImage(path, "image too large") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        reason = "not an image or corrupt" if "cannot identify" in msg else f"cannot decode ({msg})"
        raise UnreadableImage(path, reason) from None


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


# --------------------------------------------------------------------------------------------- orientation
# EXIF orientation -> the transpose that shows the stored pixels upright (as PIL.ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 when absent or unreadable)."""
    try:
        o = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make the pixels unreadable
        return 1
    return o if o in _UPRIGHT else 1


def upright_size(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of the upright image: orientations 5-8 swap the sides."""
    return (stored[1], stored[0]) if orientation >= 5 else stored


def box_to_stored(box: Sequence[float], upright: tuple[int, int], orientation: int) -> tuple[float, ...]:
    """A box (left, top, right, bottom) in the upright image -> the same pixels' box in the stored image."""
    W, H = upright
    x0, y0, x1, y1 = box
    if orientation == 2:
        return W - x1, y0, W - x0, y1
    if orientation == 3:
        return W - x1, H - y1, W - x0, H - y0
    if orientation == 4:
        return x0, H - y1, x1, H - y0
    if orientation == 5:
        return y0, x0, y1, x1
    if orientation == 6:
        return y0, W - x1, y1, W - x0
    if orientation == 7:
        return H - y1, W - x1, H - y0, W - x0
    if orientation == 8:
        return H - y1, x0, H - y0, x1
    return x0, y0, x1, y1


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Show stored pixels ``x`` (..., H, W) upright: the tensor form of PIL's exif_transpose."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return x.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return x.transpose(-2, -1).flip(-2)
    return x


# --------------------------------------------------------------------------------------------- draft decoding
def draft_scale(extent: float, size: float) -> int:
    """Largest DCT-domain reduction s in (8, 4, 2, 1) with ``extent / s >= size``: decoding at 1/s then keeps a
    region of ``extent`` pixels (its shorter side) at or above ``size`` pixels."""
    for s in DRAFT_SCALES:
        if extent >= s * size:
            return s
    return 1


def _draft(im: Image.Image, scale: int) -> int:
    """Ask libjpeg to decode ``im`` at 1/``scale`` (JPEG only). Returns the scale obtained (1 for other formats).
    Pixel ``i`` of the reduced image covers stored pixels ``[i * s, (i + 1) * s)``, so coordinates divide by s."""
    if scale == 1 or im.format not in _JPEG:
        return 1
    W, H = im.size
    res = im.draft(im.mode, (W // scale, H // scale))
    if res is None:  # not a single-tile JPEG
        return 1
    return int(round(W / res[1][2]))


_ROW_MARKS = ((1, 254, 3), (254, 1, 252))  # unlikely RGB values: sentinels in the last row to be decoded


def _map_tensor(im: Image.Image) -> torch.Tensor:
    """Give an RGB or L image, not yet loaded, torch memory as its pixel memory: the decoder writes straight into
    the returned uint8 (H, W, C) tensor (C = 4, PIL's RGBX pixels, or 1), which stays the image's memory."""
    w, h = im.size
    px = torch.empty((h, w, 1 if im.mode == "L" else 4), dtype=torch.uint8)
    im.im = Image.core.map_buffer(px.numpy(), (w, h), "raw", 0, (im.mode, 0, 1))
    return px


def _load_rows(im: Image.Image, rows: int, to_tensor: bool = False) -> Optional[torch.Tensor]:
    """Load ``im``, decoding only its first ``rows`` rows where that saves work (an RGB JPEG, ``rows`` < height).

    libjpeg produces scanlines top to bottom, so the rows below a crop cost no entropy decoding, IDCT or colour
    conversion: decode time falls in proportion. Pillow has no API for this: the tile's extent and the image size
    are cut, the same two fields ``Image.draft`` rewrites. libjpeg reports the unread rest as a broken stream, so
    two sentinel pixels in the last wanted row tell a finished decode (both overwritten) from a failed one.

    ``to_tensor``: an RGB or L JPEG is decoded into torch memory (:func:`_map_tensor`), returned (else None), so
    that the resampling reads its window with no copy."""
    w, h = im.size
    jpeg = im.format in _JPEG and len(im.tile) == 1
    if rows >= h or rows < 1 or not jpeg or im.mode != "RGB":
        px = _map_tensor(im) if to_tensor and jpeg and im.mode in ("RGB", "L") else None
        im.load()
        return px
    t = im.tile[0]
    ext = (t[1][0], t[1][1], t[1][2], t[1][1] + rows)
    im.tile = [t._replace(extents=ext) if hasattr(t, "_replace") else (t[0], ext, t[2], t[3])]
    im._size = (w, rows)
    px = _map_tensor(im) if to_tensor else None
    im.load_prepare()
    marks = [((0, rows - 1), _ROW_MARKS[0]), ((w - 1, rows - 1), _ROW_MARKS[1])]
    for xy, v in marks:
        im.im.putpixel(xy, v)
    try:
        im.load()
    except OSError:
        if all(im.im.getpixel(xy) == v for xy, v in marks):
            raise  # the wanted rows were not decoded: a broken or truncated file
    return px


def read_image(path, keep_alpha: bool = False, min_size: int = 0):
    """Decode an image file to an RGB PIL image with EXIF orientation applied.

    ``min_size`` > 0: the caller will resize the shorter side to ``min_size``, so a JPEG may be decoded at a draft
    scale (1/2, 1/4, 1/8) as long as its shorter side stays at or above ``min_size``; other formats decode fully.
    Returns the RGB image, or ``(rgb, alpha, was_grey)`` if ``keep_alpha``. Raises :class:`UnreadableImage`.
    """
    path = Path(path)
    with _reading(path):
        im = Image.open(path)
        try:
            o = exif_orientation(im)
            if min_size > 0:
                _draft(im, draft_scale(min(im.size), min_size))
            im.load()
            rgb, alpha, grey = to_rgb(im)
        except BaseException:
            im.close()
            raise
        if o != 1:
            rgb = rgb.transpose(_UPRIGHT[o])
            alpha = alpha.transpose(_UPRIGHT[o]) if alpha is not None else None
        if rgb is im and im.fp is not None:  # a multi-frame file keeps its handle open after load()
            rgb = im.copy()
        if rgb is not im:
            im.close()
    if rgb.width == 0 or rgb.height == 0:
        raise UnreadableImage(path, "empty image")
    return (rgb, alpha, grey) if keep_alpha else rgb


# --------------------------------------------------------------------------------------------- crop decoding
class Crop(NamedTuple):
    """A training crop of the upright image: ``box`` (left, top, right, bottom) in its pixels (fractional allowed);
    ``flip``: mirror the result; ``clip``: resample from the box's pixels only (crop then resize, as
    RandomResizedCrop) rather than with the whole image as support (resize then crop)."""
    box: tuple[float, float, float, float]
    flip: bool
    clip: bool


def _resample_box(box: Sequence[float], clip: bool, size: tuple[int, int]):
    """``clip``: (the whole pixels around ``box`` to cut first, ``box`` within them); else (None, ``box``)."""
    if not clip:
        return None, tuple(box)
    x0, y0, x1, y1 = box
    win = (max(0, math.floor(x0)), max(0, math.floor(y0)), min(size[0], math.ceil(x1)), min(size[1], math.ceil(y1)))
    return win, (x0 - win[0], y0 - win[1], x1 - win[0], y1 - win[1])


def is_grey_hwc(a: np.ndarray, tol: float = 2.0) -> bool:
    """True if uint8 RGB pixels (H, W, >= 3; a fourth channel is ignored) carry no colour: every channel within
    ``tol`` levels of the channels' mean (:func:`pretext.data.is_grey` on uint8), decided exactly and cheaply.
    Sparse samples first (one colourful pixel decides for most photographs: a few dozen read in Python, then a
    denser one), then the per-pixel channel spread max - min: above 2 tol some channel is more than tol from the
    mean (which lies between min and max), at most 1.5 tol none is; the pixels in between get the exact integer
    test |3 x_c - (r + g + b)| <= 3 tol."""
    for row in a[8::24, 8::24, :3].tolist():  # 7 x 7 pixels of a 176-px crop, read in Python: no array ops
        for r, g, b in row:
            if max(r, g, b) - min(r, g, b) > 2 * tol:
                return False
    v = a[::13, ::13, :3].astype(np.int16)
    if (np.abs(3 * v - v.sum(-1, keepdims=True)) > 3 * tol).any():
        return False
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    top = int(spread.max())
    if top > 2 * tol or top <= 1.5 * tol:
        return top <= 2 * tol
    v = a[spread > 1.5 * tol][:, :3].astype(np.int16)
    return not (np.abs(3 * v - v.sum(-1, keepdims=True)) > 3 * tol).any()


class DecodedCrop(NamedTuple):
    image: torch.Tensor  #: uint8 (3, size, size), upright
    grey: bool  #: :func:`is_grey_hwc` of the result
    crop: Crop
    scale: int  #: the draft scale the JPEG was decoded at (1: full)


def _pil_to_hwc(img: Image.Image, box: Optional[Sequence[int]] = None) -> torch.Tensor:
    """PIL L or RGB -> uint8 (H, W, C) in fresh torch memory, one copy: C = 1 for L, 4 for RGB (PIL's own 4-byte
    pixels, RGBX; callers take ``[..., :3]``). ``box``: only that window (whole pixels; outside the image: zeros).
    Pillow pastes straight into the tensor's memory (a mapped RGBX or L image): no intermediate bytes object."""
    x0, y0, x1, y1 = box if box is not None else (0, 0, *img.size)
    c, mode = (1, "L") if img.mode == "L" else (4, "RGBX")
    out = (torch.empty if box is None or (x0 >= 0 and y0 >= 0 and x1 <= img.width and y1 <= img.height)
           else torch.zeros)((y1 - y0, x1 - x0, c), dtype=torch.uint8)
    dst = Image.core.map_buffer(out.numpy(), (x1 - x0, y1 - y0), "raw", 0, (mode, 0, 1))
    dst.paste(img.im, (-x0, -y0, img.width - x0, img.height - y0))
    return out


def _nchw(hwc: torch.Tensor) -> torch.Tensor:
    """(H, W, C) -> (1, C, H, W) channels-last with the batch stride of a contiguous tensor: with another one
    (a size-1 dimension's stride is free), torch's uint8 kernel takes a slower path (a third slower)."""
    return hwc[None].permute(0, 3, 1, 2)


class _Axis(NamedTuple):
    """How torch's kernel reproduces PIL's resampling along one axis: the input window [lo, hi), read from its far
    end (``flip``), with ``scale`` source pixels per output; the wanted outputs follow ``skip`` others."""
    lo: int
    hi: int
    flip: bool
    scale: float
    skip: int = 0


_GRID_TOL = 1e-7  # a coordinate within this of a whole pixel is on it (the boxes are products of a few floats)


def _whole(v: float) -> bool:
    return abs(v - round(v)) <= _GRID_TOL * max(1.0, abs(v))


@functools.lru_cache(maxsize=1024)
def _grid_period(scale: float, limit: int = 64) -> int:
    """The fewest outputs p (<= ``limit``) whose span p * scale is whole pixels; 0 if none."""
    for p in range(1, limit + 1):
        if _whole(p * scale):
            return p
    return 0


def _axis_plan(b0: float, b1: float, size: int, extent: int = 0, far: bool = False) -> Optional[_Axis]:
    """Torch's antialiased kernel puts output centres at ``lo + scale (j + 0.5)``, anchored at its input window's
    start (or, reading the window from its far end, at ``hi``), and clips the filter at the window. None where no
    window reproduces PIL's pixels, or when upsampling (left to PIL).

    ``extent`` 0, crop then resize (RandomResizedCrop): PIL resamples ``[b0, b1)`` of the crop's pixels
    [floor b0, ceil b1) with centres ``b0 + scale (i + 0.5)``: the same grid when b0 is a whole pixel, or, read
    from the far end, when b1 is.

    ``extent`` > 0, resize then crop (PIL's ``resize(box=...)`` on an image of ``extent`` pixels, the filter
    clipped only at its borders): the box lies on a resize grid when ``b0 / scale`` is a whole number k of
    outputs (resize_crop's boxes: the 256-px grid), and every grid point ``g scale`` that is a whole pixel can
    anchor a window that reaches no less far than the wanted outputs' filters (0 always can: PIL clips there
    too). The kernel then computes the ``skip`` outputs between anchor and box as well; the nearest anchor is
    taken, before the box or (``far``: the image's far border is there, all of it decoded) after it."""
    scale = (b1 - b0) / size
    if scale < 1:
        return None
    if not extent:
        lo, hi = math.floor(b0), math.ceil(b1)
        if b0 != lo and b1 != hi:
            return None
        return _Axis(lo, hi, b0 != lo, scale)
    k = b0 / scale
    if not _whole(k):
        return None
    k = round(k)
    first = b0 + 0.5 * scale - scale + 0.5  # PIL's first tap of the first wanted output: int() of this
    last = b1 - 0.5 * scale + scale + 0.5  # and its tap end of the last: int() of this
    p = _grid_period(scale)
    g = 0  # forward anchor (output index): the largest grid point whose pixel is at or before the first tap
    if p and first >= 1:
        g = min(k, int(first / scale)) // p * p
        while g > 0 and not (_whole(g * scale) and round(g * scale) <= int(first)):
            g -= p
    best = _Axis(round(g * scale), min(extent, math.floor(last) + 1), False, scale, k - g)
    if far:
        G = extent / scale  # the far border, a grid point when extent / scale is whole
        if not _whole(G):
            G = -1
            if p:
                G = -(-math.ceil(last / scale) // p) * p
                while G * scale < extent and not (_whole(G * scale) and round(G * scale) >= int(last)):
                    G += p
                if G * scale > extent + _GRID_TOL:
                    G = -1
        G = round(G)
        if G >= 0 and G - k - size < best.skip:
            best = _Axis(max(0, math.floor(first) - 1), round(G * scale), True, scale, G - k - size)
    return best


def _kernel(x: torch.Tensor, ay: Optional[_Axis], ax: Optional[_Axis], size: int) -> torch.Tensor:
    """Torch's uint8 antialiased bilinear kernel on ``x`` (1, C, H, W) channels-last, a window already read from
    its far ends as the plans say: the axes with a plan (None: the axis is left as it is) resampled to ``skip +
    size`` outputs, the skipped ones dropped. Scales are explicit: the grid of the box, not of the window."""
    oh, sh = (ay.skip + size, 1 / ay.scale) if ay is not None else (x.shape[2], 1.0)
    ow, sw = (ax.skip + size, 1 / ax.scale) if ax is not None else (x.shape[3], 1.0)
    y = torch.ops.aten._upsample_bilinear2d_aa(x, [oh, ow], False, sh, sw)
    if ay is not None and ay.skip:
        y = y[:, :, ay.skip:]
    if ax is not None and ax.skip:
        y = y[:, :, :, ax.skip:]
    return y


def _window(im: Image.Image, box: Sequence[float], ax: Optional[_Axis], ay: Optional[_Axis], clip: bool):
    """The pixels the resampling reads: along an axis with a plan, its window; along one without, the crop's whole
    pixels (``clip``) or the image's full extent. Returns the window (whole pixels) and ``box`` in its pixels."""
    lo, hi, rel = [0, 0], [im.width, im.height], list(box)
    for d, a in ((0, ax), (1, ay)):
        if a is not None:
            lo[d], hi[d] = a.lo, a.hi
        elif clip:
            lo[d], hi[d] = max(0, math.floor(box[d])), min(hi[d], math.ceil(box[d + 2]))
        rel[d], rel[d + 2] = box[d] - lo[d], box[d + 2] - lo[d]
    return (lo[0], lo[1], hi[0], hi[1]), rel


def _mirror(x: torch.Tensor, ax: Optional[_Axis], ay: Optional[_Axis]) -> torch.Tensor:
    """A copy of the window ``x`` (H, W, C) mirrored along the axes whose plans read from the far end (numpy, on
    4-byte pixels: torch's flip of uint8 channels-last data takes a slow strided path)."""
    fh, fw = ay is not None and ay.flip, ax is not None and ax.flip
    if not (fh or fw):
        return x
    a = x.numpy()
    px = a.view(np.uint32) if a.shape[-1] == 4 else a  # RGBX pixels as single elements
    px = np.ascontiguousarray(px[::-1 if fh else 1, ::-1 if fw else 1])
    return torch.from_numpy(px.view(np.uint8) if a.shape[-1] == 4 else px)


def _resample(im: Image.Image, box: Sequence[float], size: int, clip: bool,
              px: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, bool, bool]:
    """:func:`resample_crop`'s work: (uint8 (C, size, size), flip_h, flip_w), the result still to be mirrored
    along the axes flagged (left to the caller, who may have mirrors of its own to merge into one copy).
    ``px``: ``im``'s pixels as a tensor (:func:`_map_tensor`): torch's kernel reads its window in place."""
    extent = (0, 0) if clip else im.size
    ax = _axis_plan(box[0], box[2], size, extent[0], far=not clip)
    ay = _axis_plan(box[1], box[3], size, extent[1])
    win, rel = _window(im, box, ax, ay, clip)
    if ax is None:
        if win != (0, 0, *im.size):
            im = im.crop(win)
        if ay is None:
            out = im.resize((size, size), Image.Resampling.BILINEAR, box=tuple(rel))
            return _pil_to_hwc(out).permute(2, 0, 1), False, False
        # PIL's horizontal pass alone (the box spans the window's rows), then torch's vertical one
        x = _pil_to_hwc(im.resize((size, im.height), Image.Resampling.BILINEAR, box=(rel[0], 0, rel[2], im.height)))
    elif px is not None:
        x = px[win[1]:win[3], win[0]:win[2]]
    else:
        x = _pil_to_hwc(im, win)
    y = _kernel(_nchw(_mirror(x, ax, ay)), ay, ax, size)[0]
    fh, fw = ay is not None and ay.flip, ax is not None and ax.flip
    if ay is None:  # torch's horizontal pass, then PIL's vertical one (on the mirrored rows: row-wise, no matter)
        mode = "L" if y.shape[0] == 1 else "RGBX"
        mid = Image.core.map_buffer(y.permute(1, 2, 0).contiguous().numpy(), (size, y.shape[1]), "raw", 0, (mode, 0, 1))
        mid = Image.Image()._new(mid).resize((size, size), Image.Resampling.BILINEAR, box=(0, rel[1], size, rel[3]))
        y = _pil_to_hwc(mid).permute(2, 0, 1)
    return y, fh, fw


def resample_crop(im: Image.Image, box: Sequence[float], size: int, clip: bool) -> torch.Tensor:
    """``box`` (fractional) of an L or RGB image resampled to size x size with PIL's antialiased bilinear filter
    -> uint8 (size, size, C). ``clip``: the filter sees only the crop's pixels (crop, then resize: RandomResizedCrop),
    else the pixels around it too (resize, then crop: PIL's ``resize(box=...)``).

    Each axis that :func:`_axis_plan` can map onto torch's vectorised uint8 kernel (within one level of PIL's,
    several times faster) goes through it: crops with a whole-pixel edge, and boxes on a resize grid (all of
    resize_crop's). PIL's passes run in its order (horizontal, then vertical) with its 8-bit rounding between
    them, so a crop with a plan for one axis only (PIL's pass for the other) is as close to PIL as either."""
    y, fh, fw = _resample(im, box, size, clip)
    dims = [d for d, f in ((-2, fh), (-1, fw)) if f]
    return (y.flip(dims) if dims else y)[:3].permute(1, 2, 0)


# after orient's transpose (orientations 5-8), the flips it applies: (rows, columns)
_ORIENT_FLIPS = {1: (False, False), 2: (False, True), 3: (True, True), 4: (True, False),
                 5: (False, False), 6: (False, True), 7: (True, True), 8: (True, False)}


def _pil_crop(im: Image.Image, crop: Crop, size: int, orientation: int, draft: bool) -> DecodedCrop:
    """Decode + crop + resize an opened image: draft scale, only the rows down to the crop, one resample; the
    mirrors of the resampling, the EXIF orientation and the crop's flip merged into one copy at most."""
    upright = upright_size(im.size, orientation)
    box = box_to_stored(crop.box, upright, orientation)
    s = _draft(im, draft_scale(min(box[2] - box[0], box[3] - box[1]), size)) if draft else 1
    box = tuple(c / s for c in box)
    # rows the resampling reads: the crop's (clip), or its filter's reach below it too (max(scale, 1) pixels)
    reach = 0 if crop.clip else max((box[3] - box[1]) / size, 1.0) + 1
    px = _load_rows(im, math.ceil(box[3] + reach), to_tensor=True)
    if im.mode not in ("RGB", "L"):
        im = to_rgb(im)[0]  # palette, alpha, 16-bit, CMYK: convert the whole (possibly reduced) image first
    y, fh, fw = _resample(im, box, size, crop.clip, px)
    # the rest in numpy views, then one copy to a compact planar (3, size, size): torch's flips and copies of these
    # channels-last uint8 views take a slow strided path (3x numpy's); planar crops also collate 6x faster
    a = y.numpy()
    if a.shape[0] == 1:
        a, grey = np.broadcast_to(a, (3, size, size)), True
    else:
        a = a[:3]
        grey = is_grey_hwc(a.transpose(1, 2, 0))  # mirrors and transposes do not change it
    if orientation >= 5:
        a, fh, fw = a.transpose(0, 2, 1), fw, fh
    oh, ow = _ORIENT_FLIPS[orientation]
    if fh != oh:
        a = a[:, ::-1]
    if fw != (ow != crop.flip):
        a = a[:, :, ::-1]
    return DecodedCrop(torch.from_numpy(np.ascontiguousarray(a)), grey, crop, s)


def decode_crop(path, size: int, choose: Callable[[int, int], Crop], draft: bool = True) -> DecodedCrop:
    """Decode the ``size`` x ``size`` crop that ``choose(width, height)`` picks from the upright image.

    ``choose`` sees only the header's size, so the JPEG is then decoded at the largest draft scale that keeps the
    crop at or above ``size`` pixels (``draft=False``: always full scale), cropped and resized once (PIL's
    antialiased bilinear). Raises :class:`UnreadableImage`.
    """
    with _reading(path):
        with Image.open(path) as im:
            o = exif_orientation(im)
            return _pil_crop(im, choose(*upright_size(im.size, o)), size, o, draft)


# --------------------------------------------------------------------------------------------- device decoding
class EncodedCrop(NamedTuple):
    """A JPEG's bytes and its crop in stored pixels, for decoding on the training device."""
    data: bytes  #: the file's bytes
    box: tuple[float, float, float, float]  #: in the stored (not upright) image
    orientation: int
    flip: bool
    clip: bool
    size: int  #: output side
    path: str


def encode_crop(path, size: int, choose: Callable[[int, int], Crop]) -> EncodedCrop | DecodedCrop:
    """Loader-worker side of ``decode: gpu``: read the bytes and choose the crop from the header. Files that
    nvjpeg does not take (not a JPEG, or CMYK) are decoded here by :func:`decode_crop`'s path and come back as a
    :class:`DecodedCrop`. Raises :class:`UnreadableImage`."""
    with _reading(path):
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            o = exif_orientation(im)
            upright = upright_size(im.size, o)
            crop = choose(*upright)
            if im.format in _JPEG and im.mode in ("RGB", "L"):
                box = box_to_stored(crop.box, upright, o)
                return EncodedCrop(data, box, o, crop.flip, crop.clip, size, str(path))
            return _pil_crop(im, crop, size, o, draft=True)


def _resize_matrix(lo: float, hi: float, n_in: int, n_out: int, device) -> tuple[torch.Tensor, int, int]:
    """PIL's antialiased bilinear coefficients (Resample.c, ``precompute_coeffs``) resampling the interval
    ``[lo, hi)`` of ``n_in`` pixels to ``n_out``: (weights (n_out, b - a), a, b) over the input pixels [a, b)."""
    scale = (hi - lo) / n_out
    fs = max(scale, 1.0)  # filter stretched when downsampling: the antialiasing
    centre = lo + (torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale
    a = max(0, int(lo + 0.5 * scale - fs + 0.5))
    b = min(n_in, int(hi - 0.5 * scale + fs + 0.5) + 1)
    pix = torch.arange(a, b, device=device, dtype=torch.float64) + 0.5
    w = (1 - (pix[None] - centre[:, None]).abs() / fs).clamp_(min=0)
    return (w / w.sum(1, keepdim=True)).float(), a, b


def resize_box(img: torch.Tensor, box: Sequence[float], size: int) -> torch.Tensor:
    """Resample ``box`` (left, top, right, bottom; fractional) of ``img`` (C, H, W) to (C, size, size) float,
    with the antialiased bilinear filter PIL's ``Image.resize(box=...)`` uses: two small matrix products."""
    H, W = img.shape[-2:]
    wy, ya, yb = _resize_matrix(box[1], box[3], H, size, img.device)
    wx, xa, xb = _resize_matrix(box[0], box[2], W, size, img.device)
    return wy @ img[:, ya:yb, xa:xb].float() @ wx.T


def _device_crop(img: torch.Tensor, e: EncodedCrop, size: int) -> torch.Tensor:
    win, box = _resample_box(e.box, e.clip, (img.shape[-1], img.shape[-2]))
    if win is not None:
        img = img[:, win[1]:win[3], win[0]:win[2]]
    x = orient(resize_box(img, box, size), e.orientation)
    return x.flip(-1) if e.flip else x


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """Batched decode on ``device``; when the batch fails, image by image (None where one cannot be decoded)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec; same decoder
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    try:  # e.g. a progressive or unusual JPEG nvjpeg refuses: torchvision's CPU decoder
                        out.append(decode_jpeg(d, mode=ImageReadMode.RGB).to(device))
                    except RuntimeError:
                        out.append(None)
            return out


class JpegBatch:
    """A collated batch of the ``decode: gpu`` path. ``pixels`` uint8 (B, 3, S, S) holds the images the workers
    decoded (zeros elsewhere); the JPEGs left to the device are one byte buffer ``blob`` (one shared-memory
    tensor per batch, not one per image) cut by ``jpegs``: (batch position, start, end, :class:`EncodedCrop`)."""

    def __init__(self, pixels: torch.Tensor, blob: torch.Tensor, jpegs: list[tuple[int, int, int, EncodedCrop]]):
        self.pixels, self.blob, self.jpegs = pixels, blob, jpegs

    def pin_memory(self) -> "JpegBatch":
        return JpegBatch(self.pixels.pin_memory(), self.blob, self.jpegs)

    def decode(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (uint8 (B, 3, S, S) on ``device``, bool (B,) decoded on the device, bool (B,) failed to decode)."""
        device = torch.device(device)
        size = self.pixels.shape[-1]
        out = self.pixels.to(device, non_blocking=True)
        on_device = torch.zeros(len(out), dtype=torch.bool)
        failed = torch.zeros(len(out), dtype=torch.bool)
        if not self.jpegs:
            return out, on_device, failed
        imgs = _decode_jpegs([self.blob[a:b] for _, a, b, _ in self.jpegs], device)
        for (k, _, _, e), img in zip(self.jpegs, imgs):
            if img is None:
                warnings.warn(f"{e.path}: cannot decode (JPEG data rejected by the device and CPU decoders)")
                failed[k] = True
                continue
            out[k] = _device_crop(img, e, size).round_().clamp_(0, 255).to(torch.uint8)
            on_device[k] = True
        return out, on_device, failed


def collate_encoded(items: list) -> tuple[JpegBatch, torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn`` for items ``(EncodedCrop or uint8 (3, S, S), ok, grey)`` (runs in the worker)."""
    first = items[0][0]
    size = first.size if isinstance(first, EncodedCrop) else first.shape[-1]
    pixels = torch.zeros(len(items), 3, size, size, dtype=torch.uint8)
    jpegs, chunks, pos = [], [], 0
    for k, (x, _, _) in enumerate(items):
        if isinstance(x, EncodedCrop):
            jpegs.append((k, pos, pos + len(x.data), x._replace(data=b"")))
            chunks.append(x.data)
            pos += len(x.data)
        else:
            pixels[k] = x
    empty = torch.zeros(0, dtype=torch.uint8)
    blob = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if pos else empty
    ok, grey = torch.tensor([ok for _, ok, _ in items]), torch.tensor([g for _, _, g in items])
    return JpegBatch(pixels, blob, jpegs), ok, grey


_TINY_JPEG: Optional[bytes] = None


def gpu_decode_unavailable(device) -> Optional[str]:
    """Why ``decode: gpu`` cannot run on ``device`` (None when it can): it needs CUDA and torchvision's nvjpeg."""
    global _TINY_JPEG
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs a CUDA device (this run uses {device.type})"
    if _TINY_JPEG is None:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
        _TINY_JPEG = buf.getvalue()
    try:
        from torchvision.io import decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            decode_jpeg([torch.frombuffer(bytearray(_TINY_JPEG), dtype=torch.uint8)], device=device)
    except Exception as e:  # noqa: BLE001 - missing image extension, nvjpeg not built, driver error
        return f"cannot decode on {device} ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    return None
