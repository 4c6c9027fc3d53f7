"""Load-time repacking of GGUF quantized weights into 16-row interleaved groups.

Every integer format we run fast is first written as `W[r, e] = d[r, b] * u[r, e] + m[r, b]`,
with `u` an unsigned byte (0..255), and `d`, `m` one scale and one offset per block `b` of
`blk` (32 or 16) elements of a row:

| type | u                | blk | d           | m               | LAYOUT_     | B/w    | file   |
|------|------------------|-----|-------------|-----------------|-------------|--------|--------|
| Q4_0 | q (0..15)        | 32  | d           | -8 d            | NIBBLE32    | 0.625  | 0.5625 |
| Q4_1 | q (0..15)        | 32  | d           | m               | NIBBLE32    | 0.625  | 0.625  |
| Q4_K | q (0..15)        | 32  | d * sc      | -dmin * m       | NIBBLE32    | 0.625  | 0.5625 |
| Q5_0 | q (0..31)        | 32  | d           | -16 d           | NIBBLE32_HI | 0.75   | 0.6875 |
| Q5_1 | q (0..31)        | 32  | d           | m               | NIBBLE32_HI | 0.75   | 0.75   |
| Q5_K | q (0..31)        | 32  | d * sc      | -dmin * m       | NIBBLE32_HI | 0.75   | 0.6875 |
| Q8_0 | q + 128 (0..255) | 32  | d           | -128 d, implied | BYTE32      | 1.0625 | 1.0625 |
| Q6_K | q (0..63)        | 16  | d * sc      | -32 d * sc      | BYTE16      | 1.25   | 0.82   |
| Q3_K | q + 4 (0..7)     | 16  | d * (sc-32) | -4 d (sc-32)    | BYTE16      | 1.25   | 0.43   |
| Q2_K | q (0..3)         | 16  | d * sc      | -dmin * m       | BYTE16      | 1.25   | 0.33   |

so one kernel serves them all (B/w: bytes a weight as packed, scales included, which is what
decode reads a token; file: the GGUF's). Rows are taken 16 at a time (a *group*; the last group
is padded with zero rows). A group is stored block after block; one block record is

    quants  : 64-byte chunks. Chunk k holds, for row r = 0..15, 4 bytes at 4r..4r+3:
              BYTE32, BYTE16    u[r, 4k + i]                             (i = 0..3, k < blk/4)
              NIBBLE32(_HI)     (u[r, 4k + i] & 15) | (u[r, 16 + 4k + i] & 15) << 4   (k < 4)
    hi      : NIBBLE32_HI only: 64 bytes, the 5th bits (u >> 4) of the nibbles above, as 8
              little-endian uint64, one per 64-lane vector in the order the kernel takes them,
              (chunk 0, low nibbles), (chunk 0, high nibbles), (chunk 1, low), ...: bit j of
              uint64 2k + h is bit 4 of u[r, 16h + 4k + i] for lane j = 4r + i
    d       : 16 x float16 (one per row)
    m       : 16 x float16; not stored by BYTE32, whose m is always -128 d (Q8_0)

so a 64-byte load is the same 4 elements of 16 rows: the int8 dot product `vpdpbusd` then adds
4 products into each of 16 int32 lanes, one lane per output row, and no horizontal sum is needed.
A NIBBLE32_HI record is 384 bytes per 16 x 32 weights (256 nibbles, 64 hi, 64 scales), where a
byte a weight took 576; a BYTE32 record is 544 (512 + 32: d only).
The K-quant products `d * sc` are rounded to float16 here (relative error <= 2^-11, far below
the activation-quantization error of the matmul); the other formats are stored exactly.

BYTE32 keeps no m because Q8_0, its one format, has m = -128 d. A format that needed a byte a
weight in blocks of 32 with a free m (none does today) would get a layout code of its own with
`LAYOUT_SCALE_BYTES` 64, its m read as the other layouts read theirs; `pack` refuses an m that
BYTE32 cannot represent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kernels.dequant import dequantize, f16, k_scales, q5_quants, unpack_bits

Q = GGMLQuantizationType
# The version of the packed layout below (group size, block records, the (u, d, m) of each
# format). engine/repack_cache.py keeps repacked weights on disk under this number: bump it
# whenever `pack` or a `_split_*` writes different bytes, or old caches would be trusted.
LAYOUT_VERSION = 2  # 2: 5-bit formats as nibbles + a 5th-bit plane; Q8_0 without m
GROUP = 16  # rows per interleaved group = int32 lanes of a 512-bit register
# codes passed to the kernels: nibble, byte, byte16 and nibble+hi of the module docstring
LAYOUT_NIBBLE32, LAYOUT_BYTE32, LAYOUT_BYTE16, LAYOUT_NIBBLE32_HI = 0, 1, 2, 3
# by layout code (tuples, so Numba can index them):
LAYOUT_BLK = (32, 32, 16, 32)  # elements per block
LAYOUT_SCALE_BYTES = (64, 32, 64, 64)  # d and m, 16 float16 each, of a record; byte: d only
HI_BYTES = 64  # the 5th-bit plane of a LAYOUT_NIBBLE32_HI record: 8 x uint64
BYTE32_M = -128  # LAYOUT_BYTE32's implied m per unit of d (u = q + 128)


def is_nibble(layout: int) -> bool:
    """Two 4-bit quants a byte (NIBBLE32, and NIBBLE32_HI before its 5th bits)."""
    return layout == LAYOUT_NIBBLE32 or layout == LAYOUT_NIBBLE32_HI


def quant_bytes(layout: int) -> int:
    """Bytes of quants in one block record: 16 rows x blk elements of 4 or 8 bits, plus the
    5th-bit plane of NIBBLE32_HI."""
    hi = HI_BYTES if layout == LAYOUT_NIBBLE32_HI else 0
    return GROUP * LAYOUT_BLK[layout] // (2 if is_nibble(layout) else 1) + hi


def record_bytes(layout: int) -> int:
    """Bytes of one group's block record: quants, then scales."""
    return quant_bytes(layout) + LAYOUT_SCALE_BYTES[layout]


