"""Tiny random-weight models of each decoder architecture, made with transformers (its config
classes, no download), converted to GGUF by `numbalm convert`, with transformers' own logits
and token ids as the reference (tests/engine/models/test_archs.py).

    python -m tests.arch_models          # regenerates tests/data/archs/ (needs torch,
                                         # transformers, tokenizers: see tests/data/README.md)

Each case is an architecture with the features that change its maths turned on at sizes where
they show: llama3 RoPE scaling with an original context of 32 (most pairs scaled), linear
RoPE scaling and a sliding window of 8 (the Mistral case), soft-caps of 3 and 4 that tanh
bends, longrope used beyond an original context of 32, a query scale that is not
1/sqrt(head_dim). The tokenizers are trained here with
Hugging Face `tokenizers` on a small multilingual text and written in the forms real
checkpoints use (byte-level BPE with the llama3 or qwen2 regex; SentencePiece-style BPE with
byte fallback, with and without the prefix space), so the GGUF tokenizer is checked against
`tokenizers` itself on `TEXTS`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data" / "archs"
N_VOCAB = 320  # tokenizer training target
PROMPT_LEN = 36  # teacher-forced positions compared (> phi3's original context of 32)
SEED = 0

CORPUS = """The quick brown fox jumps over the lazy dog. It's a sunny day, isn't it? We'll see.
Der schnelle braune Fuchs springt über den faulen Hund. Größe, Übung, Straße.
Le renard brun rapide saute par-dessus le chien paresseux. Où est l'hôtel? Ça va très bien.
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, как дела?
敏捷的棕色狐狸跳过了懒狗。你好，世界！今天天气很好。
素早い茶色の狐が怠惰な犬を飛び越える。こんにちは世界。
الثعلب البني السريع يقفز فوق الكلب الكسول. مرحبا بالعالم
तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है। नमस्ते दुनिया
def main(args):\n    return [x ** 2 for x in range(10)]  # squares 12345 67890
Numbers: 3.14159, 2,718, 1000000 and 42. Emoji: 🙂🚀✨. Tabs\tand  double  spaces.
"""

TEXTS = [  # what the tokenizers are compared on (NFC text; some characters never trained on)
    "Hello world! The quick brown fox, isn't it?",
    "  leading spaces and trailing   ",
    "Straße und Übermut: Größenordnung 12345678",
    "L'hôtel où nous étions était très agréable.",
    "Привет, мир! Как дела у лисы?",
    "你好，世界！狐狸跳过了懒狗。",
    "こんにちは、世界。素早い狐。",
    "مرحبا بالعالم، الثعلب السريع",
    "नमस्ते दुनिया, लोमड़ी",
    "def f(x):\n\treturn x**2  # 3.14159\n\n",
    "Emoji 🙂🚀✨ and unseen ones 🦊🐕 ∑∫√ ΩΨΦ",
    "Mixed: abc123def 1,000,000 ... !!! ??? ''' \"quoted\"",
    "new\nlines\r\nand\ttabs",
    "I'M SURE we'LL see THEY'RE here, don't you'd've?",
    "1234567 12 123 1234 3.14159265 1e10 0x1F",
    "spaces before newline   \n\n\n  then indented\n    code",
    "「引用」『二重』、。！？ full-width ＡＢＣ１２３",
    "Ünïcödé çömbïnéd façade naïve résumé — “quotes” … – end",
]

# case -> (config class, its arguments, tokenizer kind)
_COMMON = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "rms_norm_eps": 1e-6}
CASES = {
    "llama3": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        "tie_word_embeddings": True}, "llama-bpe"),
    "mistral": ("MistralConfig", {"sliding_window": 8, "head_dim": 16, "rope_parameters": {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}, "spm"),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, "qwen2"),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True}, "qwen2"),
    "phi3": ("Phi3Config", {"original_max_position_embeddings": 32, "sliding_window": 16,
                            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                "short_factor": list(np.linspace(1, 2, 8)),
                                                "long_factor": list(np.linspace(1, 16, 8))}},
             "spm"),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8,
                                "attn_logit_softcapping": 3.0, "final_logit_softcapping": 4.0,
                                "query_pre_attn_scalar": 24, "hidden_activation":
                                "gelu_pytorch_tanh"}, "gemma"),
}
# the quantized variant of each case: transformers gets the same rounded weights
QUANTIZED = "q8_0"


# --- tokenizers --------------------------------------------------------------------------------


def make_tokenizer(kind: str):
    """A trained `tokenizers.Tokenizer` of `kind` and its special tokens (bos, eos)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind in ("llama-bpe", "qwen2"):
        from engine.convert_decoder import PRE_BY_REGEX

        pattern = next(p for p, name in PRE_BY_REGEX.items() if name == kind)
        specials = (["<|begin_of_text|>", "<|end_of_text|>"] if kind == "llama-bpe"
                    else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        tok = Tokenizer(models.BPE(ignore_merges=kind == "llama-bpe"))
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=N_VOCAB, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(CORPUS.splitlines() * 3, trainer)
        return tok, specials[0], specials[1 if kind == "llama-bpe" else 0]
    return _spm_tokenizer(prefix=kind == "spm")


def _spm_tokenizer(prefix: bool):
    """SentencePiece-style BPE as Llama 2 / Mistral / Phi-3 (prefix space) and Gemma (none)
    ship it in tokenizer.json: byte fallback, ▁ for spaces, and a merge for every way each
    token splits into two tokens, ranked by the token's score (transformers' LlamaConverter)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    train = Tokenizer(models.BPE())
    train.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prefix else "never")
    trainer = trainers.BpeTrainer(vocab_size=N_VOCAB - 256, special_tokens=specials,
                                  show_progress=False)
    train.train_from_iterator(CORPUS.splitlines() * 3, trainer)
    trained = json.loads(train.to_str())["model"]
    order = sorted(trained["vocab"], key=trained["vocab"].get)  # specials, alphabet, merges
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)]
                                        + [t for t in order if t not in specials])}
    score_rank = {t: i for i, t in enumerate(vocab)}  # later = lower score
    merges = []
    for t in vocab:
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                merges.append((score_rank[t], score_rank[left], score_rank[right], left, right))
    merges = [(m[3], m[4]) for m in sorted(merges)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    steps = ([normalizers.Prepend("\u2581")] if prefix else []) + [
        normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.add_special_tokens(specials)
    return tok, "<s>", "</s>"


# --- models ------------------------------------------------------------------------------------


def build_hf(case: str, folder: Path, outtype: str = "f32"):
    """Write the case's HF checkpoint (config.json, model.safetensors, tokenizer files) into
    `folder` and return (the transformers model, the tokenizers.Tokenizer). With
    `outtype="q8_0"` the model's matrices are first rounded through Q8_0, so that it computes
    with exactly the weights the quantized GGUF file holds."""
    import torch
    import transformers

    cls_name, extra, kind = CASES[case]
    tok, bos, eos = make_tokenizer(kind)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "add_bos_token": kind not in ("qwen2",)}))
    config = getattr(transformers, cls_name)(**{
        **_COMMON, **extra, "vocab_size": tok.get_vocab_size(),
        "bos_token_id": tok.token_to_id(bos), "eos_token_id": tok.token_to_id(eos),
        "pad_token_id": None})
    torch.manual_seed(SEED)
    arch = cls_name.replace("Config", "ForCausalLM")
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # random norms too, scaled to matter
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "gemma" in case else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.15)
            if outtype == "q8_0" and p.ndim == 2 and p.shape[-1] % 32 == 0:
                import gguf

                q = gguf.GGMLQuantizationType.Q8_0
                a = p.detach().numpy().astype(np.float32)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, q), q)))
    model.save_pretrained(folder)
    return model, tok


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def prompt_ids(n_vocab: int) -> list[int]:
    """A fixed teacher-forced sequence of PROMPT_LEN ids."""
    return [int(i) for i in np.random.default_rng(1).integers(3, n_vocab, PROMPT_LEN)]


TOOLS = ("torch", "transformers", "tokenizers")


def tool_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in TOOLS}


def regenerate(out: Path = DATA) -> None:
    from engine.convert import convert

    out.mkdir(parents=True, exist_ok=True)
    (out / "versions.json").write_text(json.dumps(tool_versions(), indent=1) + "\n")
    for case in CASES:
        for outtype in ("f16", QUANTIZED):
            with tempfile.TemporaryDirectory() as tmp:
                model, tok = build_hf(case, Path(tmp) / case, outtype)
                gguf_path = out / f"{case}.{outtype}.gguf"
                convert(Path(tmp) / case, gguf_path, outtype=outtype, name=f"tiny-{case}")
                if outtype == "f16":  # the HF model in float32 over the F16-rounded weights
                    _round_to_f16(model)
                ids = prompt_ids(tok.get_vocab_size())
                golden = {"ids": np.array(ids), "logits": hf_logits(model, ids)}
                if outtype == "f16":
                    for i, text in enumerate(TEXTS):
                        golden[f"text{i}"] = np.array(
                            tok.encode(text, add_special_tokens=False).ids, np.int64)
                np.savez_compressed(out / f"{case}.{outtype}.npz", **golden)
        print(f"{case}: {(out / f'{case}.f16.gguf').stat().st_size // 1024} KB f16, "
              f"{(out / f'{case}.{QUANTIZED}.gguf').stat().st_size // 1024} KB {QUANTIZED}")


def _round_to_f16(model) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())


if __name__ == "__main__":
    regenerate(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)
    shutil.rmtree(DATA / "__pycache__", ignore_errors=True)
