"""The bytes of `kernels.qpack`'s block records, read back by hand from the module docstring.

test_qmatmul.py holds every format's `unpack_ref` and kernels to the dequantized GGUF weights;
here the records themselves: their sizes, the 5th-bit plane of the 5-bit formats bit by bit
(the lane order the VNNI kernel takes its <64 x i1> masks in), and the byte layout's implied m.
"""

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kernels import jit, qmatmul
from kernels.qpack import (
    GROUP,
    HI_BYTES,
    LAYOUT_BYTE32,
    LAYOUT_NIBBLE32_HI,
    SPLIT,
    decompose,
    pack,
    quant_bytes,
    repack,
    unpack_ref,
)
from kernels.testing import random_tensor

FIVE_BIT = [Q.Q5_0, Q.Q5_1, Q.Q5_K]
ISAS = ["generic"] + (["vnni", "vnni-serial"] if jit.HAS_INT8_DOT else [])

# bytes a weight, scales included, as the module docstring's table has them
BYTES_PER_WEIGHT = {Q.Q4_0: 0.625, Q.Q4_1: 0.625, Q.Q4_K: 0.625, Q.Q5_0: 0.75, Q.Q5_1: 0.75,
                    Q.Q5_K: 0.75, Q.Q8_0: 1.0625, Q.Q6_K: 1.25, Q.Q3_K: 1.25, Q.Q2_K: 1.25}


def oracle(raw, qtype, shape):
    return dequantize(raw, qtype).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("qtype", list(SPLIT), ids=lambda q: q.name)
def test_record_sizes(qtype):
    shape = (64, 512)
    w = repack(random_tensor(qtype, shape), qtype, shape)
    assert w.nbytes == w.n_groups * (w.n_in // w.blk) * w.block_bytes
    assert w.nbytes / (shape[0] * shape[1]) == BYTES_PER_WEIGHT[qtype]
    if qtype in FIVE_BIT:  # 256 nibble bytes, 64 of 5th bits, 16 d and 16 m
        assert w.layout == LAYOUT_NIBBLE32_HI and w.block_bytes == 384
    if qtype == Q.Q8_0:  # 512 quant bytes, 16 d and no m
        assert w.layout == LAYOUT_BYTE32 and w.block_bytes == 544


@pytest.mark.parametrize("qtype", FIVE_BIT, ids=lambda q: q.name)
def test_fifth_bit_plane(qtype):
    """Bit j of uint64 2k + h of a record's plane is bit 4 of u[r, 16h + 4k + i], j = 4r + i;
    the nibbles before it are the low 4 bits as in the 4-bit layout."""
    shape = (37, 256)  # 37 rows: the padded last group has zero bits
    raw = random_tensor(qtype, shape, seed=5)
    u, *_ = decompose(raw, qtype, shape)
    w = repack(raw, qtype, shape)
    nb = shape[1] // 32
    recs = w.data.reshape(w.n_groups, nb, w.block_bytes)
    n_nib = quant_bytes(w.layout) - HI_BYTES
    planes = np.ascontiguousarray(recs[:, :, n_nib:n_nib + HI_BYTES]).view("<u8")  # (g, b, 8)
    nibbles = recs[:, :, :n_nib]
    for g in range(w.n_groups):
        for b in range(nb):
            for k in range(4):
                for h in range(2):
                    word = int(planes[g, b, 2 * k + h])
                    for r in range(GROUP):
                        row = g * GROUP + r
                        for i in range(4):
                            e = 32 * b + 16 * h + 4 * k + i
                            want = int(u[row, e]) if row < shape[0] else 0
                            assert (word >> (4 * r + i)) & 1 == want >> 4
                            byte = int(nibbles[g, b, 64 * k + 4 * r + i])
                            assert (byte >> (4 * h)) & 15 == want & 15


@pytest.mark.parametrize("fill", [0x00, 0xFF], ids=["no-5th-bits", "all-5th-bits"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", FIVE_BIT, ids=lambda q: q.name)
def test_extreme_quants(qtype, isa, fill):
    """Every quant byte of the file 0x00 or 0xFF: u = 0 or 31 in every lane, bit 63 of each
    mask word included; unpack_ref and the kernels still give the dequantized product."""
    shape = (32, 256)
    raw = random_tensor(qtype, shape, seed=2).reshape(-1, GGML_QUANT_SIZES[qtype][1]).copy()
    scales = {Q.Q5_0: slice(0, 2), Q.Q5_1: slice(0, 4), Q.Q5_K: slice(0, 16)}[qtype]
    keep = raw[:, scales].copy()
    raw[:] = fill
    raw[:, scales] = keep
    raw = raw.reshape(-1)
    W = oracle(raw, qtype, shape)
    w = repack(raw, qtype, shape)
    tol = 2.0**-10 * np.abs(W).max() if qtype == Q.Q5_K else 0  # float16 d * sc
    np.testing.assert_allclose(unpack_ref(w), W, rtol=0, atol=tol)
    x = np.random.default_rng(0).standard_normal((5, shape[1])).astype(np.float32)
    got = qmatmul.matmul(x, w, isa=isa, terms=3)
    scale = np.abs(x) @ np.abs(W).T
    bound = (2.0**-10 if qtype == Q.Q5_K else 1e-6) * scale
    np.testing.assert_array_less(np.abs(got - x.astype(np.float64) @ W.T), bound)


def test_byte_layout_stores_no_m():
    """Q8_0's m = -128 d is implied; an m the byte layout cannot represent is refused."""
    shape = (16, 64)
    u, d, m, layout = decompose(random_tensor(Q.Q8_0, shape), Q.Q8_0, shape)
    assert layout == LAYOUT_BYTE32
    data = pack(u, d, m, layout)
    assert data.size == 2 * (64 * 32 // 4 + 2 * GROUP)  # two records of quants and d only
    with pytest.raises(ValueError, match="-128 d"):
        pack(u, d, m + d, layout)
