"""Feature cache: run the frozen encoder once, store the pooled features of every tap on disk (memory-mapped
``.npy``), and train heads from the cache for quick sweeps over lr / weight decay / epochs.

Layout of ``<cache_dir>/<split>/``: ``<tap>.npy`` float32 (N, D_tap), ``labels.npy`` int64 (N,), ``meta.json``
(the key that the cache was built for, written last: a cache without it is incomplete and is rebuilt).
The key hashes the encoder weights, the taps and their pooling, the transform and the sample list, so a stale
cache is never reused silently. Cached training sees the evaluation transform (centre crop, no flip): the
augmentation of on-the-fly training is lost, which is the usual trade-off of cached linear probes.

Under DDP every rank extracts its shard into the shared files (rank 0 creates them), then all ranks read.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pretext.decode import DECODER
from pretext.runtime import atomic_write_text, barrier

log = logging.getLogger("crosschannel")


class Indexed(torch.utils.data.Dataset):
    """Wrap a (x, y) dataset to return (x, y, index)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, y, i


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...`` in order: every sample exactly once over all ranks (no padding, so
    evaluation counts are exact after ``all_reduce``)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def cache_key(**parts) -> str:
    parts.setdefault("decoder", DECODER)  # features of another decoder's pixels are not reused
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pool_features(encoder, pooler, rgb: torch.Tensor, amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One pass of the frozen encoder -> pooled features of every tap (no graph; pooling in float32)."""
    with torch.no_grad():
        with torch.autocast(rgb.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feats = encoder(rgb)
        return pooler(feats)


@torch.no_grad()
def extract_pooled(encoder, pooler, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
                   out: dict[str, np.ndarray] | None = None, labels_out: np.ndarray | None = None,
                   progress: bool = False, desc: str = "extract") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features of every tap for a loader of (rgb, label, index) batches.

    ``pooler``: a :class:`~linear_probe.heads.TapPools` (tap activations -> pooled features, with ``dims``).
    Writes row ``index`` of ``out[tap]`` / ``labels_out`` (allocated in memory if None, sized by the dataset).
    """
    n = len(loader.dataset)
    if out is None:
        out = {t: np.empty((n, d), np.float32) for t, d in pooler.dims.items()}
    if labels_out is None:
        labels_out = np.full(n, -1, np.int64)
    for rgb, y, idx in tqdm(loader, desc=desc, disable=not progress, leave=False):
        pooled = pool_features(encoder, pooler, rgb.to(device, non_blocking=True), amp_dtype)
        i = idx.numpy()
        for t, v in pooled.items():
            out[t][i] = v.float().cpu().numpy()
        labels_out[i] = y.numpy()
    return out, labels_out


class FeatureCache:
    """Pooled features of one split, memory-mapped read-only."""

    def __init__(self, folder: str | Path, taps: Sequence[str]):
        self.folder = Path(folder)
        self.taps = list(taps)
        self.feats = {t: np.load(self.folder / f"{t}.npy", mmap_mode="r") for t in self.taps}
        self.labels = np.load(self.folder / "labels.npy")

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        indices = np.asarray(list(indices), dtype=np.int64)
        for s in range(0, len(indices), batch_size):
            b = indices[s:s + batch_size]
            order = np.argsort(b)  # sorted reads are much faster on a memmap
            sb = b[order]
            inv = np.argsort(order)
            feats = {t: torch.from_numpy(np.ascontiguousarray(f[sb][inv])) for t, f in self.feats.items()}
            yield feats, torch.from_numpy(self.labels[b])


def build_cache(folder: str | Path, key: str, encoder, pooler, dataset, batch_size: int, workers: int,
                device: torch.device, amp_dtype: torch.dtype | None, rank: int = 0, world: int = 1,
                progress: bool = False) -> FeatureCache:
    """Reuse ``folder`` if its ``meta.json`` carries ``key``; otherwise extract (sharded over ranks) and write it."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("key") == key:
        log.info("feature cache %s: reusing (%d samples)", folder, meta["n"])
        return FeatureCache(folder, pooler.taps)
    n = len(dataset)
    if rank == 0:
        log.info("feature cache %s: extracting %d samples, %s", folder, n,
                 ", ".join(f"{t}={d}" for t, d in pooler.dims.items()))
        folder.mkdir(parents=True, exist_ok=True)
        if meta_path.exists():
            meta_path.unlink()
        for t, d in pooler.dims.items():
            np.lib.format.open_memmap(folder / f"{t}.npy", mode="w+", dtype=np.float32, shape=(n, d)).flush()
        np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.int64, shape=(n,)).flush()
    barrier()
    out = {t: np.load(folder / f"{t}.npy", mmap_mode="r+") for t in pooler.dims}
    labels = np.load(folder / "labels.npy", mmap_mode="r+")
    loader = torch.utils.data.DataLoader(Indexed(dataset), batch_size=batch_size, num_workers=workers,
                                         sampler=ShardSampler(n, rank, world), pin_memory=device.type == "cuda")
    extract_pooled(encoder, pooler, loader, device, amp_dtype, out, labels, progress, desc=f"cache {folder.name}")
    for a in (*out.values(), labels):
        a.flush()
    del out, labels
    barrier()
    if rank == 0:
        atomic_write_text(meta_path, json.dumps({"key": key, "n": n, "dims": pooler.dims}, indent=1))
    barrier()
    return FeatureCache(folder, pooler.taps)
