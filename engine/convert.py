"""Convert a BERT-family sentence-transformers folder into a GGUF file (and, through
`convert_decoder.py`, a Hugging Face decoder checkpoint: Llama, Mistral, Qwen2/3, Phi-3, Gemma 2).

The output follows llama.cpp's `bert` conventions (convert_hf_to_gguf.py, class BertModel), so
the same file loads in llama.cpp too:

- tensors are renamed with `gguf.get_tensor_name_map(MODEL_ARCH.BERT, n_layers)`
  (`embeddings.word_embeddings.weight` → `token_embd.weight`, `encoder.layer.3.attention.self.
  query.bias` → `blk.3.attn_q.bias`, …); the pooler, `position_ids` and MLM heads are dropped;
- `--outtype f16` turns only 2-D weight matrices into F16; 1-D tensors (norms, biases), the
  position table and the token-type table stay F32, as llama.cpp keeps them;
- the WordPiece vocabulary is stored in llama.cpp's "phantom space" form: a continuation piece
  `##ing` is stored as `ing`, a word-start piece `the` as `▁the` (U+2581), control tokens
  (`[CLS]`, `[SEP]`, …) unchanged. `engine.wordpiece` undoes this when it loads the file;
- `bert.pooling_type` comes from `1_Pooling/config.json` (MEAN=1, CLS=2).

The weights are read from `model.safetensors` with the `safetensors` package's NumPy API (no
torch). The output is a pure function of the input folder: same files, same bytes.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import EngineError

PHANTOM_SPACE = "\u2581"  # "▁": marks a word-start piece in llama.cpp's WordPiece vocabulary
ARCHITECTURES = ("BertModel", "BertForMaskedLM")  # what `config.json` may name
OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
SKIPPED = ("embeddings.position_ids", "pooler.", "cls.")  # not used for embeddings
# Bumped whenever the converter writes different bytes for the same input, so that the
# registry converts a cached file again instead of keeping one from an older numbalm.
CONVERTER_VERSION = 2
CONVERTER_VERSION_KEY = "numbalm.converter_version"

POOLING = {"pooling_mode_mean_tokens": gguf.PoolingType.MEAN,
           "pooling_mode_cls_token": gguf.PoolingType.CLS,
           "pooling_mode_lasttoken": gguf.PoolingType.LAST}
# llama.cpp keeps these tables in F32 whatever the output type
F32_ALWAYS = ("position_embd.weight", "token_types.weight")
# tokenizer.json's post-processor hash matches llama.cpp's "bert-bge" (BAAI/bge-small-en-v1.5);
# llama.cpp ignores the pre-tokenizer for WordPiece vocabularies
TOKENIZER_PRE = "bert-bge"


class ConvertError(EngineError):
    """The source folder cannot be converted (missing files, unsupported model)."""


@dataclass(frozen=True)
class BertConfig:
    """The hyperparameters the GGUF file needs, from the folder's `config.json`."""

    n_vocab: int
    n_ctx: int
    dim: int
    ffn_dim: int
    n_layers: int
    n_heads: int
    norm_eps: float
    n_token_types: int


def convert(src: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32",
            name: str | None = None) -> Path:
    """Convert the model folder `src` into the GGUF file `out`; return `out`'s path.

    The file is written next to `out` under a temporary name and renamed into place at the
    end, so a failed conversion leaves no half file.
    """
    src, out = Path(src), Path(out)
    if src.is_dir() and (src / "config.json").is_file():
        from .convert_decoder import convert_decoder, is_decoder

        config = _read_json(src / "config.json")
        if is_decoder(config):  # Llama, Mistral, Qwen2/3, Phi-3, Gemma 2: convert_decoder.py
            return convert_decoder(src, out, outtype, name, config)
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    cfg = read_config(src)
    tokens, token_types, special = read_vocab(src, cfg.n_vocab)
    tensors = read_tensors(src / "model.safetensors", cfg.n_layers, outtype)
    with gguf_writer(out, "bert") as writer:
        _add_metadata(writer, cfg, name or src.resolve().name, OUTTYPES[outtype],
                      _pooling_type(src), _max_seq_length(src))
        _add_vocab(writer, tokens, token_types, special, cfg.n_token_types)
        for tname, data in tensors:
            writer.add_tensor(tname, data)
    return out


