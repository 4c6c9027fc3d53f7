"""Landing: finishing a grammar within max_tokens, so a structured reply always parses.

A constrained generation cut by max_tokens inside a string is broken JSON. To avoid that, the
grammar state (`constrain.Constraint`) keeps an `Ending`: bytes that would finish the grammar
from here, and how few tokens spell them. Its length in tokens is the distance to the end.
The decoder (`generate.Decoding`) knows how many tokens are left and keeps

    distance(state after the next token) <= tokens left after it

so there is always a way to finish: with room to spare it samples freely and draws again
when a token would open more than the budget can close (a key, an array, ...); with none it
allows only the tokens that begin the ending (engine/generate.py).

The ending is found by walking the grammar one byte at a time (llguidance says which bytes may
come next), taking its forced bytes, else the first allowed byte in an order that closes JSON
soonest. It is short, not always the shortest there is; every ending is checked by the
grammar, so a longer one only makes the landing start a little earlier. The bytes are then
spelled with the fewest tokens of the vocabulary (`spell`), which is what max_tokens counts.

    {"city": "Par  →  ending b'"}' (1 token: "})
    {"tags": [     →  ending b'1]}'   (a required property's array: minItems 1, integers)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ENDING = 1024  # bytes: an ending not found within this is "none known" (no landing)
MAX_MISSES = 8  # searches that found no ending before a generation stops looking

# The byte tried first, by where the text is: inside a JSON string, closing it; elsewhere the
# closing brackets, a comma (on to a required property or item), then the shortest values.
INSIDE_STRING = b'"'
OUTSIDE_STRING = b'}],10"[{tn'
# When none of those may come (a key's name, an enum, a pattern, a literal of a Lark grammar),
# the first allowed of every byte, printable ASCII first.
ANY_BYTE = bytes([*range(0x21, 0x7F), 0x20, 0x0A, 0x09, 0x0D, *range(0x80, 0x100),
                  *range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


@dataclass(frozen=True)
class Ending:
    """Bytes that finish the grammar from the current state; `fewest[i]` is the fewest tokens
    that spell `data[i:]` (so `fewest[0]`, `length`, is the distance in tokens)."""

    data: bytes
    fewest: tuple[int, ...]  # (len(data) + 1,)

    @property
    def length(self) -> int:
        return self.fewest[0]

    def after(self, n_bytes: int) -> Ending:
        """The rest of this ending once its first `n_bytes` have been written."""
        return Ending(self.data[n_bytes:], self.fewest[n_bytes:])


class Spelling:
    """A vocabulary's tokens by their bytes (special tokens left out: text never spells them)."""

    def __init__(self, tokenizer, special: set[int]):
        self.n_vocab = tokenizer.n_vocab
        self.ids: dict[bytes, int] = {}
        for i in range(tokenizer.n_vocab):
            data = tokenizer.token_bytes(i)
            if i not in special and data:
                self.ids.setdefault(data, i)
        self.longest = max(map(len, self.ids), default=1)
        self.byte = {data[0]: i for data, i in self.ids.items() if len(data) == 1}
        # every start of a token's bytes, so spelling stops looking once no token goes on
        self.starts = {data[:k] for data in self.ids for k in range(1, len(data))}

    def spell(self, data: bytes) -> Ending:
        """`data` as an Ending: the fewest tokens for every suffix (right to left)."""
        n = len(data)
        never = n + 1  # more than any spelling with one-byte tokens takes
        fewest = [never] * n + [0]
        for i in range(n - 1, -1, -1):
            for k in range(1, n - i + 1):
                piece = data[i:i + k]
                if piece in self.ids:
                    fewest[i] = min(fewest[i], 1 + fewest[i + k])
                if piece not in self.starts:
                    break
        return Ending(bytes(data), tuple(fewest))

    def first_tokens(self, ending: Ending, left: int) -> list[int]:
        """Tokens that spell a start of `ending` and leave its rest spellable in `left - 1`."""
        out = []
        for k in range(1, min(self.longest, len(ending.data)) + 1):
            token = self.ids.get(ending.data[:k])
            if token is not None and 1 + ending.fewest[k] <= left:
                out.append(token)
        return out

    def tokens(self, ending: Ending) -> list[int]:
        """The ending as its fewest tokens."""
        data, fewest = ending.data, ending.fewest
        out, i = [], 0
        while i < len(data):
            k = 1
            while not (data[i:i + k] in self.ids and fewest[i + k] == fewest[i] - 1):
                k += 1  # the spelling exists, so some k <= longest fits
            out.append(self.ids[data[i:i + k]])
            i += k
        return out


class JsonStrings:
    """Whether the text so far ends inside a JSON string: quotes and backslash escapes only,
    which is all the ending's byte order needs to know."""

    def __init__(self, inside: bool = False, escaped: bool = False):
        self.inside, self.escaped = inside, escaped

    def copy(self) -> JsonStrings:
        return JsonStrings(self.inside, self.escaped)

    def feed(self, data: bytes) -> None:
        for byte in data:
            if self.escaped:
                self.escaped = False
            elif byte == 0x5C and self.inside:  # backslash
                self.escaped = True
            elif byte == 0x22:  # quote
                self.inside = not self.inside


def find_ending(matcher, strings: JsonStrings, spell: Spelling) -> Ending | None:
    """A short ending from the matcher's state (which is left as it was), or None when none
    is found within MAX_ENDING bytes (or it needs a byte no single token spells)."""
    data = bytearray()
    strings = strings.copy()
    consumed = 0
    try:
        while not matcher.is_accepting():
            if len(data) >= MAX_ENDING:
                return None
            last = data[-1] if data else None
            step = bytes(matcher.compute_ff_bytes()) or _first_allowed_byte(matcher, strings,
                                                                            spell, last)
            ids = [spell.byte.get(b) for b in step]
            if not step or None in ids:
                return None
            n = matcher.try_consume_tokens(ids)
            consumed += n
            if n < len(ids):
                return None
            data += step
            strings.feed(step)
    finally:
        matcher.rollback(consumed)
    return spell.spell(bytes(data))


def _first_allowed_byte(matcher, strings: JsonStrings, spell: Spelling,
                        last: int | None) -> bytes:
    """The first byte of the preferred ones the grammar allows; else, from its mask, the
    first allowed byte of ANY_BYTE after `last` (the byte before; so `a+b` ends `ab`, not in
    a run of `a`s)."""
    for byte in INSIDE_STRING if strings.inside else OUTSIDE_STRING:
        token = spell.byte.get(byte)
        if token is not None and matcher.try_consume_tokens([token]):
            matcher.rollback(1)
            return bytes([byte])
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    mask = allocate_token_bitmask(1, spell.n_vocab)  # (1, n_words) int32
    fill_next_token_bitmask(matcher, mask)
    words = mask[0].view(np.uint32)
    start = ANY_BYTE.index(last) + 1 if last is not None else 0
    for byte in ANY_BYTE[start:] + ANY_BYTE[:start]:
        token = spell.byte.get(byte)
        if token is not None and (words[token >> 5] >> (token & 31)) & 1:
            return bytes([byte])
    return b""


def still_ends(matcher, ending: Ending, spell: Spelling) -> bool:
    """Does `ending` still finish the grammar from the matcher's state (left as it was)?"""
    ids = spell.tokens(ending)
    n = matcher.try_consume_tokens(ids) if ids else 0
    ok = n == len(ids) and matcher.is_accepting()
    matcher.rollback(n)
    return ok
