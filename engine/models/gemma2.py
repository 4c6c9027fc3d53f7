"""Gemma 2: Gemma 3's network (`gemma3.py`, itself llama's with Google's changes) as it was
one generation earlier, with soft-capping.

What differs from `gemma3.py` (and so, with its list, from `llama.py`):
- attention scores are soft-capped before the softmax, `s = c * tanh(s / c)` with
  c = `attn_logit_softcapping` (50), and so are the final logits (`final_logit_softcapping`,
  30) — the paged attention kernel has a soft-capped variant for this;
- every other layer (0, 2, 4, …) attends to a sliding window (4096), the others to all
  positions, and all layers share one RoPE base (no local base, no scaling);
- no q/k norms; the scores are scaled by 1/sqrt(query_pre_attn_scalar), which is head_dim in
  the 2B and 9B models; llama.cpp writes no key for it and uses 1/sqrt(dim / n_heads) for the
  46-layer 27B, and so does this module unless `attention.scale` says otherwise.

References: Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size";
llama.cpp's `llm_build_gemma2_iswa`; transformers' `Gemma2Model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..gguf_file import GGUFFile
from . import gemma3

SUPPORTED_KEYS = frozenset({"attention.sliding_window", "attn_logit_softcapping",
                            "final_logit_softcapping", "attention.scale"})
SLIDING_WINDOW_PATTERN = 2  # layer i slides when i % 2 == 0
LAYERS_27B = 46  # llama.cpp's rule for the 27B model's query scale


@dataclass
class ModelArgs(gemma3.ModelArgs):
    sliding_window: int = 4096
    attn_softcap: float = 0.0  # 0: none
    final_softcap: float = 0.0
    attn_scale: float = 0.0  # multiplies q @ k; 0: 1/sqrt(head_dim)

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelArgs:
        base = gemma3.ModelArgs.from_gguf(gf)
        scale = float(gf.arch("attention.scale", 0.0))
        if not scale:
            per_head = base.dim // base.n_heads if base.n_layers == LAYERS_27B else base.head_dim
            scale = 1.0 / math.sqrt(per_head)
        return cls(**{**base.__dict__,
                      "sliding_window": int(gf.arch("attention.sliding_window", 4096)),
                      "attn_softcap": float(gf.arch("attn_logit_softcapping", 0.0)),
                      "final_softcap": float(gf.arch("final_logit_softcapping", 0.0)),
                      "attn_scale": scale})

    def is_sliding(self, layer: int) -> bool:
        return layer % SLIDING_WINDOW_PATTERN == 0


class Model(gemma3.Model):
    VECTORS = ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm")

    def ropes(self):
        return (self.rope,)  # one RoPE for every layer, unlike gemma3

    def attention_block(self, i, layer, x, batch, tables):
        a, b = self.args, self.backend
        h = b.rms_norm(x, layer.attn_norm, a.norm_eps)
        q, k, v = self.qkv(layer, h)  # (n, heads, hd)
        q = self.rope.rotate(b, q, tables)
        k = self.rope.rotate(b, k, tables)
        b.store_kv(batch, i, k, v)
        window = a.sliding_window if a.is_sliding(i) else 0
        o = b.attention(q, batch, i, window, a.attn_scale, softcap=a.attn_softcap)
        if batch.recorder is not None:  # attention weights, head ablation (engine/trace.py)
            o = batch.recorder.heads(i, q, batch, window, a.attn_scale, o, a.attn_softcap)
        o = b.linear(o, layer.attn_output)  # (n, dim)
        return b.rms_norm(o, layer.post_attention_norm, a.norm_eps)

    def logits(self, h: np.ndarray) -> np.ndarray:
        logits = super().logits(h)  # (n, n_vocab)
        c = np.float32(self.args.final_softcap)
        return c * np.tanh(logits / c) if c else logits
