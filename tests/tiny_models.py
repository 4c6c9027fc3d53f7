"""Tiny random GGUF models of each architecture, written with gguf.GGUFWriter.

Small enough to build in milliseconds; real enough to go through the same loader, tokenizer
metadata and forward pass as the real models.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

VOCAB = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁a", "▁b", "ab"]


def add_tiny_vocab(w) -> None:
    """The shared tiny SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, 3 pieces."""
    w.add_tokenizer_model("llama")
    w.add_token_list(VOCAB)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-1.0, -1.0, -2.0])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1, 1, 1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def _tensor(writer: GGUFWriter, name: str, array: np.ndarray, qtype=GGMLQuantizationType.F32):
    """Add `array` (NumPy order, (n_out, n_in)) to the file, quantized to `qtype`."""
    array = array.astype(np.float32)
    if qtype == GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
    else:
        writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)


def write_tiny(path, arch: str = "llama", seed: int = 0, qtype=GGMLQuantizationType.Q8_0,
               n_layers: int = 2, dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
               head_dim: int = 16, ffn: int = 96, n_ctx: int = 128, sliding_window: int = 8,
               metadata: dict | None = None, extra_tensors: dict | None = None):
    """A random llama or gemma3 model; `metadata` (key -> str/int/float) and `extra_tensors`
    (name -> array) are added as they are."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_context_length(n_ctx)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(sliding_window)
    add_tiny_vocab(w)
    for key, value in (metadata or {}).items():
        add = w.add_string if isinstance(value, str) else (
            w.add_float32 if isinstance(value, float) else w.add_uint32)
        add(key, value)

    def rand(*shape, scale=0.2):
        return rng.normal(0, scale, size=shape)

    _tensor(w, "token_embd.weight", rand(len(VOCAB), dim, scale=1.0), qtype)
    _tensor(w, "output_norm.weight", 1 + rand(dim, scale=0.1))
    for name, array in (extra_tensors or {}).items():
        _tensor(w, name, np.asarray(array))
    for i in range(n_layers):
        p = f"blk.{i}."
        _tensor(w, p + "attn_norm.weight", 1 + rand(dim, scale=0.1))
        _tensor(w, p + "ffn_norm.weight", 1 + rand(dim, scale=0.1))
        _tensor(w, p + "attn_q.weight", rand(n_heads * head_dim, dim), qtype)
        _tensor(w, p + "attn_k.weight", rand(n_kv_heads * head_dim, dim), qtype)
        _tensor(w, p + "attn_v.weight", rand(n_kv_heads * head_dim, dim), qtype)
        _tensor(w, p + "attn_output.weight", rand(dim, n_heads * head_dim), qtype)
        _tensor(w, p + "ffn_gate.weight", rand(ffn, dim), qtype)
        _tensor(w, p + "ffn_up.weight", rand(ffn, dim), qtype)
        _tensor(w, p + "ffn_down.weight", rand(dim, ffn), qtype)
        if arch == "gemma3":
            for name in ("attn_q_norm", "attn_k_norm"):
                _tensor(w, p + name + ".weight", 1 + rand(head_dim, scale=0.1))
            for name in ("post_attention_norm", "post_ffw_norm"):
                _tensor(w, p + name + ".weight", 1 + rand(dim, scale=0.1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_bert(path, seed: int = 0, qtype=GGMLQuantizationType.F32, n_layers: int = 2,
                    dim: int = 48, n_heads: int = 4, ffn: int = 80, n_ctx: int = 64,
                    pooling: int = 1, max_seq_length: int | None = None):
    """A random encoder in llama.cpp's bert layout (`pooling`: 1 mean, 2 cls), optionally with
    the sentence model's input limit `bert.max_seq_length`.

    Its vocabulary is the SentencePiece one above, so it loads without a WordPiece tokenizer.
    """
    from gguf import MODEL_ARCH, PoolingType, get_tensor_name_map

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "bert")
    w.add_context_length(n_ctx)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(PoolingType(pooling))
    if max_seq_length is not None:
        w.add_uint32("bert.max_seq_length", max_seq_length)
    add_tiny_vocab(w)
    names = get_tensor_name_map(MODEL_ARCH.BERT, n_layers)

    def rand(*shape, scale=0.2):
        return rng.normal(0, scale, size=shape)

    def norm(name):
        _tensor(w, name + ".weight", 1 + rand(dim, scale=0.1))
        _tensor(w, name + ".bias", rand(dim, scale=0.1))

    def linear(name, n_out, n_in):
        _tensor(w, name + ".weight", rand(n_out, n_in), qtype)
        _tensor(w, name + ".bias", rand(n_out, scale=0.1))

    _tensor(w, "token_embd.weight", rand(len(VOCAB), dim, scale=1.0), qtype)
    _tensor(w, "position_embd.weight", rand(n_ctx, dim, scale=0.5))
    _tensor(w, "token_types.weight", rand(2, dim, scale=0.5))
    norm("token_embd_norm")
    for i in range(n_layers):
        p = f"blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            linear(p + name, dim, dim)
        linear(p + "ffn_up", ffn, dim)
        linear(p + "ffn_down", dim, ffn)
        norm(p + "attn_output_norm")
        norm(p + "layer_output_norm")
    assert names.get_name("encoder.layer.0.attention.output.LayerNorm") == "blk.0.attn_output_norm"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
