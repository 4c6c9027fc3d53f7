"""Qwen2 / Qwen2.5: llama's network with biases on the q, k and v projections.

What differs from `llama.py`, and nothing else is written here:
- q, k and v each add a bias (`blk.N.attn_q.bias`, …) after their matrix;
- RoPE rotates NeoX-style halves (llama.cpp's LLAMA_ROPE_TYPE_NEOX; the GGUF converter does
  not permute q and k for qwen2 as it does for llama).
Small models tie the output head to the embedding table (llama.py handles both).

References: Qwen Team 2024, "Qwen2 Technical Report"; llama.cpp's `llm_build_qwen2`;
transformers' `Qwen2Model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.dequant import dequantize

from ..gguf_file import GGUFFile
from . import llama

SUPPORTED_KEYS = frozenset()  # no RoPE scaling, no sliding window (engine/models/support.py)


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_neox: bool = True


def vector(gf: GGUFFile, name: str) -> np.ndarray:
    """A small float32 vector tensor (a bias, a norm weight) -> (d,)."""
    t = gf.tensors[name]
    return dequantize(t.data, t.qtype, t.shape).reshape(-1)


class Model(llama.Model):
    @classmethod
    def tensor_shapes(cls, a):
        shapes = super().tensor_shapes(a)
        q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        for i in range(a.n_layers):
            shapes.update({f"blk.{i}.attn_q.bias": (q,), f"blk.{i}.attn_k.bias": (kv,),
                           f"blk.{i}.attn_v.bias": (kv,)})
        return shapes

    def __init__(self, args: ModelArgs, gf: GGUFFile, backend):
        super().__init__(args, gf, backend)
        for i, layer in enumerate(self.layers):
            layer.qkv_bias = [vector(gf, f"blk.{i}.attn_{p}.bias") for p in "qkv"]

    def qkv(self, layer, h):
        q, k, v = super().qkv(layer, h)  # (n, heads, hd) each
        bq, bk, bv = layer.qkv_bias
        return q + bq.reshape(q.shape[1:]), k + bk.reshape(k.shape[1:]), v + bv.reshape(v.shape[1:])
