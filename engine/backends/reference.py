"""The reference backend: every operation in plain NumPy, float32, on dequantized weights.

This is the oracle the fast backend is tested against, so it favours the obvious formulation
over speed. Each operation is the NumPy twin (`name_ref`) that sits beside its Numba kernel in
`kernels/`, written there once; this class only adapts shapes. Shapes follow docs/internals.md.
"""

from __future__ import annotations

import numpy as np

from kernels import attention as attn_kernels
from kernels import norms
from kernels.dequant import dequantize, dequantize_rows

from ..gguf_file import TensorInfo


class ReferenceBackend:
    name = "reference"

    # -- load time -------------------------------------------------------------------------

    def prepare(self, t: TensorInfo) -> np.ndarray:
        """Dequantize a tensor once at load time → float32 array of `t.shape`."""
        return dequantize(t.data, t.qtype, t.shape)

    def prepare_many(self, ts: list[TensorInfo]) -> list[np.ndarray]:
        """Matrices that read the same input (q, k, v or gate, up), for `linear_many`."""
        return [self.prepare(t) for t in ts]

    def prepare_embedding(self, t: TensorInfo) -> TensorInfo:
        """The token-embedding table stays as it is in the file; rows are dequantized on lookup."""
        return t

    # -- the operations --------------------------------------------------------------------

    def embed(self, table: TensorInfo, ids: np.ndarray) -> np.ndarray:
        """(n,) token ids → (n, dim) float32 rows of the embedding table."""
        return dequantize_rows(table.data, table.qtype, table.shape, np.asarray(ids))

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(n, n_in) @ (n_out, n_in).T → (n, n_out). Where the time goes."""
        return x @ w.T

    def linear_many(self, x: np.ndarray, ws: list[np.ndarray]) -> list[np.ndarray]:
        """One `linear` per matrix; the fast backend runs them as one kernel call."""
        return [self.linear(x, w) for w in ws]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """x (n, d) or (n, heads, d), weight (d,): `kernels.norms.rms_norm_ref`."""
        return norms.rms_norm_ref(x, weight, eps)

    def rope_table(self, positions: np.ndarray, inv_freq: np.ndarray,
                   mscale: float = 1.0) -> np.ndarray:
        """positions (n,), inv_freq (hd/2,) -> (n, 2, hd/2): `kernels.norms.rope_table_ref`."""
        return norms.rope_table_ref(np.asarray(positions), inv_freq, mscale)

    def rope(self, x: np.ndarray, table: np.ndarray, neox: bool) -> np.ndarray:
        """x (n, heads, head_dim), table from `rope_table`: `kernels.norms.rope_ref`."""
        return norms.rope_ref(x, table, neox)

    def store_kv(self, batch, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write `batch`'s keys and values k, v (n, n_kv_head, hd) into its rows' cache slots:
        `kernels.attention.kv_store_ref`."""
        kv = batch.kv
        attn_kernels.kv_store_ref(kv.k[layer], kv.v[layer], batch.slots, k, v)

    def attention(self, q: np.ndarray, batch, layer: int, window: int,
                  scale: float, softcap: float = 0.0) -> np.ndarray:
        """q (n, n_head, hd) of `batch`'s rows, each over its own sequence's keys and values in
        the KV cache (layer `layer`) → (n, n_head*hd), causal GQA, scores soft-capped when
        `softcap` > 0: `kernels.attention.paged_attention_ref`."""
        kv = batch.kv
        return attn_kernels.paged_attention_ref(q, kv.k[layer], kv.v[layer], batch.block_tables,
                                                batch.row_seq, batch.positions, window, scale,
                                                softcap)

    def fuse_layer(self, spec):
        """No fused layers here: the reference runs the model's code op by op."""
        return None

    def runs_fused(self, batch) -> bool:
        return False

    def silu_gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """SwiGLU, silu(gate) * up: `kernels.norms.silu_gate_ref`."""
        return norms.silu_gate_ref(gate, up)

    def gelu_gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """GeGLU, gelu_tanh(gate) * up (gemma): `kernels.norms.gelu_gate_ref`."""
        return norms.gelu_gate_ref(gate, up)

    # -- encoders (bert) -------------------------------------------------------------------

    def prepare_affine(self, weights: list[TensorInfo], biases: list[TensorInfo]):
        """Matrices and their biases that read the same input (q, k, v), stacked row-wise.

        -> (W (n_out, n_in) float32, b (n_out,) float32), n_out summed over the matrices.
        """
        w = np.concatenate([dequantize(t.data, t.qtype, t.shape) for t in weights])
        b = np.concatenate([dequantize(t.data, t.qtype, t.shape).reshape(-1) for t in biases])
        return w, b

    def affine(self, x: np.ndarray, wb, gelu: bool = False) -> np.ndarray:
        """(n, n_in) -> (n, n_out) = x @ W.T + b, then erf-GELU when `gelu`:
        `kernels.norms.add_bias_ref`."""
        w, b = wb
        return norms.add_bias_ref(x @ w.T, b, gelu)

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   residual: np.ndarray | None = None) -> np.ndarray:
        """LayerNorm of x (n, d), or of x + residual (bert's post-norm):
        `kernels.norms.layer_norm_ref`, `add_layer_norm_ref`."""
        if residual is None:
            return norms.layer_norm_ref(x, weight, bias, eps)
        return norms.add_layer_norm_ref(x, residual, weight, bias, eps)

    def gelu(self, x: np.ndarray) -> np.ndarray:
        """Exact (erf) GELU of x (n, d): `kernels.norms.gelu_ref`."""
        return norms.gelu_ref(x)

    def encoder_attention(self, qkv: np.ndarray, n_heads: int, starts: np.ndarray,
                          scale: float) -> np.ndarray:
        """qkv (n, 3*dim) fused q|k|v, sequences packed at `starts` (B+1,) -> (n, dim):
        `kernels.attention.encoder_attention_ref`."""
        n = qkv.shape[0]
        qkv4 = qkv.reshape(n, 3, n_heads, -1)  # (n, q|k|v, n_heads, hd)
        return attn_kernels.encoder_attention_ref(qkv4, starts, scale)

    def encoder_workers(self) -> int:
        """Threads an encoder batch may be split over: one (NumPy runs its own threads)."""
        return 1
