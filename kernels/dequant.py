"""Dequantize GGUF tensors to float32 with plain NumPy.

One `dequant_<fmt>_ref(blocks)` per format turns `(n_blocks, type_size)` uint8 into
`(n_blocks, block_size)` float32, vectorized over blocks; its docstring is the format's block
layout. All multi-byte fields are little-endian; `f16` scales are widened to float32 before any
arithmetic, and the float32 operations run in the same order as `gguf.quants.dequantize` (our
oracle, ggml's `dequantize_row_*`), so results are bit-exact: `(d * sc) * q - (dmin * m)` rounds
differently from `d * (sc * q - m)`.

Reference: gguf-py `gguf/quants.py`; ggml `ggml-quants.c`, `ggml-common.h` (block structs).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

BLOCK_SIZE = {qtype: size[0] for qtype, size in GGML_QUANT_SIZES.items()}  # elements per block
TYPE_SIZE = {qtype: size[1] for qtype, size in GGML_QUANT_SIZES.items()}  # bytes per block


# --- helpers ------------------------------------------------------------------------------------


def _fields(blocks: np.ndarray, *widths: int) -> list[np.ndarray]:
    """Split `(n_blocks, type_size)` bytes into consecutive fields of the given byte widths."""
    assert sum(widths) == blocks.shape[1], (widths, blocks.shape)
    return np.split(blocks, np.cumsum(widths)[:-1], axis=1)


def f16(field: np.ndarray) -> np.ndarray:
    """`(n_blocks, 2)` uint8 holding one float16 -> `(n_blocks, 1)` float32."""
    return field.view(np.float16).astype(np.float32)


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Split each byte into 8/bits fields, lowest bits first: `(..., k)` -> `(..., 8/bits, k)`.

    Field i of every byte lands in row i, which is how ggml lays out its packed quants: the low
    nibbles of 16 bytes are elements 0..15, the high nibbles elements 16..31. (`kernels.qpack`
    reads the K-quants' bits with it too.)
    """
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[:, None]  # (8/bits, 1)
    return (packed[..., None, :] >> shifts) & np.uint8((1 << bits) - 1)


# --- float formats (block_size 1) ----------------------------------------------------------------


def dequant_f32_ref(blocks: np.ndarray) -> np.ndarray:
    """F32: 4 bytes, an IEEE float32. `(n, 4)` uint8 -> `(n, 1)` float32 (a copy)."""
    return blocks.view(np.float32).copy()


def dequant_f16_ref(blocks: np.ndarray) -> np.ndarray:
    """F16: 2 bytes, an IEEE float16. `(n, 2)` uint8 -> `(n, 1)` float32."""
    return f16(blocks)


def dequant_bf16_ref(blocks: np.ndarray) -> np.ndarray:
    """BF16: 2 bytes, the top half of a float32. `(n, 2)` uint8 -> `(n, 1)` float32."""
    top = blocks.view(np.uint16).astype(np.uint32)  # (n, 1)
    return (top << 16).view(np.float32)


# --- 32-element formats --------------------------------------------------------------------------


