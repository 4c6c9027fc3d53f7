"""The KV cache: keys and values of every position seen so far, per layer.

One preallocated buffer per layer, grown by doubling when a sequence outgrows it (a small
model with a 32k context would otherwise reserve a gigabyte it may never use).
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 initial_len: int = 256):
        self.max_len = max_len
        self.length = 0  # positions filled, the same in every layer
        cap = min(initial_len, max_len)
        # k[layer], v[layer]: (n_kv_heads, capacity, head_dim)
        self.k = [np.zeros((n_kv_heads, cap, head_dim), np.float32) for _ in range(n_layers)]
        self.v = [np.zeros((n_kv_heads, cap, head_dim), np.float32) for _ in range(n_layers)]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions (doubling, capped at max_len)."""
        if length <= self.capacity:
            return
        new_cap = min(max(length, 2 * self.capacity), self.max_len)
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                grown = np.zeros((old.shape[0], new_cap, old.shape[2]), np.float32)
                grown[:, : self.length] = old[:, : self.length]
                buffers[i] = grown

    def update(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray):
        """Write k, v (n, n_kv_heads, head_dim) at positions pos..pos+n-1 of `layer`.

        Returns views (n_kv_heads, pos+n, head_dim) over every position so far.
        """
        n = k.shape[0]
        self.k[layer][:, pos:pos + n] = k.transpose(1, 0, 2)
        self.v[layer][:, pos:pos + n] = v.transpose(1, 0, 2)
        return self.k[layer][:, : pos + n], self.v[layer][:, : pos + n]
