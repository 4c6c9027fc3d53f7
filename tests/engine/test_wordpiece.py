"""engine.wordpiece: BERT WordPiece, id for id the same as Hugging Face's tokenizer.

The parity tests run on the real all-MiniLM-L6-v2 GGUF (from `make models`) against the ids
sentence-transformers produced (`tests/data/minilm.*.json`); the rest use a tiny vocabulary.
"""

import pytest

from engine.convert import to_phantom
from engine.errors import TokenizerError
from engine.gguf_file import open_gguf
from engine.tokenizer import Tokenizer
from engine.wordpiece import WordPieceTokenizer, normalize, pre_tokenize
from tests.helpers import load_data, model_path

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##believ", "##able", "##ably",
         "the", "cat", ",", "!", "hello", "world", "naive", "a", "##a", "中", "$"]
CONTROL_TOKENS = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


def tiny_metadata(**extra) -> dict:
    """GGUF metadata as engine.convert writes it for VOCAB."""
    return {
        "tokenizer.ggml.model": "bert",
        "tokenizer.ggml.tokens": [t if t in CONTROL_TOKENS else to_phantom(t) for t in VOCAB],
        "tokenizer.ggml.token_type": [3 if t in CONTROL_TOKENS else 1 for t in VOCAB],
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 3,
        "tokenizer.ggml.seperator_token_id": 3, "tokenizer.ggml.unknown_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True, **extra,
    }


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_metadata(tiny_metadata())


def ids(*tokens):
    return [VOCAB.index(t) for t in tokens]


@pytest.mark.parametrize("text, expected", [
    ("Hello\tWORLD\n", "hello world "),  # whitespace → space, lowercase
    ("a\x00b\ufffdc\x07d\u200be\ufeff", "abcde"),  # NUL, U+FFFD, Cc, Cf dropped
    ("\u0378", "\u0378"),  # unassigned: kept (tokenizers does), becomes [UNK] later
    ("naïve Ångström", "naive angstrom"),  # NFD, combining marks dropped
    ("中文x", " 中  文 x"),  # CJK ideographs spaced out
    ("ΟΔΟΣ", "οδοσ"),  # per-character lowercase: no final sigma
    ("です", "てす"),  # the voicing mark is a combining mark too
])
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_pre_tokenize_splits_on_whitespace_and_every_punctuation_char():
    assert pre_tokenize("  don't  e-mail: a$b^c`d «x» ") == [
        "don", "'", "t", "e", "-", "mail", ":", "a", "$", "b", "^", "c", "`", "d", "«", "x", "»"]


def test_dispatch_and_properties(tiny):
    assert isinstance(tiny, WordPieceTokenizer)
    assert (tiny.bos_id, tiny.eos_id, tiny.n_vocab) == (2, 3, len(VOCAB))
    assert tiny.eot_ids == frozenset({3})


def test_greedy_longest_match_with_continuations(tiny):
    assert tiny.encode("unbelievably", add_bos=False) == ids("un", "##believ", "##ably")
    assert tiny.encode("unbelievable", add_bos=False) == ids("un", "##believ", "##able")
    assert tiny.encode("aaa", add_bos=False) == ids("a", "##a", "##a")


def test_unknown_words_are_one_unk(tiny):
    assert tiny.encode("unbelievablyx cat", add_bos=False) == ids("[UNK]", "cat")
    assert tiny.encode("a" * 100, add_bos=False) == ids("a") + ids("##a") * 99
    assert tiny.encode("a" * 101, add_bos=False) == ids("[UNK]")  # over 100 characters


def test_cls_and_sep_follow_add_bos(tiny):
    body = ids("hello", ",", "world", "!")
    assert tiny.encode("Hello, World!") == ids("[CLS]") + body + ids("[SEP]")
    assert tiny.encode("Hello, World!", add_bos=True) == tiny.encode("Hello, World!")
    assert tiny.encode("Hello, World!", add_bos=False) == body
    assert tiny.encode("") == ids("[CLS]", "[SEP]")
    no_eos = Tokenizer.from_metadata(tiny_metadata(**{"tokenizer.ggml.add_eos_token": False}))
    assert no_eos.encode("cat") == ids("[CLS]", "cat")


def test_special_text(tiny):
    assert tiny.encode("[CLS] cat", add_bos=False, special=True) == ids("[CLS]", "cat")
    assert tiny.encode("[MASK]cat", add_bos=False, special=True) == ids("[MASK]", "cat")
    assert tiny.encode("[cls] cat", add_bos=False, special=True) == ids("[UNK]", "[UNK]",
                                                                        "[UNK]", "cat")
    # plain text: "[", "cls", "]" — none of them in this tiny vocabulary
    assert tiny.encode("[CLS] cat", add_bos=False) == ids("[UNK]", "[UNK]", "[UNK]", "cat")


def test_decode(tiny):
    text_ids = tiny.encode("Hello, unbelievable world")
    assert tiny.decode(text_ids) == "[CLS] hello , unbelievable world [SEP]"
    assert tiny.decode(text_ids, skip_special=True) == "hello , unbelievable world"
    assert tiny.decode(ids("cat")) == "cat"
    assert tiny.token_bytes(VOCAB.index("##able")) == b"able"
    assert tiny.token_bytes(VOCAB.index("the")) == b" the"
    dec = tiny.decoder(skip_special=True)
    assert "".join(dec.push(i) for i in text_ids) + dec.flush() == "hello , unbelievable world"


def test_missing_unk_is_an_error():
    with pytest.raises(TokenizerError, match="unknown_token_id"):
        Tokenizer.from_metadata(tiny_metadata(**{"tokenizer.ggml.unknown_token_id": None}))


# --- parity with Hugging Face on the real model ----------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return Tokenizer.from_metadata(open_gguf(model_path("minilm")).metadata)


def reference_texts():
    return (load_data("minilm.tokenize.json")["tokenize"]
            + load_data("minilm.embeddings.json")["embeddings"])


def test_ids_equal_hugging_face(minilm):
    """HF always parses literal special tokens, so `special=True` is the like-for-like call."""
    cases = reference_texts()
    mismatches = [(c["text"], minilm.encode(c["text"], special=True), c["ids"]) for c in cases
                  if minilm.encode(c["text"], special=True) != c["ids"]]
    assert mismatches == [] and len(cases) == 24


def test_plain_text_differs_only_for_literal_special_tokens(minilm):
    for case in reference_texts():
        got = minilm.encode(case["text"])
        if "[CLS]" in case["text"]:
            assert got == [101, 1031, 18856, 2015, 1033, 18204, 102]  # "[", "cl", "##s", "]"
        else:
            assert got == case["ids"], case["text"]


def test_real_decode(minilm):
    assert minilm.decode(minilm.encode("Unbelievably, tokenization!"), skip_special=True) == (
        "unbelievably , tokenization !")
