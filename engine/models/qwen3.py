"""Qwen3 (dense): llama's network with a per-head RMSNorm on q and k.

What differs from `llama.py`, and nothing else is written here:
- q and k get their own RMSNorm over each head (`attn_q_norm`, `attn_k_norm`, (head_dim,))
  before RoPE, as in Gemma 3; no biases (Qwen2 had them);
- RoPE rotates NeoX-style halves;
- head_dim is its own hyperparameter (`attention.key_length`: 128 while dim / n_heads is 64
  in Qwen3-0.6B), read by llama.py already.

References: Qwen Team 2025, "Qwen3 Technical Report"; llama.cpp's `llm_build_qwen3`;
transformers' `Qwen3Model`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import llama

SUPPORTED_KEYS = frozenset()  # no RoPE scaling, no sliding window (engine/models/support.py)


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_neox: bool = True


class Model(llama.Model):
    VECTORS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm")

    def qkv(self, layer, h):
        a, b = self.args, self.backend
        q, k, v = super().qkv(layer, h)  # (n, heads, hd) each
        return b.rms_norm(q, layer.attn_q_norm, a.norm_eps), b.rms_norm(
            k, layer.attn_k_norm, a.norm_eps), v
