"""Text ↔ token ids for GGUF models, id for id the same as llama.cpp.

Two tokenizer families, chosen by `tokenizer.ggml.model`:

- `gpt2`, byte-level BPE (SmolLM2, Llama 3, Qwen2): text is cut into words by the
  pre-tokenizer regexes named by `tokenizer.ggml.pre`; each word's UTF-8 bytes are spelled with
  GPT-2's printable byte alphabet; then adjacent pieces are merged, lowest merge rank first.
- `llama`, SentencePiece (Gemma, Llama 2): spaces become `▁`, then adjacent pieces are merged,
  highest vocabulary score first, as long as the merged text is a token; characters that are
  no token fall back to `<0xNN>` byte tokens.

Both merge loops are llama.cpp's (a priority queue of adjacent pairs, leftmost pair on ties),
so even unusual merge tables give its ids. Before either runs, special tokens are cut out of
the text (llama.cpp's `tokenizer_st_partition`): user-defined tokens always, control tokens
only when `special=True`, the longest token text first.
"""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Callable

import numpy as np
import regex

from .errors import TokenIdError, TokenizerError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
NOT_TEXT = (UNKNOWN, CONTROL, UNUSED)  # what decode(skip_special=True) leaves out

# Tokens that end a turn in the chat formats we know; eos and eot_token_id are added to these.
END_OF_TURN_TEXTS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>",
                     "<|end|>")

SPM_SPACE = "\u2581"  # ▁, SentencePiece's visible space

# Pre-tokenizer regexes from llama.cpp's llama-vocab.cpp (llm_tokenizer_bpe), applied in
# turn: each one splits every piece the previous one left, keeping the text between matches.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
}
PRE_ALIASES = {
    "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "starcoder": "smollm", "refact": "smollm", "command-r": "smollm", "codeshell": "smollm",
    "exaone": "smollm", "minerva-7b": "smollm",
    "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3", "falcon-h1": "llama3",
    "pixtral": "llama3", "dbrx": "llama3", "smaug-bpe": "llama3", "chatglm-bpe": "llama3",
    "stablelm2": "qwen2", "deepseek-r1-qwen": "qwen2", "hunyuan": "qwen2",
}
# llama.cpp takes a word that is already a whole token as it is, without merging, for these.
IGNORE_MERGES = {"llama3"}


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character map: printable Latin-1 bytes stand for themselves,
    the other 68 bytes (controls, space, ...) for chr(256), chr(257), ... in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in alphabet)
    alphabet.update((b, chr(256 + n)) for n, b in enumerate(extra))
    return alphabet


BYTE_TO_CHAR = _gpt2_byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_LATIN1_TO_GPT2 = {b: c for b, c in BYTE_TO_CHAR.items()}  # str.translate table


def merge_pairs(pieces: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    """Merge adjacent pieces greedily, as llama.cpp's BPE and SPM sessions do.

    All adjacent pairs go into a heap keyed by `priority(left, right)` (lower first, leftmost
    on ties; None: never merge). Pop the best pair; skip it if either side changed since it
    was queued; else merge it and queue the pairs it now forms with its two neighbours.
    """
    prev = list(range(-1, len(pieces) - 1))
    nxt = [*range(1, len(pieces)), -1]
    heap: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int) -> None:
        if left >= 0 and right >= 0:
            p = priority(pieces[left], pieces[right])
            if p is not None:
                heapq.heappush(heap, (p, left, right, pieces[left] + pieces[right]))

    for i in range(1, len(pieces)):
        push(i - 1, i)
    while heap:
        _, left, right, text = heapq.heappop(heap)
        if not pieces[left] or not pieces[right] or pieces[left] + pieces[right] != text:
            continue  # stale: one side was merged into something else meanwhile
        pieces[left], pieces[right] = text, ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        push(prev[left], left)
        push(left, nxt[left])
    return [p for p in pieces if p]


