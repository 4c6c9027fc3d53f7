"""Where the strings of a GGUF string array start: the one sequential walk a vocabulary needs.

A GGUF string array is `count` records `u64 length | length bytes`. Each record's start
depends on the one before, so NumPy cannot vectorize the walk, and in Python it costs ~0.7 us a
string (~0.2 s for Gemma-3's 262,144 tokens). This kernel walks the lengths only; the reader
(engine/gguf_file.py) then builds all the `str` objects with one decode and one split.
`string_starts_ref` is its plain-Python twin.
"""

from __future__ import annotations

import numpy as np

from kernels.jit import njit


@njit
def string_starts(buf, pos, count, max_len, starts):
    """buf (n,) uint8; the array's first record at `pos` -> starts (count + 1,) int64: where
    each string's bytes begin, and starts[count] = the end of the last one. Returns the index
    of the first record whose length field or bytes run past the buffer or whose length is
    over `max_len`, or -1 when all fit."""
    end = buf.shape[0]
    for i in range(count):
        if pos + 8 > end:
            return i
        n = np.int64(0)
        for k in range(7, -1, -1):  # little-endian u64 (a length >= 2**63 is out anyway)
            n = (n << 8) | np.int64(buf[pos + k])
        pos += 8
        if n < 0 or n > max_len or n > end - pos:
            return i
        starts[i] = pos
        pos += n
    starts[count] = pos
    return -1


def string_starts_ref(buf, pos, count, max_len, starts):
    """The same walk in Python (the twin `string_starts` is tested against)."""
    end = len(buf)
    for i in range(count):
        if pos + 8 > end:
            return i
        n = int.from_bytes(bytes(buf[pos:pos + 8]), "little")
        pos += 8
        if n > max_len or n > end - pos:
            return i
        starts[i] = pos
        pos += n
    starts[count] = pos
    return -1
