"""BERT: the bidirectional encoder behind sentence-embedding models (all-MiniLM-L6-v2).

    x = layer_norm(token_embd[ids] + position_embd[pos] + token_types[0])
    for each layer:
        x = layer_norm(x + attn_output(attention(q(x), k(x), v(x))))   # no causal mask
        x = layer_norm(x + ffn_down(gelu(ffn_up(x))))                    # erf GELU
    hidden states -> pooled (mean over the real tokens, or [CLS]) by the caller

What differs from the decoders (`llama.py`): no cache and no causal mask (every token sees
the whole sentence); learned position and token-type embeddings instead of RoPE; LayerNorm
with a bias, *after* each sub-block (post-norm) and after the embeddings; every linear has a
bias; the FFN is one GELU matrix, not a gated pair. It embeds, it does not generate.

Several sentences run as one forward pass, packed back to back (no padding) in a `Batch`, as
the decoders' tokens are: the linears see (n_tokens, dim) rows whatever sentence they come
from; only attention and pooling need the sentence boundaries `batch.starts` (B+1,): sentence
s is rows starts[s] .. starts[s+1]-1. An encoder keeps no KV cache (`kv_layout()` is None).

References: Devlin et al. 2019, "BERT"; Reimers & Gurevych 2019, "Sentence-BERT";
llama.cpp's `llm_build_bert` (GGUF tensor names, kept here as attribute names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels.dequant import dequantize

from ..batch import Batch
from ..errors import GGUFError
from ..gguf_file import GGUFFile

# llama.cpp's `bert.pooling_type` values (enum llama_pooling_type).
POOLING_TYPES = {1: "mean", 2: "cls", 3: "last"}

CAPABILITIES = frozenset({"embeddings"})


@dataclass
class ModelArgs:
    dim: int  # embedding_length
    n_layers: int
    n_heads: int
    head_dim: int
    ffn_dim: int
    n_vocab: int
    n_positions: int  # rows of position_embd (bert.context_length)
    n_ctx: int  # longest input embedded: the sentence model's max_seq_length when known
    norm_eps: float
    pooling: str  # "mean", "cls" or "last", from bert.pooling_type

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelArgs:
        dim = int(gf.arch("embedding_length"))
        n_heads = int(gf.arch("attention.head_count"))
        n_positions = int(gf.arch("context_length"))
        pooling_type = gf.arch("pooling_type", 1)
        if dim % n_heads:
            raise GGUFError(f"{gf.path}: embedding_length {dim} is not a multiple of the "
                            f"{n_heads} heads")
        return cls(
            dim=dim,
            n_layers=int(gf.arch("block_count")),
            n_heads=n_heads,
            head_dim=dim // n_heads,
            ffn_dim=int(gf.arch("feed_forward_length")),
            n_vocab=len(gf.metadata["tokenizer.ggml.tokens"]),
            n_positions=n_positions,
            n_ctx=min(n_positions, int(gf.arch("max_seq_length", n_positions))),
            norm_eps=float(gf.arch("attention.layer_norm_epsilon")),
            pooling=POOLING_TYPES.get(pooling_type, "mean") if isinstance(pooling_type, int)
            else "mean",
        )


def _vector(gf: GGUFFile, name: str) -> np.ndarray:
    t = gf.tensors[name]
    return dequantize(t.data, t.qtype, t.shape).reshape(-1)  # (d,) float32


def _norm(gf: GGUFFile, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A LayerNorm's (weight, bias), each (dim,)."""
    return _vector(gf, f"{name}.weight"), _vector(gf, f"{name}.bias")


