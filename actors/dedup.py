"""Exact and near-duplicate detection (one actor holding every hash it has seen).

Exact: same sha256 (image_id). Near: pHash within `max_distance` bits. Near-duplicate lookup
uses multi-index hashing: the 64-bit hash is cut into max_distance + 1 bands, and two hashes
within max_distance bits agree exactly on at least one band (pigeonhole), so only hashes
sharing a band are compared. Images committed by earlier runs are loaded first, so a rerun
or a later run recognises them too.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .batch import DUPLICATE, map_ok, objects

_EMPTY = np.zeros((0, 0, 3), np.uint8)


class PhashIndex:
    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = np.linspace(0, 64, bands + 1).astype(int)
        self._bands = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self._tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in self._bands]
        self._hashes: list[int] = []
        self._ids: list[str] = []

    def _keys(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self._bands]

    def nearest(self, h: int) -> tuple[str, int] | None:
        """(image_id, distance) of the closest indexed hash within max_distance, or None."""
        best = None
        for table, key in zip(self._tables, self._keys(h)):
            for j in table.get(key, ()):
                d = (self._hashes[j] ^ h).bit_count()
                if d <= self.max_distance and (best is None or d < best[1]):
                    best = (self._ids[j], d)
        return best

    def add(self, h: int, image_id: str) -> None:
        j = len(self._hashes)
        self._hashes.append(h)
        self._ids.append(image_id)
        for table, key in zip(self._tables, self._keys(h)):
            table[key].append(j)


class Deduplicator:
    """Marks rows that repeat an image already kept (in this run or committed before)."""

    def __init__(self, committed: list[tuple[str, str | None]], max_distance: int = 4):
        self.exact: set[str] = set()
        self.near = PhashIndex(max_distance) if max_distance >= 0 else None
        for image_id, ph in committed:
            self._keep(image_id, ph)

    def _keep(self, image_id: str, ph: str | None) -> None:
        self.exact.add(image_id)
        if self.near is not None and ph:
            self.near.add(int(ph, 16), image_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        of, kind, distance = [""] * n, [""] * n, np.zeros(n, np.int64)
        images = list(batch["image"])

        def check(i: int) -> None:
            image_id, ph = batch["image_id"][i], batch["phash"][i]
            hit = (image_id, 0) if image_id in self.exact else None
            if hit is None and self.near is not None and ph:
                hit = self.near.nearest(int(ph, 16))
            if hit is None:
                self._keep(image_id, ph)
                return
            batch["status"][i] = DUPLICATE
            of[i], kind[i], distance[i] = hit[0], "exact" if hit[0] == image_id else "near", hit[1]
            images[i] = _EMPTY  # its pixels go no further

        batch = map_ok(batch, "dedup", check)
        batch.update(image=objects(images), duplicate_of=objects(of), kind=objects(kind), distance=distance)
        return batch
