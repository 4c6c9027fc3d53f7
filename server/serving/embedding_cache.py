"""An LRU of recent embeddings, bounded in bytes, so a repeated input costs no forward pass."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class EmbeddingCache:
    """(model id, token ids) -> float32 vector; least recently used out first, bounded by the
    bytes of the vectors and their keys."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(key: tuple, vec: np.ndarray) -> int:
        return vec.nbytes + 8 * len(key[1]) + 64  # vector + ids (as a tuple of ints) + overhead

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            vec = self._items.get(key)
            if vec is not None:
                self._items.move_to_end(key)
            return vec

    def put(self, key: tuple, vec: np.ndarray) -> None:
        size = self._size(key, vec)
        if size > self.max_bytes:
            return
        vec = np.array(vec, dtype=np.float32)  # a private, read-only copy
        vec.flags.writeable = False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= self._size(key, old)
            self._items[key] = vec
            self.bytes += size
            while self.bytes > self.max_bytes:
                k, v = self._items.popitem(last=False)
                self.bytes -= self._size(k, v)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