def dequant_q4_0_ref(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: 32 elements in 18 bytes; `x = d * (q - 8)`.

    | bytes | field | meaning                                                        |
    |-------|-------|----------------------------------------------------------------|
    | 0-1   | d     | f16 scale                                                      |
    | 2-17  | qs    | 4-bit q: element j in the low nibble of qs[j], j+16 in the high |

    `(n_blocks, 18)` uint8 -> `(n_blocks, 32)` float32.
    """
    n = blocks.shape[0]
    d, qs = _fields(blocks, 2, 16)
    q = unpack_bits(qs, 4).reshape(n, 32).astype(np.int8) - 8  # (n, 32) in [-8, 7]
    return f16(d) * q.astype(np.float32)


def dequant_q4_1_ref(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: 32 elements in 20 bytes; `x = d * q + m`.

    | bytes | field | meaning                                      |
    |-------|-------|----------------------------------------------|
    | 0-1   | d     | f16 scale                                    |
    | 2-3   | m     | f16 offset (the block minimum)               |
    | 4-19  | qs    | 4-bit q, nibble order as in Q4_0, unsigned    |

    `(n_blocks, 20)` uint8 -> `(n_blocks, 32)` float32.
    """
    n = blocks.shape[0]
    d, m, qs = _fields(blocks, 2, 2, 16)
    q = unpack_bits(qs, 4).reshape(n, 32).astype(np.float32)  # (n, 32) in [0, 15]
    x = f16(d) * q
    x += f16(m)
    return x


def q5_quants(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """5-bit q of Q5_0/Q5_1: `(n, 4)` high bits and `(n, 16)` nibbles -> `(n, 32)` uint8."""
    n = qs.shape[0]
    low = unpack_bits(qs, 4).reshape(n, 32)  # (n, 32)
    high = np.unpackbits(qh, axis=1, bitorder="little")  # (n, 32): bit j of the u32 = element j
    return low | (high << 4)


def dequant_q5_0_ref(blocks: np.ndarray) -> np.ndarray:
    """Q5_0: 32 elements in 22 bytes; `x = d * (q - 16)`.

    | bytes | field | meaning                                                        |
    |-------|-------|----------------------------------------------------------------|
    | 0-1   | d     | f16 scale                                                      |
    | 2-5   | qh    | little-endian u32: bit j is bit 4 of element j                 |
    | 6-21  | qs    | low 4 bits: element j in the low nibble of qs[j], j+16 in high  |

    `(n_blocks, 22)` uint8 -> `(n_blocks, 32)` float32.
    """
    d, qh, qs = _fields(blocks, 2, 4, 16)
    q = q5_quants(qh, qs).astype(np.int8) - 16  # (n, 32) in [-16, 15]
    return f16(d) * q.astype(np.float32)


def dequant_q5_1_ref(blocks: np.ndarray) -> np.ndarray:
    """Q5_1: 32 elements in 24 bytes; `x = d * q + m`.

    | bytes | field | meaning                                   |
    |-------|-------|-------------------------------------------|
    | 0-1   | d     | f16 scale                                 |
    | 2-3   | m     | f16 offset                                |
    | 4-7   | qh    | bit 4 of each element, as in Q5_0         |
    | 8-23  | qs    | low 4 bits, as in Q5_0, unsigned          |

    `(n_blocks, 24)` uint8 -> `(n_blocks, 32)` float32.
    """
    d, m, qh, qs = _fields(blocks, 2, 2, 4, 16)
    q = q5_quants(qh, qs).astype(np.float32)  # (n, 32) in [0, 31]
    x = f16(d) * q
    x += f16(m)
    return x


def dequant_q8_0_ref(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: 32 elements in 34 bytes; `x = d * q`.

    | bytes | field | meaning        |
    |-------|-------|----------------|
    | 0-1   | d     | f16 scale      |
    | 2-33  | qs    | 32 int8 q      |

    `(n_blocks, 34)` uint8 -> `(n_blocks, 32)` float32.
    """
    d, qs = _fields(blocks, 2, 32)
    return f16(d) * qs.view(np.int8).astype(np.float32)


# --- K-quants: 256-element super-blocks of 16 or 8 sub-blocks with their own scales ---------------


def dequant_q2_k_ref(blocks: np.ndarray) -> np.ndarray:
    """Q2_K: 256 elements in 84 bytes, 16 sub-blocks of 16; `x = (d * sc) * q - (dmin * m)`.

    | bytes | field  | meaning                                                        |
    |-------|--------|----------------------------------------------------------------|
    | 0-15  | scales | sub-block i: sc = low nibble, m = high nibble of scales[i]       |
    | 16-79 | qs     | 2-bit q; two halves of 32 bytes, see below                      |
    | 80-81 | d      | f16 super-scale of sc                                           |
    | 82-83 | dmin   | f16 super-scale of m                                            |

    Element `128*h + 32*j + l` (half h, l < 32) is bits 2j..2j+1 of qs[32*h + l].
    `(n_blocks, 84)` uint8 -> `(n_blocks, 256)` float32.
    """
    n = blocks.shape[0]
    scales, qs, d, dmin = _fields(blocks, 16, 64, 2, 2)
    sc = f16(d) * (scales & 0xF).astype(np.float32)  # (n, 16)
    m = f16(dmin) * (scales >> 4).astype(np.float32)  # (n, 16)
    q = unpack_bits(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16)  # (n, sub-block, 16)
    x = sc[:, :, None] * q.astype(np.float32)
    x -= m[:, :, None]
    return x.reshape(n, QK_K)


def dequant_q3_k_ref(blocks: np.ndarray) -> np.ndarray:
    """Q3_K: 256 elements in 110 bytes, 16 sub-blocks of 16; `x = (d * (sc - 32)) * (q - 4)`.

    | bytes  | field  | meaning                                                   |
    |--------|--------|-----------------------------------------------------------|
    | 0-31   | hmask  | bit 2 of q: element 32*k + l is bit k of hmask[l]          |
    | 32-95  | qs     | low 2 bits of q, arranged as in Q2_K                       |
    | 96-107 | scales | 16 6-bit scales, packed as below                           |
    | 108-109| d      | f16 super-scale                                            |

    The 6-bit scales A..P (sub-blocks 0..15), upper-case = low 4 bits, lower = high 2 bits:

        byte  0: IIIIAAAA   byte  4: MMMMEEEE   byte  8: mmiieeaa
        byte  1: JJJJBBBB   byte  5: NNNNFFFF   byte  9: nnjjffbb
        byte  2: KKKKCCCC   byte  6: OOOOGGGG   byte 10: ookkggcc
        byte  3: LLLLDDDD   byte  7: PPPPHHHH   byte 11: ppllhhdd

    A set hmask bit means "no offset": q = low2 + 4 * hbit - 4, in [-4, 3].
    `(n_blocks, 110)` uint8 -> `(n_blocks, 256)` float32.
    """
    n = blocks.shape[0]
    hmask, qs, scales, d = _fields(blocks, 32, 64, 12, 2)
    low = unpack_bits(scales[:, :8], 4).reshape(n, 16)  # (n, 16): A..H from low nibbles, I..P high
    high = unpack_bits(scales[:, 8:], 2).reshape(n, 16)  # (n, 16): byte 8+i%4, bits 2*(i//4)
    sc = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32)  # (n, 16) in [-32, 31]
    sc = f16(d) * sc  # (n, 16)

    q_low = unpack_bits(qs.reshape(n, 2, 32), 2).reshape(n, 8, 32)  # (n, 8, 32)
    q_high = unpack_bits(hmask, 1)  # (n, 8, 32): row k = bit k of each hmask byte
    q = (q_low | (q_high << 2)).astype(np.int8) - 4  # (n, 8, 32) in [-4, 3]
    x = sc[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)
    return x.reshape(n, QK_K)


def k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte scales of Q4_K/Q5_K: `(n, 12)` -> sc, m each `(n, 8)` uint8 in [0, 63].

    (`kernels.qpack` reads Q4_K's scales with it too.)

    Sub-block j's 6-bit scale and min are A..H and a..h, upper-case = low bits:

        byte 0: EEAAAAAA   byte 4: eeaaaaaa   byte  8: eeeeEEEE
        byte 1: FFBBBBBB   byte 5: ffbbbbbb   byte  9: ffffFFFF
        byte 2: GGCCCCCC   byte 6: ggcccccc   byte 10: ggggGGGG
        byte 3: HHDDDDDD   byte 7: hhdddddd   byte 11: hhhhHHHH
    """
    s0, s1, s2 = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]  # (n, 4) each
    sc = np.concatenate([s0 & 0x3F, (s2 & 0x0F) | ((s0 >> 6) << 4)], axis=1)
    m = np.concatenate([s1 & 0x3F, (s2 >> 4) | ((s1 >> 6) << 4)], axis=1)
    return sc, m


def dequant_q4_k_ref(blocks: np.ndarray) -> np.ndarray:
    """Q4_K: 256 elements in 144 bytes, 8 sub-blocks of 32; `x = (d * sc) * q - (dmin * m)`.

    | bytes  | field  | meaning                                                     |
    |--------|--------|-------------------------------------------------------------|
    | 0-1    | d      | f16 super-scale of sc                                       |
    | 2-3    | dmin   | f16 super-scale of m                                        |
    | 4-15   | scales | 8 6-bit sc and 8 6-bit m, see `k_scales`                    |
    | 16-143 | qs     | 4-bit q; 4 groups of 32 bytes, see below                    |

    Group g of qs holds sub-block 2g in its low nibbles and sub-block 2g+1 in its high nibbles.
    `(n_blocks, 144)` uint8 -> `(n_blocks, 256)` float32.
    """
    n = blocks.shape[0]
    d, dmin, scales, qs = _fields(blocks, 2, 2, 12, 128)
    sc, m = k_scales(scales)
    sc = f16(d) * sc.astype(np.float32)  # (n, 8)
    m = f16(dmin) * m.astype(np.float32)  # (n, 8)
    q = unpack_bits(qs.reshape(n, 4, 32), 4).reshape(n, 8, 32)  # (n, sub-block, 32)
    x = sc[:, :, None] * q.astype(np.float32)
    x -= m[:, :, None]
    return x.reshape(n, QK_K)


def dequant_q5_k_ref(blocks: np.ndarray) -> np.ndarray:
    """Q5_K: 256 elements in 176 bytes, 8 sub-blocks of 32; `x = (d * sc) * q - (dmin * m)`.

    | bytes  | field  | meaning                                                      |
    |--------|--------|--------------------------------------------------------------|
    | 0-1    | d      | f16 super-scale of sc                                        |
    | 2-3    | dmin   | f16 super-scale of m                                         |
    | 4-15   | scales | 8 6-bit sc and 8 6-bit m, as in Q4_K (`k_scales`)            |
    | 16-47  | qh     | bit 4 of q: element 32*k + l is bit k of qh[l]               |
    | 48-175 | qs     | low 4 bits of q, arranged as in Q4_K                         |

    `(n_blocks, 176)` uint8 -> `(n_blocks, 256)` float32.
    """
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = _fields(blocks, 2, 2, 12, 32, 128)
    sc, m = k_scales(scales)
    sc = f16(d) * sc.astype(np.float32)  # (n, 8)
    m = f16(dmin) * m.astype(np.float32)  # (n, 8)
    q_low = unpack_bits(qs.reshape(n, 4, 32), 4).reshape(n, 8, 32)  # (n, 8, 32)
    q_high = unpack_bits(qh, 1)  # (n, 8, 32)
    q = q_low | (q_high << 4)  # (n, sub-block, 32) in [0, 31]
    x = sc[:, :, None] * q.astype(np.float32)
    x -= m[:, :, None]
    return x.reshape(n, QK_K)


def dequant_q6_k_ref(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 256 elements in 210 bytes, 16 sub-blocks of 16; `x = (d * sc) * (q - 32)`.

    | bytes   | field  | meaning                                         |
    |---------|--------|-------------------------------------------------|
    | 0-127   | ql     | low 4 bits of q; two halves of 64 bytes         |
    | 128-191 | qh     | high 2 bits of q; two halves of 32 bytes        |
    | 192-207 | scales | 16 int8 sub-block scales                        |
    | 208-209 | d      | f16 super-scale                                 |

    In half h (elements 128*h ..), element 32*k + l (k < 4, l < 32) takes its low bits from
    the low nibble (k < 2) or high nibble (k >= 2) of ql[64*h + 32*(k%2) + l], and its high
    bits from bits 2k..2k+1 of qh[32*h + l].
    `(n_blocks, 210)` uint8 -> `(n_blocks, 256)` float32.
    """
    n = blocks.shape[0]
    ql, qh, scales, d = _fields(blocks, 128, 64, 16, 2)
    sc = f16(d) * scales.view(np.int8).astype(np.float32)  # (n, 16)
    q_low = unpack_bits(ql.reshape(n, 2, 64), 4).reshape(n, 2, 4, 32)  # (n, half, k, 32)
    q_high = unpack_bits(qh.reshape(n, 2, 32), 2)  # (n, half, k, 32)
    q = (q_low | (q_high << 4)).astype(np.int8) - 32  # in [-32, 31]
    x = sc[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)
    return x.reshape(n, QK_K)


# --- entry points --------------------------------------------------------------------------------

_Q = GGMLQuantizationType
DEQUANT = {
    _Q.F32: dequant_f32_ref,
    _Q.F16: dequant_f16_ref,
    _Q.BF16: dequant_bf16_ref,
    _Q.Q4_0: dequant_q4_0_ref,
    _Q.Q4_1: dequant_q4_1_ref,
    _Q.Q5_0: dequant_q5_0_ref,
    _Q.Q5_1: dequant_q5_1_ref,
    _Q.Q8_0: dequant_q8_0_ref,
    _Q.Q2_K: dequant_q2_k_ref,
    _Q.Q3_K: dequant_q3_k_ref,
    _Q.Q4_K: dequant_q4_k_ref,
    _Q.Q5_K: dequant_q5_k_ref,
    _Q.Q6_K: dequant_q6_k_ref,
}

# Blocks per NumPy call: large enough to amortize call overhead, small enough that the
# temporaries stay in cache (256 KB of output per chunk; 3x faster than one call).
_CHUNK_ELEMENTS = 1 << 16


def _check(raw: np.ndarray, qtype, shape: tuple) -> tuple[GGMLQuantizationType, int]:
    """Validate the arguments; return the qtype as an enum and the bytes per row."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in DEQUANT:
        raise NotImplementedError(f"dequantization of {qtype.name} is not implemented")
    n_in = shape[-1]
    if n_in % BLOCK_SIZE[qtype]:
        raise ValueError(f"row length {n_in} is not a multiple of {qtype.name}'s block size")
    row_bytes = n_in // BLOCK_SIZE[qtype] * TYPE_SIZE[qtype]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    if raw.size != n_rows * row_bytes:
        raise ValueError(f"{raw.size} bytes do not hold a {qtype.name} tensor of shape {shape}")
    return qtype, row_bytes


def _dequant_blocks(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`(n_blocks, type_size)` uint8 -> `(n_blocks, block_size)` float32, a chunk at a time."""
    n_blocks, block_size = blocks.shape[0], BLOCK_SIZE[qtype]
    out = np.empty((n_blocks, block_size), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, n_blocks, step):
        out[start : start + step] = DEQUANT[qtype](blocks[start : start + step])
    return out


def dequantize(raw: np.ndarray, qtype, shape: tuple) -> np.ndarray:
    """Dequantize a whole tensor: raw uint8 bytes (flat or per row) -> float32 `shape`.

    `shape` is in NumPy order, `(n_out, n_in)` for a matrix; `n_in` must be a multiple of the
    block size. Always returns a new array.
    """
    raw = np.asarray(raw).view(np.uint8)
    qtype, _ = _check(raw, qtype, shape)
    blocks = raw.reshape(-1, TYPE_SIZE[qtype])  # (n_blocks, type_size)
    return _dequant_blocks(blocks, qtype).reshape(shape)


def dequantize_rows(raw: np.ndarray, qtype, shape: tuple, rows: np.ndarray) -> np.ndarray:
    """Dequantize only `rows` of an `(n_out, n_in)` tensor: -> `(len(rows), n_in)` float32.

    For embedding lookup, where dequantizing the whole table would be wasteful.
    """
    raw = np.asarray(raw).view(np.uint8)
    qtype, row_bytes = _check(raw, qtype, shape)
    rows = np.asarray(rows, dtype=np.intp).reshape(-1)  # (n,)
    picked = raw.reshape(-1, row_bytes)[rows]  # (n, row_bytes)
    blocks = picked.reshape(-1, TYPE_SIZE[qtype])  # (n * blocks_per_row, type_size)
    return _dequant_blocks(blocks, qtype).reshape(len(rows), shape[-1])
