"""Segmentation data: SBD (``benchmark_RELEASE/dataset``: ``img/*.jpg``, ``cls/*.mat``, ``<split>.txt``, read as
torchvision's ``SBDataset`` and fcn.berkeleyvision.org's ``SBDDSegDataLayer`` read it) and VOC ``SegmentationClass``
over any list (``transfer.voc`` reads the masks), whole images with one-line errors naming the file, and the training
image stream (random draws with replacement, as ``voc_layers.py``; or shuffled passes), a function of the draw alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretext.data import UnreadableImage, pil_to_tensor, read_image
from pretext.runtime import UserError, log

from .seg_eval import shipped_list
from .voc import NUM_SEG_CLASSES, VOID, find_voc_root, read_ids, read_mask, segmentation_pairs


def read_sbd_mask(mat_path: str | Path, image_size: tuple[int, int] | None = None,
                  num_classes: int = NUM_SEG_CLASSES) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` file as (H, W) uint8 (what torchvision's ``SBDataset`` and
    fcn's ``SBDDSegDataLayer`` read). One-line errors naming the file: missing, unreadable, no such field, a size
    other than ``image_size`` (W, H), indices outside 0..num_classes-1 and 255."""
    mat_path = Path(mat_path)
    if not mat_path.is_file():
        raise UserError(f"{mat_path}: SBD mask not found")
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scikit-learn brings scipy
        raise UserError("reading SBD .mat masks needs scipy: pip install scipy") from None
    try:
        mat = loadmat(str(mat_path))
        arr = np.asarray(mat["GTcls"][0]["Segmentation"][0])
    except (KeyError, IndexError, ValueError, TypeError):
        raise UserError(f"{mat_path}: no GTcls.Segmentation in this .mat file (not an SBD cls/ mask)") from None
    except Exception as e:  # noqa: BLE001 - scipy raises many types for corrupt files
        raise UserError(f"{mat_path}: unreadable .mat file ({str(e).splitlines()[0][:120]})") from None
    if arr.ndim != 2:
        raise UserError(f"{mat_path}: GTcls.Segmentation has shape {arr.shape}, expected (H, W)")
    if image_size is not None and (arr.shape[1], arr.shape[0]) != tuple(image_size):
        raise UserError(f"{mat_path}: mask is {arr.shape[1]}x{arr.shape[0]}, its image is "
                        f"{image_size[0]}x{image_size[1]}")
    bad = np.unique(arr[((arr < 0) | (arr >= num_classes)) & (arr != VOID)])
    if bad.size:
        raise UserError(f"{mat_path}: class indices {bad[:5].tolist()} outside 0..{num_classes - 1} and {VOID}")
    return arr.astype(np.uint8)


