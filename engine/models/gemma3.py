"""Gemma 3 (text): llama's skeleton with what Google changed.

What differs from `llama.py`, and nothing else is written here:
- the embeddings are scaled by sqrt(dim);
- q and k get their own per-head RMSNorm before RoPE, and RoPE rotates NeoX-style halves;
- attention scores are scaled by 1/sqrt(head_dim) on q (query_pre_attn_scalar = head_dim);
- five of every six layers attend only to a sliding window (512 positions) and use a RoPE
  base of 10,000; every sixth layer is global with the model's own base (1,000,000) and
  RoPE scaling (linear, factor 8 in the 4B and larger models);
- both sub-blocks have a norm after them as well as before (`post_attention_norm`,
  `post_ffw_norm`), and the FFN gate is GELU (tanh approximation), not SiLU.
The GGUF converter already folded Gemma's `1 + weight` into the norm weights.

References: Gemma Team 2025, "Gemma 3 Technical Report"; llama.cpp's `llm_build_gemma3_iswa`;
transformers' `Gemma3TextModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..gguf_file import GGUFFile
from . import llama
from .rope import Rope

# engine/models/support.py; linear RoPE scaling applies to the global layers only
SUPPORTED_KEYS = frozenset({"attention.sliding_window", "rope.scaling.type",
                            "rope.scaling.factor"})
ROPE_SCALING = frozenset({"none", "linear"})
SLIDING_WINDOW_PATTERN = 6  # layer i is global when (i + 1) % 6 == 0
LOCAL_ROPE = Rope(10000.0, neox=True)  # the sliding layers' RoPE: never scaled


@dataclass
class ModelArgs(llama.ModelArgs):
    sliding_window: int = 512
    rope_neox: bool = True

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelArgs:
        base = llama.ModelArgs.from_gguf(gf)
        return cls(**{**base.__dict__, "rope_neox": True,
                      "sliding_window": int(gf.arch("attention.sliding_window", 512))})

    def is_sliding(self, layer: int) -> bool:
        return (layer + 1) % SLIDING_WINDOW_PATTERN != 0


class Model(llama.Model):
    VECTORS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm",
               "post_attention_norm", "post_ffw_norm")

    def embed(self, ids: np.ndarray) -> np.ndarray:
        x = super().embed(ids)  # (n, dim)
        return x * np.float32(math.sqrt(self.args.dim))

    def layer_spec(self, i: int, layer) -> llama.LayerSpec | None:
        if not llama.runs_own(self, Model, ("attention_block", "ffn_block", "qkv")):
            return None  # gemma2's soft-capping
        a = self.args
        sliding = a.is_sliding(i)
        return llama.LayerSpec(
            layer.attn_qkv, layer.attn_output, layer.ffn_gate_up, layer.ffn_down,
            layer.attn_norm, layer.ffn_norm, LOCAL_ROPE if sliding else self.rope,
            a.sliding_window if sliding else 0, 1.0 / math.sqrt(a.head_dim), a.norm_eps,
            a.layer_shape(), gelu=True, q_norm=layer.attn_q_norm, k_norm=layer.attn_k_norm,
            post_attention_norm=layer.post_attention_norm, post_ffw_norm=layer.post_ffw_norm)

    def ropes(self) -> tuple[Rope, ...]:
        return (LOCAL_ROPE, self.rope)  # sliding layers, global ones

    def attention_block(self, i, layer, x, batch, tables):
        a, b = self.args, self.backend
        h = b.rms_norm(x, layer.attn_norm, a.norm_eps)
        q, k, v = self.qkv(layer, h)  # (n, heads, hd)
        q = b.rms_norm(q, layer.attn_q_norm, a.norm_eps)
        k = b.rms_norm(k, layer.attn_k_norm, a.norm_eps)
        sliding = a.is_sliding(i)
        rope = LOCAL_ROPE if sliding else self.rope  # self.rope: the file's, maybe scaled
        q = rope.rotate(b, q, tables)
        k = rope.rotate(b, k, tables)
        b.store_kv(batch, i, k, v)
        window = a.sliding_window if sliding else 0
        scale = 1.0 / math.sqrt(a.head_dim)
        o = b.attention(q, batch, i, window, scale)
        if batch.recorder is not None:  # attention weights, head ablation (engine/trace.py)
            o = batch.recorder.heads(i, q, batch, window, scale, o)
        o = b.linear(o, layer.attn_output)  # (n, dim)
        return b.rms_norm(o, layer.post_attention_norm, a.norm_eps)

    def ffn_block(self, layer, x):
        a, b = self.args, self.backend
        h = b.rms_norm(x, layer.ffn_norm, a.norm_eps)
        gate, up = b.linear_many(h, layer.ffn_gate_up)
        out = b.linear(b.gelu_gate(gate, up), layer.ffn_down)
        return b.rms_norm(out, layer.post_ffw_norm, a.norm_eps)
