"""engine.tokenizer: id-for-id parity with llama.cpp on the two real models, decoding, BOS."""

import json
import time
from pathlib import Path

import pytest

from engine.errors import TokenizerError
from engine.gguf_file import open_gguf
from engine.tokenizer import PRE_ALIASES, PRE_TOKENIZERS, Tokenizer, merge_pairs
from tests.helpers import model_path

DATA = Path(__file__).parent.parent / "data"
@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request):
    """(name, metadata, tokenizer) for each real model."""
    metadata = open_gguf(model_path(request.param)).metadata
    return request.param, metadata, Tokenizer.from_metadata(metadata)


@pytest.fixture(scope="module")
def smollm2():
    return Tokenizer.from_metadata(open_gguf(model_path("smollm2")).metadata)


@pytest.fixture(scope="module")
def gemma3():
    return Tokenizer.from_metadata(open_gguf(model_path("gemma3")).metadata)


def reference(name: str) -> dict:
    return json.loads((DATA / f"{name}.tokenize.json").read_text(encoding="utf-8"))


# -- parity with llama.cpp --------------------------------------------------------------------

@pytest.mark.parametrize("field, special", [("tokenize", False), ("tokenize_special", True)])
def test_llamacpp_parity(model, field, special):
    name, _, tok = model
    cases = reference(name)[field]
    wrong = [(c["text"], c["ids"], got) for c in cases
             if (got := tok.encode(c["text"], add_bos=False, special=special)) != c["ids"]]
    assert not wrong, f"{len(wrong)}/{len(cases)} texts differ from llama.cpp: {wrong[:3]}"


def test_special_text_is_plain_text_without_special(smollm2):
    ids = smollm2.encode("<|im_start|>user", special=False)
    assert 1 not in ids and len(ids) > 2
    assert smollm2.encode("<|im_start|>user", special=True)[0] == 1


def test_user_defined_tokens_are_cut_out_even_without_special(gemma3):
    # Gemma's "<table>" and "\t" are user-defined: llama.cpp matches them before SentencePiece
    ids = gemma3.encode("<table>\tx", add_bos=False)
    assert ids[:2] == [gemma3.token_ids["<table>"], gemma3.token_ids["\t"]]


def test_longest_special_token_wins(gemma3):
    assert gemma3.encode("\n\n\n", add_bos=False) == [gemma3.token_ids["\n\n\n"]]


def test_spm_byte_fallback(gemma3):
    # U+A66E (Cyrillic multiocular O) is no token: its UTF-8 bytes become byte tokens
    ids = gemma3.encode("\ua66e", add_bos=False)
    assert [gemma3.tokens[i] for i in ids] == ["<0xEA>", "<0x99>", "<0xAE>"]
    assert gemma3.decode(ids) == "\ua66e"


# -- BOS and special ids ----------------------------------------------------------------------

def test_add_bos_follows_metadata(smollm2, gemma3):
    assert smollm2.encode("Hi")[0] != smollm2.bos_id  # add_bos_token False
    assert smollm2.encode("Hi", add_bos=True)[0] == smollm2.bos_id
    assert gemma3.encode("Hi")[0] == gemma3.bos_id == 2  # add_bos_token True
    assert gemma3.encode("Hi", add_bos=False) == [10979]
    assert gemma3.encode("") == [2] and gemma3.encode("", add_bos=False) == []


def test_special_ids(smollm2, gemma3):
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.n_vocab) == (1, 2, 49152)
    assert smollm2.eot_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert (gemma3.bos_id, gemma3.eos_id, gemma3.n_vocab) == (2, 1, 262144)
    assert gemma3.eot_ids == {1, 106}  # <eos>, <end_of_turn>
    assert gemma3.is_control(106) and not gemma3.is_control(107)


# -- decoding ---------------------------------------------------------------------------------

def test_round_trip(model):
    name, _, tok = model
    for case in reference(name)["tokenize"]:
        ids = tok.encode(case["text"])
        assert tok.decode(ids, skip_special=True) == case["text"]


def test_decode_special_tokens(smollm2):
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>", special=True)
    assert smollm2.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert smollm2.decode(ids, skip_special=True) == "user\nHi"


def test_token_bytes(smollm2, gemma3):
    assert smollm2.token_bytes(smollm2.encode(" Hello")[0]) == b" Hello"
    assert gemma3.token_bytes(gemma3.token_ids["<0x0A>"]) == b"\n"
    assert gemma3.token_bytes(gemma3.token_ids["\u2581world"]) == b" world"


def test_invalid_utf8_becomes_replacement_char(gemma3):
    assert gemma3.decode([gemma3.token_ids["<0xE6>"], 236743]) == "\ufffd "


