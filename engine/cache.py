"""A least-recently-used cache of image embeddings, bounded by the bytes it holds.

An embedding is what makes a click cheap: the encoder runs once per image (hundreds of ms
to seconds), then every click is one decoder pass (milliseconds). A vit_h embedding is
256 x 64 x 64 fp32 = 4 MiB, so the bound is in bytes, not entries. Thread-safe: a Serve
replica answers requests from a thread pool.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

import torch

V = TypeVar("V")


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a value (a tensor, or a tuple/list holding some)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class EmbeddingCache(Generic[V]):
    def __init__(self, max_bytes: int, size_of: Callable[[V], int] = tensor_bytes):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> bool:
        """Store value, evicting the least recently used entries to make room. A value larger
        than the whole cache is not stored (returns False)."""
        size = self.size_of(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
            self._items[key] = (value, size)
            self._bytes += size
            return True

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