@dataclass
class PackedWeight:
    """A weight matrix ready for `kernels.qmatmul`: `(n_out, n_in)` in NumPy order.

    `data` is the flat uint8 group/block stream described in the module docstring, or None for
    float weights, which live in `dense` as float32 `(n_out, n_in)`.
    """

    qtype: GGMLQuantizationType
    n_out: int
    n_in: int
    layout: int = -1  # LAYOUT_* code, -1 for dense float
    data: np.ndarray | None = None  # (n_groups * group_bytes,) uint8
    dense: np.ndarray | None = None  # (n_out, n_in) float32

    def __post_init__(self):
        if self.layout >= 0:
            self.blk = LAYOUT_BLK[self.layout]
            self.block_bytes = record_bytes(self.layout)  # one group's block record

    @property
    def n_groups(self) -> int:
        return -(-self.n_out // GROUP)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes if self.data is not None else self.dense.nbytes


# --- per-format decomposition into (u, d, m) ------------------------------------------------------


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """`(..., k)` bytes -> `(..., 2k)`: the k low nibbles, then the k high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _split_q4_0(b):
    d = f16(b[:, 0:2])
    return _nibbles(b[:, 2:18]), d, -8 * d


def _split_q4_1(b):
    return _nibbles(b[:, 4:20]), f16(b[:, 0:2]), f16(b[:, 2:4])


def _split_q5_0(b):
    d = f16(b[:, 0:2])
    return q5_quants(b[:, 2:6], b[:, 6:22]), d, -16 * d


def _split_q5_1(b):
    return q5_quants(b[:, 4:8], b[:, 8:24]), f16(b[:, 0:2]), f16(b[:, 2:4])


def _split_q8_0(b):
    d = f16(b[:, 0:2])
    return b[:, 2:34] ^ np.uint8(0x80), d, -128 * d  # q + 128 as unsigned


def _split_q4_k(b):
    n = b.shape[0]
    sc, mn = k_scales(b[:, 4:16])
    d = f16(b[:, 0:2]) * sc.astype(np.float32)  # (n, 8)
    m = -(f16(b[:, 2:4]) * mn.astype(np.float32))  # (n, 8)
    u = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 256)  # sub-blocks 2g, 2g+1 per 32 B
    return u, d, m


def _split_q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    d = f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    low = _nibbles(ql).reshape(n, 2, 4, 32)  # (n, half, k, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # (n, half, k, 32)
    return (low | (high << 4)).reshape(n, 256), d, -32 * d


def _split_q2_k(b):
    n = b.shape[0]
    scales = b[:, 0:16]
    u = unpack_bits(b[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 256)  # q in 0..3
    d = f16(b[:, 80:82]) * (scales & 0xF).astype(np.float32)  # (n, 16)
    m = -(f16(b[:, 82:84]) * (scales >> 4).astype(np.float32))  # (n, 16)
    return u, d, m


def _split_q3_k(b):
    n = b.shape[0]
    low = unpack_bits(b[:, 96:104], 4).reshape(n, 16)  # 6-bit scales (dequant_q3_k_ref)
    high = unpack_bits(b[:, 104:108], 2).reshape(n, 16)
    sc = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32)  # (n, 16)
    q_low = unpack_bits(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q_high = unpack_bits(b[:, 0:32], 1)  # (n, 8, 32)
    u = (q_low | (q_high << 2)).reshape(n, 256)  # q + 4 in 0..7
    d = f16(b[:, 108:110]) * sc
    return u, d, -4 * d


def _split_q5_k(b):
    n = b.shape[0]
    sc, mn = k_scales(b[:, 4:16])
    q_low = unpack_bits(b[:, 48:176].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    q_high = unpack_bits(b[:, 16:48], 1)  # (n, 8, 32)
    u = (q_low | (q_high << 4)).reshape(n, 256)  # q in 0..31
    d = f16(b[:, 0:2]) * sc.astype(np.float32)  # (n, 8)
    m = -(f16(b[:, 2:4]) * mn.astype(np.float32))
    return u, d, m


# qtype -> (decompose, layout)
SPLIT = {
    Q.Q4_0: (_split_q4_0, LAYOUT_NIBBLE32),
    Q.Q4_1: (_split_q4_1, LAYOUT_NIBBLE32),
    Q.Q4_K: (_split_q4_k, LAYOUT_NIBBLE32),
    # 5-bit formats: nibbles plus a plane of 5th bits, 0.75 bytes a weight with the scales
    # (against 0.6875 / 0.75 / 0.6875 in the file)
    Q.Q5_0: (_split_q5_0, LAYOUT_NIBBLE32_HI),
    Q.Q5_1: (_split_q5_1, LAYOUT_NIBBLE32_HI),
    Q.Q5_K: (_split_q5_k, LAYOUT_NIBBLE32_HI),
    Q.Q8_0: (_split_q8_0, LAYOUT_BYTE32),  # the byte layout's only format: m = -128 d implied
    Q.Q6_K: (_split_q6_k, LAYOUT_BYTE16),
    # 2- and 3-bit K-quants take a byte per weight (1.25 bytes with the scales, against 0.33 /
    # 0.43 in the file): ~3.8x, 2.9x the file, not the 12x, 9x of a float32 copy, and the same
    # kernel as the others
    Q.Q2_K: (_split_q2_k, LAYOUT_BYTE16),
    Q.Q3_K: (_split_q3_k, LAYOUT_BYTE16),
}


def decompose(raw: np.ndarray, qtype, shape: tuple) -> tuple[np.ndarray, ...]:
    """Raw GGUF bytes -> `u (n_out, n_in)` uint8, `d, m (n_out, n_in/blk)` float32, layout."""
    qtype = Q(qtype)
    split, layout = SPLIT[qtype]
    n_out, n_in = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(raw).view(np.uint8).reshape(-1, type_size)  # (n_blocks, type_size)
    u, d, m = split(blocks)
    nb = n_in // LAYOUT_BLK[layout]
    return u.reshape(n_out, n_in), d.reshape(n_out, nb), m.reshape(n_out, nb), layout


def _to_f16(a: np.ndarray) -> np.ndarray:
    h = a.astype(np.float16)
    if not np.isfinite(h).all():
        raise OverflowError("a block scale does not fit in float16")
    return h


def _hi_plane(u: np.ndarray) -> np.ndarray:
    """`u (g, r, b, 32)` 5-bit quants -> `(g, b, 64)` bytes: their 5th bits as 8 little-endian
    uint64 (module docstring), vector 2k + h holding u[r, 16h + 4k + i] at bit 4r + i."""
    g, _, nb, _ = u.shape
    bits = (u >> 4).reshape(g, GROUP, nb, 2, 4, 4)  # (g, r, b, h, k, i)
    lanes = bits.transpose(0, 2, 4, 3, 1, 5).reshape(g, nb, 8, 64)  # (g, b, 2k + h, 4r + i)
    return np.packbits(lanes, axis=-1, bitorder="little").reshape(g, nb, HI_BYTES)


def pack(u: np.ndarray, d: np.ndarray, m: np.ndarray, layout: int) -> np.ndarray:
    """`u (n_out, n_in)`, `d, m (n_out, nb)` -> the flat uint8 group stream (module docstring)."""
    n_out, n_in = u.shape
    blk = LAYOUT_BLK[layout]
    nb = n_in // blk
    n_groups = -(-n_out // GROUP)
    if layout == LAYOUT_BYTE32 and not np.array_equal(m, BYTE32_M * d):
        raise ValueError("the byte layout stores no m: it must be -128 d")
    pad = n_groups * GROUP - n_out
    if pad:  # zero rows: u = d = m = 0 contribute nothing
        u = np.concatenate([u, np.zeros((pad, n_in), u.dtype)])
        d = np.concatenate([d, np.zeros((pad, nb), d.dtype)])
        m = np.concatenate([m, np.zeros((pad, nb), m.dtype)])
    u = u.reshape(n_groups, GROUP, nb, blk)  # (g, r, b, e)
    parts = []  # of each record, (g, b, bytes)
    if is_nibble(layout):
        low = u & np.uint8(0x0F)
        q = low[..., :16] | (low[..., 16:] << 4)  # (g, r, b, 16): element e and e+16 in one byte
    else:
        q = u
    chunks = q.reshape(n_groups, GROUP, nb, -1, 4).transpose(0, 2, 3, 1, 4)  # (g, b, k, r, 4)
    parts.append(chunks.reshape(n_groups, nb, -1))
    if layout == LAYOUT_NIBBLE32_HI:
        parts.append(_hi_plane(u))
    d16 = _to_f16(d).reshape(n_groups, GROUP, nb).transpose(0, 2, 1)  # (g, b, r)
    parts.append(np.ascontiguousarray(d16).view(np.uint8))  # (g, b, 32)
    if layout != LAYOUT_BYTE32:
        m16 = _to_f16(m).reshape(n_groups, GROUP, nb).transpose(0, 2, 1)
        parts.append(np.ascontiguousarray(m16).view(np.uint8))
    records = np.concatenate(parts, axis=2)  # (g, b, record bytes)
    assert records.shape[2] == record_bytes(layout)
    return np.ascontiguousarray(records).reshape(-1)


def repack(raw: np.ndarray, qtype, shape: tuple) -> PackedWeight:
    """GGUF tensor bytes -> PackedWeight. Formats without a fast layout become dense float32."""
    qtype = Q(qtype)
    n_out, n_in = (1, shape[0]) if len(shape) == 1 else shape
    raw = np.asarray(raw).view(np.uint8)
    if qtype in SPLIT:
        u, d, m, layout = decompose(raw, qtype, (n_out, n_in))
        try:
            data = pack(u, d, m, layout)
            return PackedWeight(qtype, n_out, n_in, layout, data=data)
        except OverflowError:
            pass  # rare K-quant scales beyond float16: fall through to the dense path
    dense = dequantize(raw, qtype, (n_out, n_in))
    return PackedWeight(qtype, n_out, n_in, dense=np.ascontiguousarray(dense))


def unpack_ref(w: PackedWeight) -> np.ndarray:
    """The float32 `(n_out, n_in)` matrix a PackedWeight stands for (inverse of `pack`)."""
    if w.data is None:
        return w.dense
    blk, nb, G = w.blk, w.n_in // w.blk, w.n_groups
    recs = w.data.reshape(G, nb, w.block_bytes)  # (g, b, record)
    n_quant = quant_bytes(w.layout)
    quant, scales = recs[..., :n_quant], recs[..., n_quant:]
    if w.layout == LAYOUT_NIBBLE32_HI:
        quant, hi = quant[..., :-HI_BYTES], quant[..., -HI_BYTES:]
    q = quant.reshape(G, nb, -1, GROUP, 4).transpose(0, 3, 1, 2, 4).reshape(G, GROUP, nb, -1)
    if is_nibble(w.layout):
        q = np.concatenate([q & 0x0F, q >> 4], axis=-1)  # (g, r, b, 32)
    if w.layout == LAYOUT_NIBBLE32_HI:
        lanes = np.unpackbits(hi.reshape(G, nb, 8, 8), axis=-1, bitorder="little")
        bits = lanes.reshape(G, nb, 4, 2, GROUP, 4).transpose(0, 4, 1, 3, 2, 5)  # (g,r,b,h,k,i)
        q = q | (bits.reshape(G, GROUP, nb, 32) << 4)
    hs = scales.copy().view(np.float16).astype(np.float32).reshape(G, nb, -1, GROUP)
    d = hs[:, :, 0].transpose(0, 2, 1)[..., None]  # (g, r, b, 1)
    m = BYTE32_M * d if w.layout == LAYOUT_BYTE32 else hs[:, :, 1].transpose(0, 2, 1)[..., None]
    W = d * q.astype(np.float32) + m  # (g, r, b, blk)
    return W.reshape(G * GROUP, nb * blk)[: w.n_out]
