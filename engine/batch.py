"""A packed batch: the tokens of several sequences back to back, for one forward pass.

    ids        (n,)    token ids, sequence after sequence
    positions  (n,)    each token's position in its own sequence
    starts     (B+1,)  sequence s is rows starts[s] .. starts[s+1] - 1

Every model reads the same `Batch`: the linears see (n, dim) rows whatever sequence they come
from, so each weight matrix is read once per step for all of them; only attention needs the
sequence boundaries. An encoder (bert) attends within each sequence's rows. A decoder writes
each row's key and value into its sequence's blocks of the KV cache (`engine.kv.KVPool`) and
attends over all its sequence's positions so far: a sequence decoding one token and another
prefilling a chunk of its prompt run in the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kv import BLOCK, KVPool


@dataclass
class Batch:
    ids: np.ndarray  # (n,) int64
    positions: np.ndarray  # (n,) int64
    starts: np.ndarray  # (B+1,) int64
    # decoders: the KV cache and where each sequence lives in it
    kv: KVPool | None = None
    block_tables: np.ndarray | None = None  # (B, max_blocks) int32: each sequence's blocks
    row_seq: np.ndarray | None = None  # (n,) int32: the sequence of each row
    slots: np.ndarray | None = None  # (n,) int64: the cache slot of each row's own key/value
    # a traced pass only (engine/trace.py): records activations, applies interventions
    recorder: object | None = None

    @classmethod
    def pack(cls, pieces: list[tuple[list[int], int]], kv: KVPool | None = None,
             tables: list[list[int]] | None = None) -> Batch:
        """`pieces`: (token ids, position of the first one) per sequence; `tables`: each
        sequence's KV blocks, covering every position up to its last token here."""
        lengths = [len(ids) for ids, _ in pieces]
        starts = np.zeros(len(pieces) + 1, np.int64)  # (B+1,)
        np.cumsum(lengths, out=starts[1:])
        ids = np.fromiter((t for seq, _ in pieces for t in seq), np.int64, count=int(starts[-1]))
        positions = np.concatenate([np.arange(p0, p0 + n, dtype=np.int64)
                                    for (_, p0), n in zip(pieces, lengths)])
        batch = cls(ids, positions, starts)
        if kv is not None:
            width = max(len(t) for t in tables)
            batch.kv = kv
            batch.block_tables = np.zeros((len(tables), width), np.int32)  # (B, max_blocks)
            for s, table in enumerate(tables):
                batch.block_tables[s, : len(table)] = table
            batch.row_seq = np.repeat(np.arange(len(pieces), dtype=np.int32), lengths)
            blocks = batch.block_tables[batch.row_seq, positions // BLOCK].astype(np.int64)
            batch.slots = blocks * BLOCK + positions % BLOCK
        return batch

    @property
    def n_seqs(self) -> int:
        return len(self.starts) - 1

    def last_rows(self) -> np.ndarray:
        """(B,) the row of each sequence's last token (where its next-token logits come from)."""
        return self.starts[1:] - 1


def scratch_batch(ids_lists: list[list[int]], kv_layout) -> Batch:
    """Sequences run once from position 0 with a KV cache of their own, freed after the pass
    (LLM.logits, a decoder's embeddings); `kv_layout` is the model's (n_layers, n_kv_heads,
    head_dim), or None for an encoder, which needs no cache."""
    pieces = [(list(ids), 0) for ids in ids_lists]
    if kv_layout is None:
        return Batch.pack(pieces)
    sizes = [-(-len(ids) // BLOCK) for ids in ids_lists]  # blocks per sequence
    kv = KVPool(*kv_layout, n_blocks=max(1, sum(sizes)))
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    tables = [list(range(int(a), int(a) + n)) for a, n in zip(first, sizes)]
    return Batch.pack(pieces, kv, tables)
