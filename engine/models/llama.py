"""Llama: the decoder-only transformer most GGUF models are (SmolLM2 among them).

    x = embed(ids)
    for each layer:
        x = x + attn_output(attention(rope(q(norm(x))), rope(k(norm(x))), v(norm(x))))
        x = x + ffn_down(silu(ffn_gate(norm(x))) * ffn_up(norm(x)))
    logits = output(norm(x))

References: Touvron et al. 2023, "LLaMA"; llama.cpp's `llm_build_llama`. Attribute names keep
the GGUF tensor names (`attn_q`, `ffn_gate`, …) so loading is a dictionary lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels.dequant import dequantize

from ..batch import Batch
from ..errors import GGUFError
from ..gguf_file import GGUFFile
from .rope import Rope, rope_from_gguf

# Maths-changing metadata this module implements (engine/models/support.py): linear RoPE
# scaling, llama3's (its `rope_freqs` tensor, engine/models/rope.py) and Mistral's sliding
# window on every layer.
SUPPORTED_KEYS = frozenset({"rope.scaling.type", "rope.scaling.factor",
                            "attention.sliding_window"})
ROPE_SCALING = frozenset({"none", "linear"})


@dataclass
class ModelArgs:
    dim: int  # embedding_length
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    n_vocab: int
    n_ctx: int  # context length the model was trained for
    norm_eps: float
    rope_base: float
    rope_neox: bool = False  # llama in GGUF rotates adjacent pairs
    sliding_window: int = 0  # every layer attends to this many positions (0: all; Mistral)

    def layer_shape(self) -> tuple[int, int, int, int]:
        return self.n_heads, self.n_kv_heads, self.head_dim, self.ffn_dim

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelArgs:
        dim = int(gf.arch("embedding_length"))
        n_heads = int(gf.arch("attention.head_count"))
        n_kv_heads = int(gf.arch("attention.head_count_kv", n_heads))
        head_dim = int(gf.arch("attention.key_length", dim // n_heads))
        if n_heads % n_kv_heads or head_dim % 2 or not head_dim:
            raise GGUFError(f"{gf.path}: {n_heads} heads cannot share {n_kv_heads} key/value "
                            f"heads of {head_dim} dimensions (a whole number of query heads "
                            f"per kv head, an even head size)")
        return cls(
            dim=dim,
            n_layers=int(gf.arch("block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=int(gf.arch("feed_forward_length")),
            n_vocab=len(gf.metadata["tokenizer.ggml.tokens"]),
            n_ctx=int(gf.arch("context_length")),
            norm_eps=float(gf.arch("attention.layer_norm_rms_epsilon")),
            rope_base=float(gf.arch("rope.freq_base", 10000.0)),
            sliding_window=int(gf.arch("attention.sliding_window", 0)),
        )


class Layer:
    """One transformer block's weights, named as in the GGUF file (`blk.N.<name>.weight`).

    Matrices that read the same input are prepared together, so the fast backend can run
    them as one kernel call: `attn_qkv` = (attn_q, attn_k, attn_v), `ffn_gate_up` =
    (ffn_gate, ffn_up).
    """

    FUSED = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up")}

    def __init__(self, gf: GGUFFile, i: int, backend, matrices: tuple[str, ...],
                 vectors: tuple[str, ...]):
        def tensor(name):
            return gf.tensors[f"blk.{i}.{name}.weight"]

        fused_parts = {part for parts in self.FUSED.values() for part in parts}
        for fused, parts in self.FUSED.items():
            setattr(self, fused, backend.prepare_many([tensor(p) for p in parts]))
        for name in matrices:
            if name not in fused_parts:
                setattr(self, name, backend.prepare(tensor(name)))
        for name in vectors:  # norm weights: small float32 vectors
            t = tensor(name)
            setattr(self, name, dequantize(t.data, t.qtype, t.shape).reshape(-1))


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """One layer as `backend.fuse_layer` reads it, to run a pass a layer per call:
    llama's maths (`attention_block`, `ffn_block` below), with what gemma3 adds. The
    prepared weights are the layer's own (nothing is copied)."""

    qkv: object  # q|k|v as `backend.prepare_many` made it
    attn_output: object
    gate_up: object  # gate|up as `backend.prepare_many` made it
    down: object
    attn_norm: np.ndarray  # (dim,)
    ffn_norm: np.ndarray
    rope: Rope
    window: int  # sliding window (0: every position)
    scale: float  # on the attention scores
    eps: float
    shape: tuple[int, int, int, int]  # n_heads, n_kv_heads, head_dim, ffn_dim
    gelu: bool = False  # the FFN gate: GELU (tanh) instead of SiLU
    q_norm: np.ndarray | None = None  # per-head norms before RoPE, (head_dim,)
    k_norm: np.ndarray | None = None
    post_attention_norm: np.ndarray | None = None  # norms after each sub-block, (dim,)
    post_ffw_norm: np.ndarray | None = None


