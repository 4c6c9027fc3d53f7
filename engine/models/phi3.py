"""Phi-3 / Phi-3.5 (mini): llama's network with its matrices stored fused.

What differs from `llama.py`, and nothing else is written here:
- q, k and v are one matrix `attn_qkv` (rows q | k | v) and gate and up are one matrix
  `ffn_up` (rows gate | up, 2 * ffn_dim), so each is a single `linear` whose output is cut;
- RoPE rotates NeoX-style halves, and the 128k-context models scale it with longrope
  (`rope_factors_short` / `rope_factors_long`, `rope.scaling.attn_factor`: rope.py);
- `attention.sliding_window`, when set, applies to every layer (Phi-3-mini-4k: 2047).

References: Abdin et al. 2024, "Phi-3 Technical Report"; llama.cpp's `llm_build_phi3`;
transformers' `Phi3Model`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import llama

SUPPORTED_KEYS = frozenset({"attention.sliding_window", "rope.scaling.attn_factor"})


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_neox: bool = True


class Layer(llama.Layer):
    FUSED = {}  # fused in the file already


class Model(llama.Model):
    MATRICES = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
    Layer = Layer

    @classmethod
    def matrix_shapes(cls, a):
        return {**super().matrix_shapes(a), "ffn_up": (2 * a.ffn_dim, a.dim)}  # gate | up

    def qkv(self, layer, h):
        a = self.args
        n = h.shape[0]
        qkv = self.backend.linear(h, layer.attn_qkv)  # (n, (n_heads + 2 n_kv_heads) * hd)
        nq, nk = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        q = qkv[:, :nq].reshape(n, a.n_heads, a.head_dim)
        k = qkv[:, nq:nq + nk].reshape(n, a.n_kv_heads, a.head_dim)
        v = qkv[:, nq + nk:].reshape(n, a.n_kv_heads, a.head_dim)
        return q, k, v

    def ffn_block(self, layer, x):
        b = self.backend
        h = b.rms_norm(x, layer.ffn_norm, self.args.norm_eps)
        gate_up = b.linear(h, layer.ffn_up)  # (n, 2 * ffn_dim)
        f = self.args.ffn_dim
        return b.linear(b.silu_gate(gate_up[:, :f], gate_up[:, f:]), layer.ffn_down)