def find_sbd_root(path: str | Path) -> Path:
    """Accept ``benchmark_RELEASE/dataset``, ``benchmark_RELEASE`` or its parent (any folder holding cls/ and img/)."""
    p = Path(path)
    for cand in (p, p / "dataset", p / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir() and (cand / "img").is_dir():
            return cand
    raise UserError(f"{p}: not an SBD folder (no cls/ and img/ in it, in dataset/ or in benchmark_RELEASE/dataset/)")


def sbd_samples(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, .mat) pairs of SBD ``<split>.txt`` (or a list file); one-line errors for a missing list, image or
    mask."""
    root = find_sbd_root(root)
    ids = read_ids(Path(split) if Path(split).is_file() else root / f"{split}.txt")
    out = []
    for i in ids:
        img, mat = root / "img" / f"{i}.jpg", root / "cls" / f"{i}.mat"
        for f, what in ((img, "image"), (mat, "SBD mask")):
            if not f.is_file():
                raise UserError(f"{f}: {what} listed in split '{split}' not found")
        out.append((img, mat))
    return out


def voc_samples(root: str | Path, split: str, masks: str = "SegmentationClass") -> tuple[list[tuple[Path, Path]], str]:
    """(image, mask) pairs and a note on the list used. ``split``: a list file, ``ImageSets/Segmentation/<split>.txt``,
    a list shipped with the package (``seg11valid``), or ``all`` (every mask in the masks folder, with a warning)."""
    root = find_voc_root(root)
    if split == "all":
        ids = sorted(p.stem for p in (root / masks).glob("*.png"))
        if not ids:
            raise UserError(f"{root / masks}: no masks")
        note = f"all {len(ids)} masks of {masks}/ (no split file)"
        log.warning("%s: %s", root, note)
    else:
        in_devkit = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        listed = Path(split) if Path(split).is_file() else in_devkit if in_devkit.is_file() else shipped_list(split)
        if listed is None:
            raise UserError(f"{in_devkit}: split file not found (and '{split}' is neither a file nor a shipped list)")
        ids, note = read_ids(listed), str(listed)
    return segmentation_pairs(root, split, ids=ids, mask_dir=masks), note


class SegmentationData(torch.utils.data.Dataset):
    """Whole images and their masks. Items: ``(rgb float (3, H, W) in [0, 1], mask int64 (H, W), index, error)``;
    ``error`` is '' or one line: an unreadable image (``unreadable: ...``; skipped and counted in training) or a bad
    mask (``mask: ...``; raised in the main process after the update, so that every process stops together). Both
    come with a stand-in: a black 64 px image whose mask is all void."""

    def __init__(self, samples: list[tuple[Path, Path]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def ids(self) -> list[str]:
        return [img.stem for img, _ in self.samples]

    @staticmethod
    def _stand_in() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(3, 64, 64), torch.full((64, 64), VOID, dtype=torch.int64)

    def __getitem__(self, i: int):
        img_path, mask_path = self.samples[i]
        try:
            img = read_image(img_path)
        except UnreadableImage as e:
            return *self._stand_in(), i, f"unreadable: {e}"
        try:
            read = read_sbd_mask if mask_path.suffix == ".mat" else read_mask
            mask = read(mask_path, img.size)
        except UserError as e:
            return *self._stand_in(), i, f"mask: {e}"
        return pil_to_tensor(img), torch.from_numpy(mask.astype(np.int64)), i, ""


def sample_index(seed: int, pos: int, n: int, mode: str, cache: dict | None = None) -> int:
    """Image of global draw ``pos``: ``random`` picks uniformly with replacement from a generator seeded by
    (seed, pos), as voc_layers.py's ``random.randint`` per forward; ``epoch`` walks a permutation per pass seeded by
    (seed, pass). A function of ``pos`` alone, so a resumed or multi-process run draws the same images."""
    if mode == "random":
        return int(np.random.default_rng([seed, pos]).integers(n))
    e, k = divmod(pos, n)
    if cache is None or cache.get("epoch") != e:
        perm = np.random.default_rng([seed, 1 << 20, e]).permutation(n)
        if cache is None:
            return int(perm[k])
        cache.update(epoch=e, perm=perm)
    return int(cache["perm"][k])


class DrawSampler(torch.utils.data.Sampler):
    """The images of updates ``[start, stop)`` this process sees: update ``it`` draws positions
    ``it * iter_size + j`` (j < iter_size); process ``rank`` takes the j with ``j % world == rank``."""

    def __init__(self, n: int, iter_size: int, rank: int, world: int, seed: int, mode: str):
        self.n, self.iter_size, self.rank, self.world, self.seed, self.mode = n, iter_size, rank, world, seed, mode
        self.start = self.stop = 0

    def set_range(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) * (self.iter_size // self.world)

    def __iter__(self):
        cache: dict = {}
        for it in range(self.start, self.stop):
            for j in range(self.rank, self.iter_size, self.world):
                yield sample_index(self.seed, it * self.iter_size + j, self.n, self.mode, cache)


def centre_crops(rgbs, size: int = 227) -> torch.Tensor:
    """RGB images (3, H, W) -> (N, 3, size, size): each centre-cropped square and resized (antialiased); the batch of
    the rescaling / data-dependent init (the release rescaled the 227 px classification-geometry network)."""
    out = []
    for rgb in rgbs:
        h, w = rgb.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = rgb[:, top:top + side, left:left + side].unsqueeze(0)
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0])
    if not out:
        raise UserError("no readable image for the rescaling / data-dependent init")
    return torch.stack(out)


def init_batch(ds: SegmentationData, n: int, seed: int) -> torch.Tensor | None:
    """``n`` training images (a seeded draw, unreadable ones left out) as :func:`centre_crops`."""
    if n == 0:
        return None
    order = np.random.default_rng([seed, 7]).permutation(len(ds))[: min(n, len(ds))]
    return centre_crops(item[0] for item in (ds[int(k)] for k in order) if not item[3])