@contextmanager
def gguf_writer(out: Path, arch: str):
    """A `gguf.GGUFWriter` for `out`: it writes `out`.part, which becomes `out` only once the
    body has added everything and the file is whole; on any failure the part is removed."""
    tmp = out.with_name(out.name + ".part")
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Reading the source folder


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing; is {path.parent} a sentence-transformers "
                           f"BERT model folder?") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: unreadable JSON ({e})") from None


def read_config(src: Path) -> BertConfig:
    """`config.json` → BertConfig; anything but a BERT model is a ConvertError."""
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    hp = _read_json(src / "config.json")
    archs = hp.get("architectures") or [hp.get("model_type", "?")]
    if not any(a in ARCHITECTURES for a in archs) and hp.get("model_type") != "bert":
        from .convert_decoder import ARCHITECTURES as DECODERS

        raise ConvertError(f"{src / 'config.json'}: architecture {', '.join(map(str, archs))} "
                           f"is not supported (numbalm converts {', '.join(ARCHITECTURES)} "
                           f"and the decoders {', '.join(DECODERS)})")
    if hp.get("position_embedding_type", "absolute") != "absolute":
        raise ConvertError(f"{src / 'config.json'}: position_embedding_type "
                           f"{hp['position_embedding_type']!r} is not supported")
    try:
        return BertConfig(
            n_vocab=int(hp["vocab_size"]), n_ctx=int(hp["max_position_embeddings"]),
            dim=int(hp["hidden_size"]), ffn_dim=int(hp["intermediate_size"]),
            n_layers=int(hp["num_hidden_layers"]), n_heads=int(hp["num_attention_heads"]),
            norm_eps=float(hp.get("layer_norm_eps", 1e-12)),
            n_token_types=int(hp.get("type_vocab_size", 1)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{src / 'config.json'}: missing or bad field {e}") from None


def read_vocab(src: Path, n_vocab: int) -> tuple[list[str], list[int], dict[str, int]]:
    """`vocab.txt` (+ special-token configs) → (gguf tokens, token types, special ids).

    Tokens come back in llama.cpp's phantom-space form; ids past the end of vocab.txt (when
    config.json says the vocabulary is larger) become unused `[PAD<i>]` tokens, as in llama.cpp.
    """
    try:
        lines = (src / "vocab.txt").read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise ConvertError(f"{src / 'vocab.txt'}: missing (a WordPiece vocabulary is "
                           f"required)") from None
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) > n_vocab:
        raise ConvertError(f"{src / 'vocab.txt'}: {len(lines)} tokens, more than config.json's "
                           f"vocab_size {n_vocab}")
    control = _special_tokens(src)
    ids = {tok: i for i, tok in enumerate(lines)}
    tokens, types = [], []
    for i in range(n_vocab):
        if i >= len(lines):
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif lines[i] in control.values():
            tokens.append(lines[i])
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(to_phantom(lines[i]))
            types.append(gguf.TokenType.NORMAL)
    special = {role: ids[tok] for role, tok in control.items() if tok in ids}
    for role in ("cls", "sep", "unk"):
        if role not in special:
            raise ConvertError(f"{src}: no [{role.upper()}] token in vocab.txt")
    return tokens, types, special


def to_phantom(piece: str) -> str:
    """A WordPiece vocabulary entry in llama.cpp's form: `##ing` → `ing`, `the` → `▁the`."""
    return piece[2:] if piece.startswith("##") else PHANTOM_SPACE + piece


def _special_tokens(src: Path) -> dict[str, str]:
    """Role → token text (`cls` → `[CLS]`), from tokenizer_config.json or BERT's defaults."""
    roles = {"cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "pad": "[PAD]", "mask": "[MASK]"}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = src / fname
        if path.is_file():
            conf = _read_json(path)
            for role in roles:
                value = conf.get(f"{role}_token")
                if isinstance(value, dict):  # {"content": "[CLS]", ...}
                    value = value.get("content")
                if isinstance(value, str):
                    roles[role] = value
    return roles


def _max_seq_length(src: Path) -> int | None:
    """sentence-transformers' input limit (`sentence_bert_config.json`), e.g. 256 for MiniLM.

    The encoder has more positions (512), but the sentence model was trained on and truncates
    at this length, so `truncate=True` cuts there too.
    """
    path = src / "sentence_bert_config.json"
    if not path.is_file():
        return None
    value = _read_json(path).get("max_seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def _pooling_type(src: Path) -> gguf.PoolingType:
    """MEAN or CLS, from the Pooling module named in modules.json (default 1_Pooling)."""
    folder = "1_Pooling"
    if (src / "modules.json").is_file():
        for module in _read_json(src / "modules.json"):
            if str(module.get("type", "")).endswith(".Pooling"):
                folder = module.get("path") or folder
    path = src / folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{path}: missing; cannot tell how to pool token vectors")
    conf = _read_json(path)
    for key, kind in POOLING.items():
        if conf.get(key):
            return kind
    modes = [k for k, v in conf.items() if k.startswith("pooling_mode") and v]
    raise ConvertError(f"{path}: pooling {', '.join(modes) or 'none'} is not supported "
                       f"(mean, cls or last token)")


def read_tensors(path: Path, n_layers: int, outtype: str) -> list[tuple[str, np.ndarray]]:
    """The checkpoint's tensors under their GGUF names, in a fixed order, cast for `outtype`."""
    from safetensors import SafetensorError, safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    out = []
    try:
        with safe_open(str(path), framework="np") as f:
            for hf_name in f.keys():
                name = hf_name.removeprefix("bert.")
                if name.startswith(SKIPPED):
                    continue
                gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ConvertError(f"{path}: tensor {hf_name!r} has no GGUF name "
                                       f"for a BERT model")
                out.append((gguf_name, _cast(f.get_tensor(hf_name), gguf_name, outtype)))
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing (the weights must be in safetensors "
                           f"format)") from None
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read the weights ({e})") from None
    _check_complete(path, {n for n, _ in out}, n_layers)
    return sorted(out, key=lambda item: _order(item[0]))


def _cast(data: np.ndarray, gguf_name: str, outtype: str) -> np.ndarray:
    """F16 for 2-D weight matrices when asked; F32 for everything else."""
    if data.dtype not in (np.float32, np.float16):
        raise ConvertError(f"tensor {gguf_name}: dtype {data.dtype} is not supported "
                           f"(F32 or F16 checkpoints only)")
    if outtype == "f16" and data.ndim >= 2 and not gguf_name.endswith(F32_ALWAYS):
        return data.astype(np.float16)
    return data.astype(np.float32)


def _check_complete(path: Path, have: set[str], n_layers: int) -> None:
    want = {"token_embd.weight", "position_embd.weight", "token_embd_norm.weight"}
    for i in range(n_layers):
        want |= {f"blk.{i}.{t}.weight" for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                  "attn_output_norm", "ffn_up", "ffn_down",
                                                  "layer_output_norm")}
    missing = sorted(want - have)
    if missing:
        raise ConvertError(f"{path}: missing tensors {', '.join(missing[:4])}"
                           f"{' …' if len(missing) > 4 else ''}")


def _order(gguf_name: str) -> tuple[int, str]:
    """Embedding tables first, then block 0, 1, … (numerically, not 0, 1, 10, 2)."""
    parts = gguf_name.split(".")
    return (int(parts[1]), parts[2]) if parts[0] == "blk" else (-1, gguf_name)


# ---------------------------------------------------------------------------------------------
# Writing


def _add_metadata(w: gguf.GGUFWriter, cfg: BertConfig, name: str,
                  ftype: gguf.LlamaFileType, pooling: gguf.PoolingType,
                  max_seq_length: int | None) -> None:
    w.add_name(name)
    w.add_uint32(CONVERTER_VERSION_KEY, CONVERTER_VERSION)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_causal_attention(False)
    w.add_pooling_type(pooling)
    if max_seq_length is not None:  # not a llama.cpp key; llama.cpp ignores it
        w.add_uint32("bert.max_seq_length", max_seq_length)


def _add_vocab(w: gguf.GGUFWriter, tokens: list[str], token_types: list[int],
               special: dict[str, int], n_token_types: int) -> None:
    w.add_token_type_count(n_token_types)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre(TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    # BERT's template is [CLS] text [SEP]; GGUF has no CLS key: llama.cpp reads CLS as BOS
    w.add_bos_token_id(special["cls"])
    w.add_eos_token_id(special["sep"])
    w.add_unk_token_id(special["unk"])
    w.add_sep_token_id(special["sep"])
    if "pad" in special:
        w.add_pad_token_id(special["pad"])
    if "mask" in special:
        w.add_mask_token_id(special["mask"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