# SmolLM2 spells the emoji and CJK in byte pieces, Gemma the hieroglyph and U+A66E
@pytest.mark.parametrize("text", ["emoji 😀🎉👍🏽 and 🇫🇷", "日本語のテキストです。 한국어",
                                  "𓀀 ꙮ 🫨 done"])
def test_incremental_decoder_never_splits_a_character(model, text):
    name, _, tok = model
    ids = tok.encode(text)
    if name == "smollm2" or "𓀀" in text:
        assert any(_partial_utf8(tok.token_bytes(i)) for i in ids)
    decoder = tok.decoder(skip_special=True)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == tok.decode(ids, skip_special=True) == text
    assert all("\ufffd" not in d for d in deltas)


def _partial_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_decoder_flush_reports_a_broken_tail(gemma3):
    decoder = gemma3.decoder()
    assert decoder.push(gemma3.token_ids["<0xF0>"]) == ""  # first byte of a 4-byte character
    assert decoder.flush() == "\ufffd"


def test_decoder_matches_decode_with_special_tokens(model):
    _, _, tok = model
    ids = tok.encode("x <b>y</b> z", add_bos=True, special=True)
    decoder = tok.decoder()
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == tok.decode(ids)


def test_space_prefix_comes_off_again_after_bos():
    tok = Tokenizer.from_metadata(tiny_spm_metadata(add_space_prefix=True))
    ids = tok.encode("a b")
    assert [tok.tokens[i] for i in ids] == ["<s>", "\u2581a", "\u2581b"]
    assert tok.decode(ids, skip_special=True) == "a b"
    decoder = tok.decoder(skip_special=True)
    assert "".join(decoder.push(i) for i in ids) == "a b"
    # without BOS (generated ids continuing a prompt) the space is real
    assert tok.decode(ids[1:]) == " a b"
    decoder = tok.decoder()
    assert "".join(decoder.push(i) for i in ids[1:]) == " a b"


# -- the merge loop and small vocabularies ----------------------------------------------------

def test_merge_pairs_takes_best_pair_leftmost_first():
    rank = {("a", "a"): 0, ("aa", "a"): 1}
    assert merge_pairs(list("aaa"), lambda l, r: rank.get((l, r))) == ["aaa"]
    assert merge_pairs(list("aaaa"), lambda l, r: rank.get((l, r))) == ["aa", "aa"]
    assert merge_pairs(list("abc"), lambda l, r: None) == ["a", "b", "c"]


def tiny_spm_metadata(add_space_prefix=True):
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "\u2581b"]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -0.5, -0.5],
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def test_spm_without_byte_tokens_falls_back_to_unknown():
    tok = Tokenizer.from_metadata(tiny_spm_metadata())
    assert tok.encode("a?", add_bos=False) == [6, 0]


def test_unknown_tokenizer_model_is_a_clear_error():
    with pytest.raises(TokenizerError, match="'t5' is not supported"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})


def test_unknown_pre_tokenizer_is_a_clear_error():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "klingon",
                "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    with pytest.raises(TokenizerError, match="pre-tokenizer 'klingon'"):
        Tokenizer.from_metadata(metadata)


@pytest.mark.parametrize("pre, text, words", [
    ("gpt2", "I'm 12345 ok", ["I", "'m", " 12345", " ok"]),
    ("smollm", "x 123", ["x", " ", "1", "2", "3"]),
    ("llama3", "I'M 12345\n\n ok", ["I", "'M", " ", "123", "45", "\n\n", " ok"]),
    ("qwen2", "ab 12", ["ab", " ", "1", "2"]),
    ("default", "a+b=12345", ["a", "+", "b", "=", "123", "45"]),
])
def test_pre_tokenizers(pre, text, words):
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    assert Tokenizer.from_metadata(metadata).pre_tokenize(text) == words


@pytest.mark.parametrize("pre", sorted({*PRE_TOKENIZERS, *PRE_ALIASES}))
def test_every_known_pre_tokenizer_compiles_and_keeps_all_text(pre):
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    text = "It's 2026-11-22: naïve café, 日本語 𝑥² ~~ \r\n\t  end  "
    assert "".join(Tokenizer.from_metadata(metadata).pre_tokenize(text)) == text


# -- speed ------------------------------------------------------------------------------------

def test_build_and_encode_are_fast(model):
    name, metadata, _ = model
    start = time.perf_counter()
    tok = Tokenizer.from_metadata(metadata)
    built = time.perf_counter() - start
    text = "\n".join(c["text"] for c in reference(name)["tokenize"]) * 2  # ~3 KB
    start = time.perf_counter()
    tok.encode(text, special=True)
    encoded = time.perf_counter() - start
    assert built < 0.5 and encoded < 0.2, (built, encoded)