def runs_own(model, cls, names: tuple[str, ...]) -> bool:
    """True when `model` runs `cls`'s own version of each method in `names` (a subclass that
    overrides one changes the maths, and a fused layer written for `cls` would not follow)."""
    return all(getattr(type(model), n) is getattr(cls, n) for n in names)


class Model:
    MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    VECTORS = ("attn_norm", "ffn_norm")
    HEAD_VECTORS = ("attn_q_norm", "attn_k_norm")  # per-head norms (gemma3): (head_dim,)
    Layer = Layer  # an architecture with other fused matrices brings its own (phi3)

    def __init__(self, args: ModelArgs, gf: GGUFFile, backend):
        gf.check_shapes(self.tensor_shapes(args))  # a damaged file fails here, not mid-forward
        self.args = args
        self.backend = backend
        self.token_embd = backend.prepare_embedding(gf.tensors["token_embd.weight"])
        self.layers = [self.Layer(gf, i, backend, self.MATRICES, self.VECTORS)
                       for i in range(args.n_layers)]
        norm = gf.tensors["output_norm.weight"]
        self.output_norm = dequantize(norm.data, norm.qtype, norm.shape).reshape(-1)
        # Small models tie the output head to the embedding table.
        head = gf.tensors.get("output.weight", gf.tensors["token_embd.weight"])
        self.output = backend.prepare(head)
        self.rope = rope_from_gguf(gf, args.rope_base, args.head_dim, args.rope_neox, args.n_ctx)
        self.fused = self.fuse_layers()

    def fuse_layers(self) -> list | None:
        """Each layer as one call of the backend for untraced passes (kernels/decode_layer.py),
        or None where the backend or this architecture has no such path."""
        specs = [self.layer_spec(i, layer) for i, layer in enumerate(self.layers)]
        if any(s is None for s in specs):
            return None
        fused = [self.backend.fuse_layer(s) for s in specs]
        return None if any(f is None for f in fused) else fused

    def layer_spec(self, i: int, layer: Layer) -> LayerSpec | None:
        """Layer i for `backend.fuse_layer`, or None when a subclass changed the maths."""
        if not runs_own(self, Model, ("attention_block", "ffn_block", "qkv")):
            return None
        a = self.args
        return LayerSpec(layer.attn_qkv, layer.attn_output, layer.ffn_gate_up, layer.ffn_down,
                         layer.attn_norm, layer.ffn_norm, self.rope, a.sliding_window,
                         1.0 / math.sqrt(a.head_dim), a.norm_eps, a.layer_shape())

    @classmethod
    def matrix_shapes(cls, a: ModelArgs) -> dict[str, tuple[int, int]]:
        """(n_out, n_in) of each layer matrix, from the args (`attn_qkv`: q, k, v stacked)."""
        q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        return {"attn_q": (q, a.dim), "attn_k": (kv, a.dim), "attn_v": (kv, a.dim),
                "attn_qkv": (q + 2 * kv, a.dim), "attn_output": (a.dim, q),
                "ffn_gate": (a.ffn_dim, a.dim), "ffn_up": (a.ffn_dim, a.dim),
                "ffn_down": (a.dim, a.ffn_dim)}

    @classmethod
    def tensor_shapes(cls, a: ModelArgs) -> dict[str, tuple[int, ...]]:
        """The shape (NumPy order) of every tensor this network reads, from its args."""
        matrices = cls.matrix_shapes(a)
        shapes = {"token_embd.weight": (a.n_vocab, a.dim), "output_norm.weight": (a.dim,)}
        for i in range(a.n_layers):
            shapes.update({f"blk.{i}.{m}.weight": matrices[m] for m in cls.MATRICES
                           if m in matrices})
            shapes.update({f"blk.{i}.{v}.weight": (a.head_dim,) if v in cls.HEAD_VECTORS
                           else (a.dim,) for v in cls.VECTORS})
        return shapes

    def kv_layout(self) -> tuple[int, int, int]:
        """What one position costs in the KV cache: (n_layers, n_kv_heads, head_dim)."""
        a = self.args
        return a.n_layers, a.n_kv_heads, a.head_dim

    # -- the forward pass, in reading order ------------------------------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.backend.embed(self.token_embd, ids)  # (n, dim)

    def forward(self, batch: Batch) -> np.ndarray:
        """The packed tokens of `batch` → final-normed hidden states (n, dim). Each row's key
        and value go into its sequence's blocks of the KV cache on the way."""
        rec = batch.recorder  # None unless this pass is traced (engine/trace.py)
        x = self.embed(batch.ids)  # (n, dim)
        rope = self.rope_tables(batch.positions)  # every layer turns by the same angles
        fused = self.fused if rec is None and self.backend.runs_fused(batch) else None
        for i, layer in enumerate(self.layers):
            if fused is not None:  # the same maths, a layer per kernel call
                x = self.backend.decoder_layer(fused[i], x, batch, i, rope)
                continue
            attn = self.attention_block(i, layer, x, batch, rope)
            x = x + (attn if rec is None else rec.attn_out(i, attn))
            mlp = self.ffn_block(layer, x)
            x = x + (mlp if rec is None else rec.mlp_out(i, mlp))
            if rec is not None:
                x = rec.resid_post(i, x)
        return self.final_norm(x)

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        """The residual stream (n, dim) → normed for the output head."""
        return self.backend.rms_norm(x, self.output_norm, self.args.norm_eps)

    def ropes(self) -> tuple[Rope, ...]:
        """The RoPEs the layers use (gemma3's sliding layers have one of their own)."""
        return (self.rope,)

    def rope_tables(self, positions: np.ndarray) -> dict[Rope, np.ndarray]:
        """The rotary angles of the batch's rows, once per forward pass: {rope: table}."""
        b, hd = self.backend, self.args.head_dim
        return {r: r.table(b, positions, hd) for r in self.ropes()}

    def logits(self, h: np.ndarray) -> np.ndarray:
        """(n, dim) hidden states → (n, n_vocab) float32 logits."""
        return self.backend.linear(h, self.output)

    def qkv(self, layer: Layer, h: np.ndarray):
        """Project normed input h (n, dim) to q (n, n_heads, hd) and k, v (n, n_kv_heads, hd)."""
        a, b = self.args, self.backend
        n = h.shape[0]
        q, k, v = b.linear_many(h, layer.attn_qkv)
        q = q.reshape(n, a.n_heads, a.head_dim)
        k = k.reshape(n, a.n_kv_heads, a.head_dim)
        v = v.reshape(n, a.n_kv_heads, a.head_dim)
        return q, k, v

    def attention_block(self, i: int, layer: Layer, x: np.ndarray, batch: Batch,
                        rope: dict) -> np.ndarray:
        a, b = self.args, self.backend
        h = b.rms_norm(x, layer.attn_norm, a.norm_eps)
        q, k, v = self.qkv(layer, h)
        q = self.rope.rotate(b, q, rope)
        k = self.rope.rotate(b, k, rope)
        b.store_kv(batch, i, k, v)  # into each sequence's KV blocks
        scale = 1.0 / math.sqrt(a.head_dim)
        o = b.attention(q, batch, i, a.sliding_window, scale)  # (n, n_heads * hd)
        if batch.recorder is not None:  # attention weights, head ablation (engine/trace.py)
            o = batch.recorder.heads(i, q, batch, a.sliding_window, scale, o)
        return b.linear(o, layer.attn_output)  # (n, dim)

    def ffn_block(self, layer: Layer, x: np.ndarray) -> np.ndarray:
        b = self.backend
        h = b.rms_norm(x, layer.ffn_norm, self.args.norm_eps)
        gate, up = b.linear_many(h, layer.ffn_gate_up)  # (n, ffn_dim) each
        return b.linear(b.silu_gate(gate, up), layer.ffn_down)  # (n, dim)
