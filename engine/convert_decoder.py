"""Convert a Hugging Face decoder checkpoint (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2)
into a GGUF file, following llama.cpp's `convert_hf_to_gguf.py` so the file loads there too.

The folder holds `config.json`, the weights as `model.safetensors` (or shards listed in
`model.safetensors.index.json`; F32, F16 or BF16) and the tokenizer as `tokenizer.json`
(+ `tokenizer_config.json`). What the conversion does, by architecture:

- LlamaForCausalLM -> llama: q and k rows permuted (HF rotates halves, GGUF llama adjacent
  pairs); rope_scaling linear -> the scaling keys, llama3 -> the `rope_freqs` tensor;
- MistralForCausalLM -> llama: as Llama, plus `sliding_window`;
- Qwen2ForCausalLM -> qwen2 (q/k/v biases kept), Qwen3ForCausalLM -> qwen3 (q/k norms kept);
- Phi3ForCausalLM -> phi3: qkv_proj and gate_up_proj stay fused; longrope -> the
  `rope_factors_long/short` tensors, `attn_factor`, the original context; `sliding_window`;
- Gemma2ForCausalLM -> gemma2: norm weights + 1 (HF stores w - 1), the soft-caps, the
  sliding window, query_pre_attn_scalar (as `attention.scale` when it is not head_dim).

Tensor names come from `gguf.get_tensor_name_map(arch, n_layers)`. `outtype` f32 / f16 / bf16
casts 2-D matrices (1-D norms and biases stay F32, as llama.cpp keeps them); q8_0 quantizes
the matrices whose rows are whole blocks of 32 with `gguf.quants`. What the converter cannot
carry over exactly (a RoPE scaling it does not know, partial rotary, Qwen2's sliding window)
is a ConvertError naming it, never a file that runs wrong.

Tokenizer: a byte-level BPE `tokenizer.json` becomes `tokenizer.ggml.model = gpt2` with its
merges; `tokenizer.ggml.pre` is named from its pre-tokenizer regex (llama.cpp names it by a
hash of sample output; the regex says the same here). A SentencePiece-style BPE (byte
fallback, `▁` for spaces: Llama 2, Mistral, Phi-3, Gemma) becomes `llama` with a score per
token: -(rank of the merge that makes it), so llama.cpp's highest-score-first merging follows
the merge table; `add_space_prefix` is whether its normalizer prepends `▁`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .convert import CONVERTER_VERSION, CONVERTER_VERSION_KEY, ConvertError, gguf_writer

# config.json "architectures" -> GGUF architecture
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
}
OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
NEOX_ARCHS = ("qwen2", "qwen3", "phi3", "gemma2")  # HF's rotation kept, no q/k permutation
# the pre-tokenizer regex of a byte-level tokenizer.json -> llama.cpp's tokenizer.ggml.pre
PRE_BY_REGEX = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}
SPM_SPACE = "\u2581"


def is_decoder(config: dict) -> bool:
    return any(a in ARCHITECTURES for a in config.get("architectures") or [])


@dataclass
class Hyper:
    """config.json, read once; `get` takes the first of several names a key has had."""

    raw: dict
    path: Path

    def get(self, *names, default=None):
        for name in names:
            if self.raw.get(name) is not None:
                return self.raw[name]
        return default

    def need(self, name):
        value = self.raw.get(name)
        if value is None:
            raise ConvertError(f"{self.path}: missing {name}")
        return value

    def rope(self) -> dict:
        """The RoPE parameters, wherever this transformers version put them: rope_theta,
        rope_type, factor, ... (transformers 5 `rope_parameters`, 4 `rope_scaling`)."""
        params = dict(self.raw.get("rope_parameters") or {})
        params.update(self.raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", self.raw.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        params["rope_type"] = kind.lower()
        return params


def convert_decoder(src: Path, out: Path, outtype: str, name: str | None, config: dict) -> Path:
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    hp = Hyper(config, src / "config.json")
    hf_arch = next(a for a in config["architectures"] if a in ARCHITECTURES)
    arch = ARCHITECTURES[hf_arch]
    with gguf_writer(out, arch) as w:
        w.add_name(name or src.resolve().name)
        w.add_uint32(CONVERTER_VERSION_KEY, CONVERTER_VERSION)
        w.add_file_type(OUTTYPES[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        n_layers = _add_hyperparameters(w, hp, arch, hf_arch)
        add_tokenizer(w, src, hp)
        for tname, data in _tensors(src, hp, arch, n_layers):
            _add_tensor(w, tname, data, outtype)
    return out


# ---------------------------------------------------------------------------------------------
# Hyperparameters


def _add_hyperparameters(w, hp: Hyper, arch: str, hf_arch: str) -> int:
    dim, n_heads = int(hp.need("hidden_size")), int(hp.need("num_attention_heads"))
    head_dim = int(hp.get("head_dim", default=dim // n_heads))
    n_layers = int(hp.need("num_hidden_layers"))
    n_ctx = int(hp.need("max_position_embeddings"))
    w.add_context_length(n_ctx)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(hp.need("intermediate_size")))
    w.add_head_count(n_heads)
    w.add_head_count_kv(int(hp.get("num_key_value_heads", default=n_heads)))
    w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", default=1e-6)))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = hp.rope()
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConvertError(f"{hp.path}: partial rotary embeddings are not supported")
    kind = rope["rope_type"]
    allowed = {"llama": ("default", "linear", "llama3"), "phi3": ("default", "longrope", "su")}
    if kind not in allowed.get(arch, ("default",)):
        raise ConvertError(f"{hp.path}: RoPE scaling {kind!r} is not supported for {hf_arch} "
                           f"(numbalm converts {', '.join(allowed.get(arch, ('default',)))})")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    window = hp.get("sliding_window")
    if arch == "qwen2" and hp.get("use_sliding_window") and window:
        raise ConvertError(f"{hp.path}: Qwen2's sliding window is not supported")
    if window and arch in ("llama", "phi3", "gemma2"):
        w.add_sliding_window(int(window))
    if arch == "phi3" and kind in ("longrope", "su"):
        original = int(hp.get("original_max_position_embeddings", default=n_ctx))
        scale = n_ctx / original
        attn = rope.get("attention_factor")
        if attn is None:
            attn = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        w.add_rope_scaling_attn_factors(float(attn))
        w.add_rope_scaling_orig_ctx_len(original)
    if arch == "gemma2":
        w.add_float32(gguf.Keys.LLM.ATTN_LOGIT_SOFTCAPPING.format(arch=arch),
                      float(hp.get("attn_logit_softcapping", default=0.0)))
        w.add_float32(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=arch),
                      float(hp.get("final_logit_softcapping", default=0.0)))
        scalar = float(hp.get("query_pre_attn_scalar", default=head_dim))
        if scalar != head_dim:  # llama.cpp has no key for it; numbalm reads attention.scale
            w.add_attention_scale(1.0 / math.sqrt(scalar))
        layer_types = hp.get("layer_types")
        if layer_types and any((t == "sliding_attention") != (i % 2 == 0)
                               for i, t in enumerate(layer_types)):
            raise ConvertError(f"{hp.path}: Gemma 2 layers must alternate sliding and full "
                               f"attention, starting with sliding")
    return n_layers


# ---------------------------------------------------------------------------------------------
# Tensors


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name -> array (memory-mapped; BF16 widened to float32) of one safetensors file.

    The format: u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, the
    data. Read here rather than by the `safetensors` package because NumPy has no bfloat16."""
    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError, struct.error) as e:
        raise ConvertError(f"{path}: cannot read the weights ({e})") from None
    out = {}
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ConvertError(f"{path}: tensor {tname} is {info['dtype']} (F32, F16 or BF16 "
                               f"checkpoints only)")
        a, b = info["data_offsets"]
        data = raw[8 + n + a:8 + n + b].view(dtypes[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # the high half of a float32
            data = (data.astype(np.uint32) << 16).view(np.float32)
        out[tname] = data
    return out


def read_weights(src: Path) -> dict[str, np.ndarray]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConvertError(f"{src}: no model.safetensors (the weights must be safetensors)")
    weights = {}
    for fname in files:
        weights.update(read_safetensors(src / fname))
    return weights


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's q/k rows (each head: first halves, then second halves of its pairs) -> GGUF
    llama's (pairs adjacent): llama.cpp's `LlamaModel.permute`."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensors(src: Path, hp: Hyper, arch: str, n_layers: int):
    weights = read_weights(src)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    n_heads = int(hp.need("num_attention_heads"))
    n_kv = int(hp.get("num_key_value_heads", default=n_heads))
    tied = bool(hp.get("tie_word_embeddings", default=False))
    out = []
    for hf_name in weights:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and hf_name == "lm_head.weight":
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ConvertError(f"{src}: tensor {hf_name!r} has no GGUF name for {arch}")
        data = np.asarray(weights[hf_name], np.float32)
        if arch == "llama" and gname.endswith("attn_q.weight"):
            data = permute_rope(data, n_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            data = permute_rope(data, n_kv)
        if arch == "gemma2" and gname.endswith("norm.weight"):
            data = data + 1  # Gemma's RMSNorm scales by (1 + w)
        out.append((gname, data))
    rope = hp.rope()
    head_dim = int(hp.get("head_dim", default=int(hp.need("hidden_size")) // n_heads))
    if arch == "llama" and rope["rope_type"] == "llama3":
        out.append(("rope_freqs.weight", llama3_rope_factors(rope, head_dim)))
    if arch == "phi3" and rope["rope_type"] in ("longrope", "su"):
        for kind in ("long", "short"):
            factors = np.asarray(rope[f"{kind}_factor"], np.float32)
            if factors.shape != (head_dim // 2,):
                raise ConvertError(f"{hp.path}: rope {kind}_factor has {factors.size} values, "
                                   f"not head_dim / 2 = {head_dim // 2}")
            out.append((f"rope_factors_{kind}.weight", factors))
    return sorted(out, key=lambda item: _order(item[0]))


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The per-pair divisors of llama3 RoPE scaling (llama.cpp's `rope_freqs` tensor)."""
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _order(gname: str) -> tuple[int, str]:
    parts = gname.split(".")
    return (int(parts[1]), parts[2]) if parts[0] == "blk" else (-1, gname)


def _add_tensor(w, gname: str, data: np.ndarray, outtype: str) -> None:
    if data.ndim < 2 or gname.startswith("rope_"):
        w.add_tensor(gname, data.astype(np.float32))
    elif outtype == "f16":
        w.add_tensor(gname, data.astype(np.float16))
    elif outtype == "bf16":
        q = gguf.GGMLQuantizationType.BF16
        w.add_tensor(gname, gguf.quants.quantize(data, q), raw_dtype=q)
    elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(gname, gguf.quants.quantize(data, q), raw_dtype=q)
    else:
        w.add_tensor(gname, data.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: unreadable JSON ({e})") from None


def _walk(node):
    """Every dict inside a tokenizer.json component (Sequence nests them)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def add_tokenizer(w, src: Path, hp: Hyper) -> None:
    tj = _read_json(src / "tokenizer.json")
    conf_path = src / "tokenizer_config.json"
    tconf = _read_json(conf_path) if conf_path.is_file() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"{src / 'tokenizer.json'}: a {model.get('type')} tokenizer is not "
                           f"supported (byte-level or SentencePiece-style BPE only)")
    vocab: dict[str, int] = model["vocab"]
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    n_vocab = max(int(hp.get("vocab_size", default=0)),
                  max([*vocab.values(), *(t["id"] for t in added.values())]) + 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    byte_level = any(n.get("type") == "ByteLevel" for n in _walk(tj.get("pre_tokenizer")))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for text, t in added.items():
        tokens[t["id"]] = text
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else \
            gguf.TokenType.USER_DEFINED
    if byte_level:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_name(tj, src))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    else:
        if not model.get("byte_fallback"):
            raise ConvertError(f"{src / 'tokenizer.json'}: neither byte-level nor byte-fallback "
                               f"BPE; not supported")
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        scores = [-(1.0 + rank[t]) if t in rank else 0.0 for t in tokens]
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">") and t in vocab:
                types[i] = gguf.TokenType.BYTE
        prepends = any(n.get("type") == "Prepend" or n.get("prepend_scheme") in ("always",
                                                                                  "first")
                       for n in _walk([tj.get("normalizer"), tj.get("pre_tokenizer")]))
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(prepends)
    _add_special(w, tconf, hp, tokens)
    template = tconf.get("chat_template")
    if isinstance(template, str):
        w.add_chat_template(template)


def _pre_name(tj: dict, src: Path) -> str:
    for node in _walk(tj.get("pre_tokenizer")):
        if node.get("type") == "Split":
            pattern = (node.get("pattern") or {}).get("Regex")
            if pattern in PRE_BY_REGEX:
                return PRE_BY_REGEX[pattern]
            raise ConvertError(f"{src / 'tokenizer.json'}: pre-tokenizer regex {pattern!r} is "
                               f"not one numbalm knows (llama-bpe, qwen2)")
    return "gpt2"


def _add_special(w, tconf: dict, hp: Hyper, tokens: list[str]) -> None:
    ids = {t: i for i, t in enumerate(tokens)}

    def token_id(role: str):
        value = tconf.get(f"{role}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in ids:
            return ids[value]
        value = hp.get(f"{role}_token_id")
        return value[0] if isinstance(value, list) else value

    for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                      ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        value = token_id(role)
        if isinstance(value, int):
            add(value)
    if "add_bos_token" in tconf:
        w.add_add_bos_token(bool(tconf["add_bos_token"]))
    if "add_eos_token" in tconf:
        w.add_add_eos_token(bool(tconf["add_eos_token"]))
