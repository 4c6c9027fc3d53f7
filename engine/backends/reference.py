"""The reference backend: every operation in plain NumPy, float32, on dequantized weights.

This is the oracle the fast backend is tested against, so it favours the obvious
formulation over speed. Shapes follow docs/internals.md.
"""

from __future__ import annotations

import math

import numpy as np

from kernels.dequant import dequantize, dequantize_rows

from ..gguf_file import TensorInfo


class ReferenceBackend:
    name = "reference"

    def prepare(self, t: TensorInfo) -> np.ndarray:
        """Dequantize a tensor once at load time → float32 array of `t.shape`."""
        return dequantize(t.data, t.qtype, t.shape)

    def prepare_many(self, ts: list[TensorInfo]) -> list[np.ndarray]:
        """Matrices that read the same input (q, k, v or gate, up), for `linear_many`."""
        return [self.prepare(t) for t in ts]

    def prepare_embedding(self, t: TensorInfo):
        """The token-embedding table stays quantized; rows are dequantized on lookup."""
        return t

    def embed(self, table: TensorInfo, ids: np.ndarray) -> np.ndarray:
        """(n,) token ids → (n, dim) float32 rows of the embedding table."""
        return dequantize_rows(table.data, table.qtype, table.shape, np.asarray(ids))

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(n, n_in) @ (n_out, n_in).T → (n, n_out). Where the time goes."""
        return x @ w.T

    def linear_many(self, x: np.ndarray, ws: list[np.ndarray]) -> list[np.ndarray]:
        """One `linear` per matrix; the fast backend runs them as one kernel call."""
        return [x @ w.T for w in ws]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """Normalize the last axis to unit root-mean-square, then scale by `weight`."""
        mean_square = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(mean_square + eps)) * weight

    def rope(self, x: np.ndarray, positions: np.ndarray, freq_base: float,
             neox: bool) -> np.ndarray:
        """Rotary position embedding. x: (n, heads, head_dim); positions: (n,).

        Dimension pair i rotates by angle pos * base^(-2i/head_dim). `neox=False` pairs
        elements (2i, 2i+1) (llama in GGUF, whose q/k rows the converter permuted);
        `neox=True` pairs (i, i + head_dim/2) (gemma3, GPT-NeoX).
        """
        head_dim = x.shape[-1]
        inv_freq = freq_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (n, head_dim/2)
        cos = np.cos(angles).astype(np.float32)[:, None, :]  # (n, 1, head_dim/2)
        sin = np.sin(angles).astype(np.float32)[:, None, :]
        if neox:
            a, b = x[..., : head_dim // 2], x[..., head_dim // 2:]
        else:
            a, b = x[..., 0::2], x[..., 1::2]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        out = np.empty_like(x)
        if neox:
            out[..., : head_dim // 2], out[..., head_dim // 2:] = ra, rb
        else:
            out[..., 0::2], out[..., 1::2] = ra, rb
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int,
                  window: int, scale: float) -> np.ndarray:
        """Causal grouped-query attention over the cache.

        q: (n, n_head, hd) for positions pos0..pos0+n-1; k, v: (n_kv_head, pos0+n, hd).
        Returns (n, n_head*hd).
        """
        n, n_head, hd = q.shape
        n_kv_head, n_keys, _ = k.shape
        group = n_head // n_kv_head
        q_pos = pos0 + np.arange(n)[:, None]  # (n, 1)
        k_pos = np.arange(n_keys)[None, :]  # (1, n_keys)
        allowed = k_pos <= q_pos  # causal
        if window > 0:
            allowed &= k_pos > q_pos - window  # sliding window: the last `window` positions
        out = np.empty((n, n_head, hd), dtype=np.float32)
        for h in range(n_head):
            kv = h // group
            scores = (q[:, h, :] @ k[kv].T) * scale  # (n, n_keys)
            scores = np.where(allowed, scores, -np.inf)
            scores -= scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores)
            weights /= weights.sum(axis=-1, keepdims=True)
            out[:, h, :] = weights @ v[kv]  # (n, hd)
        return out.reshape(n, n_head * hd)

    def silu_gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """SwiGLU: silu(gate) * up."""
        sigmoid = 0.5 * (1.0 + np.tanh(0.5 * gate))  # = 1/(1+exp(-gate)), without overflow
        return gate * sigmoid * up

    def gelu_gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """GeGLU with the tanh approximation of GELU (gemma): gelu_tanh(gate) * up."""
        c = np.float32(np.sqrt(2.0 / np.pi))
        return 0.5 * gate * (1.0 + np.tanh(c * (gate + np.float32(0.044715) * gate ** 3))) * up

    # -- encoders (bert) -------------------------------------------------------------------

    def prepare_affine(self, weights: list[TensorInfo], biases: list[TensorInfo]):
        """Matrices and their biases that read the same input (q, k, v), stacked row-wise.

        -> (W (n_out, n_in) float32, b (n_out,) float32), n_out summed over the matrices.
        """
        w = np.concatenate([dequantize(t.data, t.qtype, t.shape) for t in weights])
        b = np.concatenate([dequantize(t.data, t.qtype, t.shape).reshape(-1) for t in biases])
        return w, b

    def affine(self, x: np.ndarray, wb, gelu: bool = False) -> np.ndarray:
        """(n, n_in) -> (n, n_out) = x @ W.T + b, then erf-GELU when `gelu`."""
        w, b = wb
        y = x @ w.T + b
        return self.gelu(y) if gelu else y

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   residual: np.ndarray | None = None) -> np.ndarray:
        """LayerNorm of x (n, d) (plus `residual`, bert's post-norm) over the last axis."""
        if residual is not None:
            x = x + residual
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * weight + bias

    def gelu(self, x: np.ndarray) -> np.ndarray:
        """Exact GELU, 0.5 * x * (1 + erf(x / sqrt(2))), in float64 then back to float32."""
        erf = np.frompyfunc(math.erf, 1, 1)(x.astype(np.float64) / math.sqrt(2.0))
        return (0.5 * x * (1.0 + erf.astype(np.float64))).astype(np.float32)

    def encoder_attention(self, qkv: np.ndarray, n_heads: int, starts: np.ndarray,
                          scale: float) -> np.ndarray:
        """Bidirectional attention within each sequence of a packed batch.

        qkv (n, 3*dim) is the fused q|k|v projection, dim = n_heads * hd; sequence s is rows
        starts[s]..starts[s+1]-1. A query sees every key of its own sequence, none of
        another's (as padding + a key mask would). Returns (n, dim).
        """
        n = qkv.shape[0]
        q, k, v = qkv.reshape(n, 3, n_heads, -1).transpose(1, 0, 2, 3)  # (n, n_heads, hd) each
        out = np.empty(q.shape, dtype=np.float32)
        for a, b in zip(starts[:-1], starts[1:]):
            for h in range(n_heads):
                scores = (q[a:b, h] @ k[a:b, h].T) * scale  # (len, len), no mask
                scores -= scores.max(axis=-1, keepdims=True)
                weights = np.exp(scores)
                weights /= weights.sum(axis=-1, keepdims=True)
                out[a:b, h] = weights @ v[a:b, h]  # (len, hd)
        return out.reshape(n, -1)