class Tokenizer:
    """Vocabulary, special tokens, decoding; subclasses turn plain text into ids."""

    default_add_bos = False

    def __init__(self, metadata: dict):
        self.tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        self.n_vocab = len(self.tokens)
        types = metadata.get("tokenizer.ggml.token_type")
        types = np.full(self.n_vocab, NORMAL) if types is None else np.asarray(types)
        if types.shape != (self.n_vocab,) or types.dtype.kind not in "iub":
            raise TokenizerError(f"tokenizer.ggml.token_type has {types.size} entries for "
                                 f"{self.n_vocab} tokens")
        self.token_types: list[int] = types.tolist()
        # like llama.cpp's token_to_id: a text listed twice maps to its last id
        self.token_ids: dict[str, int] = dict(zip(self.tokens, range(self.n_vocab)))
        self.bos_id = self._id_key(metadata, "bos_token_id")
        self.eos_id = self._id_key(metadata, "eos_token_id")
        self.unk_id = self._id_key(metadata, "unknown_token_id")
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", self.default_add_bos))
        self.eot_ids = self._end_of_turn_ids(metadata)
        self._special_groups = self._group_special_tokens(types)
        self._bytes_cache: list[bytes | None] = [None] * self.n_vocab

    @staticmethod
    def from_metadata(metadata: dict) -> Tokenizer:
        """The tokenizer a GGUF file's metadata describes."""
        model = metadata.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in metadata:
            raise TokenizerError("the GGUF metadata has no tokenizer.ggml.tokens")
        if model == "gpt2":
            return BPETokenizer(metadata)
        if model == "llama":
            return SPMTokenizer(metadata)
        if model == "bert":
            from .wordpiece import WordPieceTokenizer  # a subclass: imported here, not on top

            return WordPieceTokenizer(metadata)
        raise TokenizerError(f"tokenizer model {model!r} is not supported: numbalm reads 'gpt2' "
                             f"(byte-level BPE), 'llama' (SentencePiece) and 'bert' (WordPiece) "
                             f"vocabularies")

    # -- building ---------------------------------------------------------------------------

    def _id_key(self, metadata: dict, key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TokenizerError(f"tokenizer.ggml.{key} is {value!r:.40}, not a token id")
        return int(value) if 0 <= int(value) < self.n_vocab else None

    def _end_of_turn_ids(self, metadata: dict) -> frozenset[int]:
        ids = {self.eos_id, self._id_key(metadata, "eot_token_id"),
               self._id_key(metadata, "eom_token_id")}
        ids.update(self.token_ids.get(text) for text in END_OF_TURN_TEXTS)
        return frozenset(i for i in ids if i is not None)

    def _group_special_tokens(self, types: np.ndarray) -> dict[bool, dict[str, list]]:
        """The tokens `partition` cuts out, as (text, id) grouped by their first 4 characters:
        one substring test per group finds the few that can occur in a text. Key True: all of
        them (control, unknown, user-defined); False: user-defined only."""
        groups: dict[bool, dict[str, list]] = {True: {}, False: {}}
        for i in np.flatnonzero(np.isin(types, (UNKNOWN, CONTROL, USER_DEFINED))).tolist():
            text = self.tokens[i]
            if not text:
                continue
            groups[True].setdefault(text[:4], []).append((text, i))
            if self.token_types[i] == USER_DEFINED:
                groups[False].setdefault(text[:4], []).append((text, i))
        return groups

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Text → token ids. `add_bos=None` follows the metadata; `special=True` turns the text
        of control tokens (`<|im_start|>`, `<start_of_turn>`, ...) into their ids."""
        text = valid_unicode(text)
        ids = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TokenizerError("this model's vocabulary has no BOS token to add")
            ids.append(self.bos_id)
        after_special = True
        for fragment in self.partition(text, special):
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
            else:
                ids.extend(self._encode_plain(fragment, after_special))
                after_special = False
        return ids

    def partition(self, text: str, special: bool = False) -> list[str | int]:
        """Cut special tokens out of `text`: a list of plain-text pieces and token ids.

        llama.cpp's order: for each special token, longest text first, split every remaining
        text piece at its occurrences. User-defined tokens always count; control and unknown
        ones only with `special`.
        """
        found = [token for prefix, group in self._special_groups[special].items()
                 if prefix in text for token in group if token[0] in text]
        found.sort(key=lambda token: (-len(token[0]), token[1]))
        fragments: list[str | int] = [text] if text else []
        for tok_text, tok_id in found:
            fragments = [piece for frag in fragments for piece in _split_at(frag, tok_text, tok_id)]
        return fragments

    def _encode_plain(self, text: str, after_special: bool) -> list[int]:
        raise NotImplementedError

    # -- decoding ---------------------------------------------------------------------------

    def is_control(self, token_id: int) -> bool:
        """True for tokens that are not text: control, unknown and unused tokens."""
        return self.token_types[token_id] in NOT_TEXT

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a control token: its own text)."""
        cached = self._bytes_cache[token_id]
        if cached is None:
            cached = self._bytes_cache[token_id] = self._token_bytes(token_id)
        return cached

    def _token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def decode(self, ids, skip_special: bool = False) -> str:
        """Token ids → text; bytes that are not valid UTF-8 become U+FFFD."""
        pieces = IncrementalDecoder(self, skip_special)
        return b"".join(pieces.piece(i) for i in ids).decode("utf-8", errors="replace")

    def decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        """A decoder that turns ids into text one at a time, never splitting a character."""
        return IncrementalDecoder(self, skip_special)


class IncrementalDecoder:
    """`push(id) -> str` emits only complete UTF-8 characters, holding back the bytes of one
    still being spelled; `flush()` gives what is left (a broken tail as U+FFFD). Pushing ids
    one by one and flushing gives exactly `tokenizer.decode(ids)`.

    SentencePiece with add_space_prefix put a space before a text's first word; when the ids
    start with BOS (the start of a text) the word after it loses that space again. Ids without
    a BOS in front, such as generated ones, keep their spaces: they continue a prompt.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self._strip_space = False

    def piece(self, token_id: int) -> bytes:
        """The bytes this token adds to the text."""
        tok = self.tokenizer
        if not 0 <= token_id < tok.n_vocab:
            raise TokenizerError(f"token id {token_id} is out of range (vocabulary of "
                                 f"{tok.n_vocab})")
        strip, self._strip_space = self._strip_space, False
        if self._first and token_id == tok.bos_id:
            self._strip_space = getattr(tok, "add_space_prefix", False)
        self._first = False
        if self.skip_special and tok.is_control(token_id):
            return b""
        data = tok.token_bytes(token_id)
        return data[1:] if strip and data.startswith(b" ") else data

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.piece(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class BPETokenizer(Tokenizer):
    """Byte-level BPE (`tokenizer.ggml.model = gpt2`)."""

    def __init__(self, metadata: dict):
        super().__init__(metadata)
        pre = metadata.get("tokenizer.ggml.pre") or "default"
        self.pre = PRE_ALIASES.get(pre, pre)
        if self.pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"pre-tokenizer {pre!r} is not supported (known: "
                                 f"{', '.join(sorted({*PRE_TOKENIZERS, *PRE_ALIASES}))})")
        self.patterns = [regex.compile(p) for p in PRE_TOKENIZERS[self.pre]]
        self.ignore_merges = self.pre in IGNORE_MERGES
        merges = metadata.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("a BPE vocabulary needs tokenizer.ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise TokenizerError("tokenizer.ggml.merges is not a list of strings")
        self.ranks = {tuple(m.split(" ", 1)): rank for rank, m in enumerate(merges)}
        self._word_cache: dict[str, list[int]] = {}

    def pre_tokenize(self, text: str) -> list[str]:
        """Split text into words with each pre-tokenizer regex in turn (llama.cpp's
        unicode_regex_split: a match is a word, so is the text between two matches)."""
        words = [text]
        for pattern in self.patterns:
            words = [w for word in words for w in _regex_split(pattern, word)]
        return words

    def _encode_plain(self, text: str, after_special: bool) -> list[int]:
        ids = []
        for word in self.pre_tokenize(text):
            cached = self._word_cache.get(word)
            if cached is None:
                if len(self._word_cache) > 100_000:
                    self._word_cache.clear()
                cached = self._word_cache[word] = self._encode_word(word)
            ids.extend(cached)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        """One word → ids: spell its bytes in the GPT-2 alphabet, merge by rank."""
        spelled = word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_GPT2)
        if self.ignore_merges and spelled in self.token_ids:
            return [self.token_ids[spelled]]
        pieces = merge_pairs(list(spelled), lambda a, b: self.ranks.get((a, b)))
        ids = []
        for piece in pieces:
            if piece in self.token_ids:
                ids.append(self.token_ids[piece])
            else:  # not a token: its characters one by one, as llama.cpp (unknown ones dropped)
                ids.extend(self.token_ids[c] for c in piece if c in self.token_ids)
        return ids

    def _token_bytes(self, token_id: int) -> bytes:
        text, kind = self.tokens[token_id], self.token_types[token_id]
        if kind == NORMAL:
            return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode()
                            for c in text)
        if kind == BYTE:
            return _byte_token_value(text)
        return text.encode("utf-8")  # user-defined and control tokens are stored as plain text


class SPMTokenizer(Tokenizer):
    """SentencePiece (`tokenizer.ggml.model = llama`), llama.cpp's llm_tokenizer_spm."""

    default_add_bos = True

    def __init__(self, metadata: dict):
        super().__init__(metadata)
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError("a SentencePiece vocabulary needs tokenizer.ggml.scores")
        self.scores: list[float] = _tolist(scores)
        if len(self.scores) != self.n_vocab or not all(
                isinstance(x, (int, float)) for x in self.scores[:1]):
            raise TokenizerError(f"tokenizer.ggml.scores has {len(self.scores)} numbers for "
                                 f"{self.n_vocab} tokens")
        self.add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        self.byte_ids = [self._byte_id(b) for b in range(256)]

    def _byte_id(self, b: int) -> int | None:
        """llama.cpp's byte_to_token: the `<0xNN>` token, else a token spelled as that byte."""
        found = self.token_ids.get(f"<0x{b:02X}>")
        return found if found is not None else self.token_ids.get(chr(b)) if b < 128 else None

    def _encode_plain(self, text: str, after_special: bool) -> list[int]:
        """▁ for spaces (and one in front after BOS/a special token if add_space_prefix), merge
        the best-scoring pair that is a token until none is, bytes for what no token spells."""
        if self.add_space_prefix and after_special:
            text = " " + text
        pieces = merge_pairs(list(text.replace(" ", SPM_SPACE)), self._pair_priority)
        ids = []
        for piece in pieces:
            token_id = self.token_ids.get(piece)
            if token_id is not None:
                ids.append(token_id)
            else:
                ids.extend(self._bytes_fallback(piece))
        return ids

    def _pair_priority(self, left: str, right: str) -> float | None:
        token_id = self.token_ids.get(left + right)
        return None if token_id is None else -self.scores[token_id]

    def _bytes_fallback(self, piece: str) -> list[int]:
        ids = []
        for b in piece.encode("utf-8"):
            token_id = self.byte_ids[b] if self.byte_ids[b] is not None else self.unk_id
            if token_id is None:
                raise TokenizerError(f"cannot tokenize {piece!r}: no byte token <0x{b:02X}> "
                                     f"and no unknown token in the vocabulary")
            ids.append(token_id)
        return ids

    def _token_bytes(self, token_id: int) -> bytes:
        text, kind = self.tokens[token_id], self.token_types[token_id]
        if kind == NORMAL:
            return text.replace(SPM_SPACE, " ").encode("utf-8")
        if kind == BYTE:
            return _byte_token_value(text)
        return text.encode("utf-8")


def check_token_ids(ids, n_vocab: int, where: str = "the input") -> None:
    """Raise TokenIdError naming the first id of `ids` outside 0..n_vocab-1 and `where` it was.

    The one check for token ids that come from a user (prompts, logit_bias keys, embedding
    inputs); the server calls it before a request waits for a slot.
    """
    bad = next((int(t) for t in ids if not 0 <= int(t) < n_vocab), None)
    if bad is not None:
        raise TokenIdError(f"token id {bad} in {where} is outside the vocabulary "
                           f"(0..{n_vocab - 1})")


_SURROGATE = regex.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """`text` as UTF-8 can hold it: a surrogate pair left as two code points (JSON's
    "\\ud83d\\ude00") becomes its character, a lone surrogate U+FFFD."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _tolist(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _split_at(fragment: str | int, tok_text: str, tok_id: int) -> list[str | int]:
    """A text fragment split at each (leftmost, non-overlapping) occurrence of a special
    token, the token's id in between; empty text pieces are dropped. Ids pass through."""
    if isinstance(fragment, int) or tok_text not in fragment:
        return [fragment]
    out: list[str | int] = []
    for n, part in enumerate(fragment.split(tok_text)):
        if n:
            out.append(tok_id)
        if part:
            out.append(part)
    return out


def _regex_split(pattern: regex.Pattern, text: str) -> list[str]:
    """The matches of `pattern` in `text` and the non-empty gaps between them, in order."""
    words, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            words.append(text[pos:m.start()])
        if m.end() > m.start():
            words.append(m.group())
        pos = m.end()
    if pos < len(text):
        words.append(text[pos:])
    return words


def _byte_token_value(text: str) -> bytes:
    """`<0x0A>` → b"\\n"."""
    try:
        return bytes([int(text[3:-1], 16)])
    except ValueError:
        return text.encode("utf-8")
