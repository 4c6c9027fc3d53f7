"""WordPiece (`tokenizer.ggml.model = bert`), id for id the same as Hugging Face's BertTokenizer.

HF's pipeline (tokenizers' BertNormalizer + BertPreTokenizer + WordPiece, do_lower_case=True):

1. clean: drop NUL, U+FFFD and control, format, private-use and surrogate characters (Cc, Cf,
   Co, Cs; not tab, newline, carriage return; unassigned code points stay and end up as
   [UNK]); every whitespace character becomes a space;
2. put spaces around CJK ideographs, so each is a word of its own;
3. strip accents (NFD, then drop non-spacing marks Mn) and lowercase, character by character;
4. split on whitespace, and around every punctuation character (ASCII non-alphanumeric
   printables, Unicode P*), which becomes a word of its own;
5. each word: greedy longest match from the left, pieces after the first spelled `##xx`; a word
   with no match, or longer than 100 characters, is `[UNK]` as a whole.

`[CLS] … [SEP]` go around the text when `add_bos` (default: the metadata's add_bos_token).

The GGUF file holds the vocabulary in llama.cpp's phantom-space form (see `engine.convert`):
a word-start piece `the` as `▁the`, a continuation `##ing` as `ing`, control tokens as they
are. This module turns it back into WordPiece spelling for matching, and decodes the way
llama.cpp does: a word-start piece is a space plus its text, a continuation just its text.
"""

from __future__ import annotations

import unicodedata

from .errors import TokenizerError
from .tokenizer import NORMAL, IncrementalDecoder, Tokenizer

PHANTOM_SPACE = "\u2581"  # ▁
CONTINUATION = "##"
MAX_WORD_CHARS = 100  # HF's max_input_chars_per_word

# CJK Unified Ideographs and their extensions and compatibility blocks, as in tokenizers'
# is_chinese_char (which starts Extension E at 0x2B920, not 0x2B820 like HF's Python code).
# Hiragana, katakana and hangul are not in here: they stay inside their words.
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
DROPPED_CATEGORIES = ("Cc", "Cf", "Co", "Cs")


def is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def is_punctuation(ch: str) -> bool:
    """HF's _is_punctuation: ASCII non-alphanumeric printables (`$`, `+`, `^`, … too) and P*."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_dropped(ch: str) -> bool:
    """NUL, U+FFFD and control/format/private-use characters, but not tab, LF, CR."""
    if ch in "\t\n\r":
        return False
    return ch in "\x00\ufffd" or unicodedata.category(ch) in DROPPED_CATEGORIES


def normalize(text: str) -> str:
    """Steps 1–3: clean, space out CJK, strip accents, lowercase."""
    out = []
    for ch in text:
        if _is_dropped(ch):
            continue
        if ch.isspace():
            out.append(" ")
        elif is_cjk(ord(ch)):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = unicodedata.normalize("NFD", "".join(out))
    # per character, as tokenizers does (no final-sigma rule, unlike str.lower on a word)
    return "".join(ch.lower() for ch in text if unicodedata.category(ch) != "Mn")


def pre_tokenize(text: str) -> list[str]:
    """Step 4: whitespace-separated words, each punctuation character a word of its own."""
    words = []
    for chunk in text.split():
        start = 0
        for i, ch in enumerate(chunk):
            if is_punctuation(ch):
                if i > start:
                    words.append(chunk[start:i])
                words.append(ch)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


class WordPieceTokenizer(Tokenizer):
    """BERT's WordPiece vocabulary, from a GGUF file written in llama.cpp's phantom form."""

    default_add_bos = True

    def __init__(self, metadata: dict):
        super().__init__(metadata)
        if self.unk_id is None:
            raise TokenizerError("a WordPiece vocabulary needs tokenizer.ggml.unknown_token_id")
        self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", True))
        sep = self._id_key(metadata, "seperator_token_id")  # sic: llama.cpp's spelling
        self.sep_id = sep if sep is not None else self.eos_id
        # WordPiece spelling → id: "the", "##ing"; control and unused tokens are not matched
        self.pieces: dict[str, int] = {}
        for i, (tok, kind) in enumerate(zip(self.tokens, self.token_types, strict=True)):
            if kind == NORMAL:
                self.pieces[to_wordpiece(tok)] = i
        self.eot_ids = frozenset(i for i in (self.sep_id,) if i is not None)

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Text → ids. `add_bos` (default: the metadata's) puts [CLS] in front and, when the
        metadata's add_eos_token says so, [SEP] at the end, as HF's template does.
        `special=True` turns literal `[CLS]`, `[SEP]`, `[MASK]`, … into their ids (HF always
        does; `special=False` reads them as plain text, like the other tokenizers)."""
        add = self.add_bos if add_bos is None else add_bos
        ids = super().encode(text, add_bos=add, special=special)
        if add and self.add_eos:
            if self.sep_id is None:
                raise TokenizerError("this model's vocabulary has no [SEP] token to add")
            ids.append(self.sep_id)
        return ids

    def _encode_plain(self, text: str, after_special: bool) -> list[int]:
        return [i for word in pre_tokenize(normalize(text)) for i in self.encode_word(word)]

    def encode_word(self, word: str) -> list[int]:
        """Step 5: greedy longest match; [UNK] for the whole word if any part fails."""
        if len(word) > MAX_WORD_CHARS:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            prefix = CONTINUATION if start else ""
            for end in range(len(word), start, -1):
                piece_id = self.pieces.get(prefix + word[start:end])
                if piece_id is not None:
                    break
            else:
                return [self.unk_id]
            ids.append(piece_id)
            start = end
        return ids

    # -- decoding ---------------------------------------------------------------------------

    def _token_bytes(self, token_id: int) -> bytes:
        """A word-start piece is a space and its text (`▁the` → b" the"), as in llama.cpp;
        a continuation is its text; a control token its own text with a space in front."""
        tok = self.tokens[token_id]
        if self.token_types[token_id] != NORMAL:
            return (" " + tok).encode("utf-8")
        return tok.replace(PHANTOM_SPACE, " ").encode("utf-8")

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids → text, words separated by spaces, without the first word's space."""
        dec = self.decoder(skip_special)
        return "".join(dec.push(i) for i in ids) + dec.flush()

    def decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        return WordPieceDecoder(self, skip_special)


class WordPieceDecoder(IncrementalDecoder):
    """Drops the space in front of the first piece of text, wherever the ids start."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        super().__init__(tokenizer, skip_special)
        self._started = False

    def piece(self, token_id: int) -> bytes:
        data = super().piece(token_id)
        if not self._started and data:
            self._started = True
            return data[1:] if data.startswith(b" ") else data
        return data


def to_wordpiece(token: str) -> str:
    """llama.cpp's form → WordPiece spelling: `▁the` → `the`, `ing` → `##ing`."""
    if token.startswith(PHANTOM_SPACE):
        return token[1:]
    return CONTINUATION + token
