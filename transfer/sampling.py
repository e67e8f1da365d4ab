"""Resumable, iteration-based sampling for the transfer trainers (the VOC protocols count iterations, not epochs).

:class:`IterationSampler` makes global batch ``it`` a function of (seed, it) alone, split over the ranks, so that a
run resumed at iteration ``it`` -- or run on another number of processes -- sees the same images and crops as an
uninterrupted single-process run; :class:`EvalSampler` visits every (pass, image) once over all ranks with its own
crop seed. Datasets are indexed by ``(index, seed)``.
"""
from __future__ import annotations

import hashlib

import torch


def seed_of(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across runs and processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class IterationSampler(torch.utils.data.Sampler):
    """Iteration-based, resumable sampling: global position p = it * B + rank * b + j (B = b * world) reads image
    perm_e[p mod N] with e = p // N (a permutation per pass over the data, seeded), and its crop seed is a hash of
    (seed, p). The union over the ranks of iteration ``it`` is exactly the batch a single process with batch B
    draws, and resuming at iteration ``it`` continues the same stream."""

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.n, self.b, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.start = self.stop = 0
        self._perms: dict[int, list[int]] = {}

    def set_range(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def _perm(self, e: int) -> list[int]:
        if e not in self._perms:
            self._perms = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(seed_of(self.seed, e))).tolist()}
        return self._perms[e]

    def __len__(self) -> int:
        return (self.stop - self.start) * self.b

    def __iter__(self):
        B = self.b * self.world
        for it in range(self.start, self.stop):
            for j in range(self.b):
                p = it * B + self.rank * self.b + j
                e, k = divmod(p, self.n)
                yield self._perm(e)[k], seed_of(self.seed, p)


class EvalSampler(torch.utils.data.Sampler):
    """Every (pass, image) once over all ranks (rank r takes images r, r + world, ...), crop seeds per (pass, image)."""

    def __init__(self, n: int, passes: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.items = [(i, seed_of(seed, "eval", k, i)) for k in range(passes) for i in range(rank, n, world)]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)
