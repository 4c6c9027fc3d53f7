"""Random Unicode through every tokenizer, the chat template and the stop matcher.

Text is drawn from all of Unicode, lone surrogates included (JSON's "\\ud800" decodes to one),
mixed with the pieces that break text code: combining marks, right-to-left and bidi controls,
NUL and other controls, zero-width joiners, emoji sequences, the models' own special-token
texts, and runs of spaces and newlines. Pass: no exception but the documented ones, and the
round trips each tokenizer promises:

- byte-level BPE (SmolLM2) and SentencePiece with byte fallback (Gemma-3): decode(encode(t))
  is t for any text whose bytes the vocabulary spells and, for SentencePiece, holds no U+2581
  (`spellable`; lone surrogates read as U+FFFD);
- WordPiece (all-MiniLM) lower-cases, strips accents and drops what it cannot spell: only ids
  in range and text back, no round trip promised;
- the incremental decoder, fed one id at a time, gives exactly decode(ids).

`make test` runs a few hundred cases; `make fuzz` (NUMBALM_FUZZ=1) thousands.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.chat import render_chat
from engine.errors import ChatTemplateError
from engine.generate import StopMatcher
from engine.gguf_file import open_gguf
from engine.tokenizer import BYTE_TO_CHAR, SPM_SPACE, BPETokenizer, Tokenizer, valid_unicode
from tests.fuzz import FUZZING, fuzz_settings
from tests.helpers import model_path

PIECES = ["\u0301", "\u0300\u0316", "\u202e", "\u202d", "\u2067", "\u200f", "\u05d0\u05d1",
          "\u0627\u0644", "\x00", "\x1b[31m", "\r\n", "\t", "\u200d", "\ufeff",
          "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1fa\U0001f1f8", "\ufffd",
          "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<bos>", "[CLS]", "[SEP]",
          "<0x0A>", "\u2581", "  ", "\n\n\n", "'s", "123456", "ß", "İ", "\ud800", "\udfff",
          "\ud83d\ude00"]
ANY_CHAR = st.characters(blacklist_categories=())  # every code point, surrogates too
TEXT = st.lists(st.one_of(st.text(ANY_CHAR, max_size=12), st.sampled_from(PIECES)),
                max_size=24).map("".join)


@pytest.fixture(scope="module")
def tokenizers():
    out = {}
    for key in ("smollm2", "gemma3", "minilm"):
        gf = open_gguf(model_path(key))
        out[key] = (Tokenizer.from_metadata(gf.metadata), gf.get("tokenizer.chat_template"))
    return out


LOSSLESS = ("smollm2", "gemma3")


def spellable(tok: Tokenizer, text: str) -> str:
    """The characters of `text` whose every UTF-8 byte the vocabulary has a token for
    (SmolLM2 has none for 21 byte values, 0x04 and 0xF5-0xFF among them; llama.cpp drops
    such bytes too); Gemma-3 spells all 256, but SentencePiece writes a space as U+2581, so
    a U+2581 in the text comes back as a space (as in llama.cpp and sentencepiece itself)."""
    if isinstance(tok, BPETokenizer):
        ok = {b for b, c in BYTE_TO_CHAR.items() if c in tok.token_ids}
        text_ok = text
    else:
        ok = {b for b in range(256) if tok.byte_ids[b] is not None}
        text_ok = text.replace(SPM_SPACE, "")
    return "".join(c for c in text_ok if set(c.encode("utf-8")) <= ok)


def check_tokenizer(tok: Tokenizer, key: str, text: str, special: bool) -> None:
    ids = tok.encode(text, add_bos=False, special=special)
    assert all(0 <= i < tok.n_vocab for i in ids)
    decoded = tok.decode(ids)
    decoder = tok.decoder()
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == decoded
    if key in LOSSLESS and not special:
        clean = spellable(tok, valid_unicode(text))
        assert tok.decode(tok.encode(clean, add_bos=False)) == clean


@fuzz_settings(small=150, fuzz_examples=3_000)
@given(text=TEXT, special=st.booleans())
def test_tokenizers_take_any_text(tokenizers, text, special):
    for key, (tok, _) in tokenizers.items():
        check_tokenizer(tok, key, text, special)


# `make fuzz` tokenizes megabyte texts; `make test` 64 KB ones. A megabyte takes the Python
# tokenizers 7-50 s here (Gemma-3's SentencePiece merges the whole text as one piece).
LONG_TEXT = 2**20 if FUZZING else 2**16


@fuzz_settings(small=2, fuzz_examples=6)
@given(chunk=st.text(ANY_CHAR, min_size=1, max_size=64), piece=st.sampled_from(PIECES))
def test_long_texts(tokenizers, chunk, piece):
    text = ((chunk + piece) * (LONG_TEXT // len(chunk + piece) + 1))[:LONG_TEXT]
    for key, (tok, _) in tokenizers.items():
        ids = tok.encode(text, add_bos=False)
        assert ids and all(0 <= i < tok.n_vocab for i in ids)
        if key in LOSSLESS:
            clean = spellable(tok, valid_unicode(text))
            assert tok.decode(tok.encode(clean, add_bos=False)) == clean


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": TEXT})


@fuzz_settings(small=100, fuzz_examples=2_000)
@given(messages=st.lists(MESSAGE, min_size=1, max_size=5))
def test_the_chat_template_takes_any_text(tokenizers, messages):
    """SmolLM2's own template: every message's text appears in the prompt as it was, and the
    prompt tokenizes (control tokens parsed)."""
    tok, template = tokenizers["smollm2"]
    try:
        prompt = render_chat(template, messages)
    except ChatTemplateError as e:  # the template's own raise_exception, if any
        assert "\n" not in str(e)
        return
    for m in messages:
        assert m["content"].strip() in prompt
    assert tok.encode(prompt, special=True)


STOPS = st.lists(st.one_of(st.text(ANY_CHAR, min_size=1, max_size=4),
                           st.sampled_from(["<|im_end|>", "\n\n", "\u0301", "\ud800", "ab"])),
                 max_size=4)


@fuzz_settings(small=300, fuzz_examples=5_000)
@given(text=TEXT, stops=STOPS, cuts=st.lists(st.integers(0, 400), max_size=12))
def test_the_stop_matcher(text, stops, cuts):
    """Whatever the chunks: what is emitted is a prefix of the text with no stop sequence in
    it; when it stops, the rest of the text starts with a stop sequence; when it does not,
    everything was emitted and the text holds none."""
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    matcher, out, stopped = StopMatcher(stops), "", False
    for a, b in zip(bounds, bounds[1:]):
        emitted, stopped = matcher.push(text[a:b])
        out += emitted
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    assert text.startswith(out)
    real_stops = [s for s in stops if s]
    assert not any(s in out for s in real_stops)
    if stopped:
        assert any(text[len(out):].startswith(s) for s in real_stops)
    else:
        assert out == text and not any(s in text for s in real_stops)


def test_valid_unicode_joins_pairs_and_replaces_lone_surrogates():
    assert valid_unicode("a\ud83d\ude00b") == "a\U0001f600b"
    assert valid_unicode("\ud800x\udfff") == "\ufffdx\ufffd"
    assert valid_unicode("plain") == "plain"