class Layer:
    """One encoder block, named as in the GGUF file (`blk.N.<name>.weight` / `.bias`).

    Each linear is prepared with its bias (`backend.prepare_affine`); q, k and v read the
    same input and are stacked as one `attn_qkv` (n_in dim, n_out 3*dim).
    """

    def __init__(self, gf: GGUFFile, i: int, backend):
        def affine(*names):
            return backend.prepare_affine([gf.tensors[f"blk.{i}.{n}.weight"] for n in names],
                                          [gf.tensors[f"blk.{i}.{n}.bias"] for n in names])

        self.attn_qkv = affine("attn_q", "attn_k", "attn_v")
        self.attn_output = affine("attn_output")
        self.attn_output_norm = _norm(gf, f"blk.{i}.attn_output_norm")
        self.ffn_up = affine("ffn_up")
        self.ffn_down = affine("ffn_down")
        self.layer_output_norm = _norm(gf, f"blk.{i}.layer_output_norm")


class Model:
    def __init__(self, args: ModelArgs, gf: GGUFFile, backend):
        gf.check_shapes(self.tensor_shapes(args))  # a damaged file fails here, not mid-forward
        self.args = args
        self.backend = backend
        self.token_embd = backend.prepare_embedding(gf.tensors["token_embd.weight"])
        self.position_embd = backend.prepare_embedding(gf.tensors["position_embd.weight"])
        self.token_type = _vector(gf, "token_types.weight")[: args.dim]  # (dim,) type 0
        self.token_embd_norm = _norm(gf, "token_embd_norm")
        self.layers = [Layer(gf, i, backend) for i in range(args.n_layers)]

    @staticmethod
    def tensor_shapes(a: ModelArgs) -> dict[str, tuple[int | None, ...]]:
        """The shape (NumPy order; None: any) of every tensor this encoder reads."""
        d, f = a.dim, a.ffn_dim
        shapes = {"token_embd.weight": (a.n_vocab, d), "position_embd.weight": (a.n_positions, d),
                  "token_types.weight": (None, d), "token_embd_norm.weight": (d,),
                  "token_embd_norm.bias": (d,)}
        linears = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d),
                   "ffn_up": (f, d), "ffn_down": (d, f)}
        for i in range(a.n_layers):
            for name, (n_out, n_in) in linears.items():
                shapes[f"blk.{i}.{name}.weight"] = (n_out, n_in)
                shapes[f"blk.{i}.{name}.bias"] = (n_out,)
            for norm in ("attn_output_norm", "layer_output_norm"):
                shapes[f"blk.{i}.{norm}.weight"] = shapes[f"blk.{i}.{norm}.bias"] = (d,)
        return shapes

    def kv_layout(self) -> None:
        """An encoder attends within the batch and keeps no KV cache."""
        return None

    # -- the forward pass, in reading order ------------------------------------------------

    def embed(self, batch: Batch) -> np.ndarray:
        """Token + position + token-type embeddings, normed: (n, dim)."""
        b = self.backend
        x = b.embed(self.token_embd, batch.ids) + b.embed(self.position_embd, batch.positions)
        x += self.token_type  # (n, dim)
        return b.layer_norm(x, *self.token_embd_norm, self.args.norm_eps)

    def forward(self, batch: Batch) -> np.ndarray:
        """The packed sentences of `batch` -> hidden states (n, dim)."""
        x = self.embed(batch)
        for layer in self.layers:
            x = self.attention_block(layer, x, batch.starts)
            x = self.ffn_block(layer, x)
        return x

    def attention_block(self, layer: Layer, x: np.ndarray, starts: np.ndarray) -> np.ndarray:
        a, b = self.args, self.backend
        qkv = b.affine(x, layer.attn_qkv)  # (n, 3*dim): q | k | v
        o = b.encoder_attention(qkv, a.n_heads, starts, 1.0 / math.sqrt(a.head_dim))  # (n, dim)
        o = b.affine(o, layer.attn_output)
        return b.layer_norm(o, *layer.attn_output_norm, a.norm_eps, residual=x)

    def ffn_block(self, layer: Layer, x: np.ndarray) -> np.ndarray:
        b = self.backend
        h = b.affine(x, layer.ffn_up, gelu=True)  # (n, ffn_dim)
        y = b.affine(h, layer.ffn_down)  # (n, dim)
        return b.layer_norm(y, *layer.layer_output_norm, self.args.norm_eps, residual=x)
