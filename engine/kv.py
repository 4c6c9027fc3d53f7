"""The KV cache: keys and values of every position of every running sequence, in blocks.

One pool per model, in fixed-size blocks of `BLOCK` positions (vLLM's paged attention): a
sequence holds a list of blocks (its *block table*), position p living in slot
`table[p // BLOCK] * BLOCK + p % BLOCK`. Sequences grow a block at a time, so memory goes
where it is used, and the pool's size is the one budget for all of them.

    k[layer], v[layer]: (n_kv_heads, n_blocks * BLOCK, head_dim) float32

Blocks are shared, counted by reference:
- **prefix cache**: a block whose BLOCK positions are all computed is registered under a hash
  of its tokens chained with the previous block's hash, so two sequences that start with the
  same tokens (a system prompt, the earlier turns of a chat) share those blocks instead of
  recomputing them. A block no sequence uses but that holds a registered prefix stays in the
  pool, least recently used first out, until its room is needed;
- **parallel choices** (`n > 1`) share the prompt's blocks; the last, partly filled one is
  copied for each (copy on write), since each choice writes its own tokens after it.

The pool never allocates after it is made; `np.zeros` is lazily backed by the OS, so a
large budget costs memory only where blocks have been written.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from kernels.attention import KV_BLOCK as BLOCK  # positions per block (prefix granularity)


class KVFull(Exception):
    """No block is free and none can be evicted."""


class KVPool:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_blocks: int):
        if n_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.n_blocks = n_blocks
        slots = n_blocks * BLOCK
        self.k = np.zeros((n_layers, n_kv_heads, slots, head_dim), np.float32)
        self.v = np.zeros((n_layers, n_kv_heads, slots, head_dim), np.float32)
        self.refs = np.zeros(n_blocks, np.int32)  # sequences holding each block
        self.free = list(range(n_blocks - 1, -1, -1))  # a stack: low block ids first
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached prefixes nobody holds, LRU
        self.by_key: dict[tuple, int] = {}  # (parent hash, tokens) -> block
        self.key_of: dict[int, tuple] = {}  # block -> its key, for registered blocks
        self.hits = self.misses = 0  # prefix-cache lookups, in blocks

    @staticmethod
    def bytes_per_block(n_layers: int, n_kv_heads: int, head_dim: int) -> int:
        return 2 * n_layers * n_kv_heads * BLOCK * head_dim * 4  # k and v, float32

    @property
    def n_available(self) -> int:
        """Blocks a sequence could get now: free ones and idle cached ones."""
        return len(self.free) + len(self.idle)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self.free) - len(self.idle)

    # -- blocks --------------------------------------------------------------------------

    def allocate(self) -> int:
        """A block for one sequence (ref 1): a free one, else the least recently used idle one."""
        if self.free:
            block = self.free.pop()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.by_key[self.key_of.pop(block)]
        else:
            raise KVFull
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        """One more sequence uses `block` (a prefix hit, or a parallel choice)."""
        if self.refs[block] == 0:
            del self.idle[block]
        self.refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """A sequence lets go of its blocks: registered ones stay as idle prefixes."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)

    def copy(self, src: int, dst: int) -> None:
        """Copy one block's keys and values (every layer): copy on write for a fork."""
        a, b = src * BLOCK, dst * BLOCK
        self.k[:, :, b:b + BLOCK] = self.k[:, :, a:a + BLOCK]
        self.v[:, :, b:b + BLOCK] = self.v[:, :, a:a + BLOCK]

    # -- the prefix cache ----------------------------------------------------------------

    @staticmethod
    def block_key(parent: int, tokens) -> tuple:
        """The key of a full block: the previous block's hash and this block's tokens."""
        return (parent, tuple(tokens))

    def register(self, block: int, key: tuple) -> None:
        """`block` now holds the BLOCK positions `key` names; later sequences may share it."""
        if key in self.by_key or block in self.key_of:
            return  # the same tokens are cached already (computed twice side by side)
        self.by_key[key] = block
        self.key_of[block] = key

    def lookup(self, tokens: list[int], limit: int) -> list[int]:
        """The cached blocks that hold a prefix of `tokens`, at most `limit` positions long
        (whole blocks only), each now held for the caller."""
        blocks: list[int] = []
        parent = 0
        for start in range(0, limit - BLOCK + 1, BLOCK):
            key = self.block_key(parent, tokens[start:start + BLOCK])
            block = self.by_key.get(key)
            if block is None:
                break
            self.hold(block)
            blocks.append(block)
            parent = hash(key)
        n_full = limit // BLOCK
        self.hits += len(blocks)
        self.misses += n_full - len(blocks)
        return blocks
