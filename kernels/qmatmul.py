"""Quantized linear layers: `y = x @ W.T` with W in the packed layout of `kernels.qpack`.

Activations are quantized per block of 32 (llama.cpp's Q8_1 idea) so the dot product runs on
integers. With one term (`terms=1`, llama.cpp's rounding):

    xd[t, j]  = max |x[t, 32j : 32j+32]| / 127           float32 scale per 32 activations
    xq[t, e]  = round(x[t, e] / xd[t, e // 32])          int8 in [-127, 127]
    xs[t, i]  = xd[t, i // 2] * sum(xq[t, 16i : 16i+16]) float32 sum per 16 (for the offsets m)

With two terms (`terms=2`, the default) x is rounded to 15 bits instead, in steps of xd / 128,
and that integer is split into a high and a low byte, each run through the int8 kernel:

    xu[t, e]  = round(128 x[t, e] / xd[t, e // 32])      |xu| <= 127 * 128
    xu = 128 q1 + q2,  q1 = round_half_up(xu / 128) in [-127, 127],  q2 in [-64, 63]
    x^ = xd / 128 * xu                                   the activations the kernel sees

Rows t of `xq` hold q1 and rows n + t hold q2; `xs` sums x^. The kernels add
`128 * sum(u q1) + sum(u q2)` exactly in int32, so each weight load serves both bytes and only
the integer work doubles (decode is bound by weight bandwidth, so it barely notices).

With three terms (`terms=3`, `EXACT_TERMS`: what a traced pass uses, see "exact products"
below) x is rounded to 22 bits, in steps of xd / 128^2, split the same way into three bytes:

    xu = 128^2 q1 + 128 q2 + q3,  q1 in [-127, 127], q2 in [-64, 64], q3 in [-64, 63]
    x^ = xd / 128 * (128 q1 + q2) + xd / 128^2 * q3

Rows 2n + t hold q3. Another `<< 7` of the first two terms' int32 sum would overflow (it is up
to 2^28 per block), so the third term's sum stays a separate int32 and is added in float32 at
its own scale, xd / 128^2.

The integer maths is exact; the only error against the float product `x @ W.T` is the rounding
of the activations, at most `xd / 2` per element with one term, `xd / 256` with two and
`xd / 32768` with three, so for every output

    |y[t, r] - (x @ W.T)[t, r]| <= sum_e |W[r, e]| * xd[t, e // 32] / (2, 256 or 32768)

(plus float32 rounding, which with three terms is as large: x / xd and xd * xu each round by
up to 1/8 of a step): typically ~0.5 % of `|W| @ |x|` with one term (as in llama.cpp), ~0.004 %
with two and ~1e-7 with three, a float32 product. The tests assert this bound.

Exact products (traced passes, `matmul_exact`): three terms leave the weights as the only
difference from the reference backend's float32 product, and for the K-quants (d = d_super * sc)
those differ too, as `kernels.qpack` rounds d and m to float16 (relative 2^-12, which on Gemma 3
moves the attention weights by 1.4e-3). `scale_residual` packs what that rounding left out,
`2^k (d - f16(d))` and `2^k (m - f16(m))` over the same quants u (2^k keeps the small residuals
in float16's normal range), and `matmul_exact` adds `2^-k x @ R.T`: W = W16 + 2^-k R to within
2^-11 of a residual, float32-like. It costs a second product and, for K-quant matrices, a second
copy of their packed bytes (built on first use).

Paths (chosen by `isa`, default `kernels.jit.ISA`): `vnni` (AVX-512 VNNI or AVX2, `kernels.vnni`;
`vnni-serial` runs it on one thread, chosen by default for small products) and `generic` (plain
Numba integer loops over the same layout, portable and slow).
Dense float weights (F32, F16 and formats without a packed layout) use NumPy's BLAS matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import prange

from kernels import jit
from kernels.qpack import (
    BYTE32_M,
    GROUP,
    LAYOUT_BLK,
    LAYOUT_BYTE32,
    LAYOUT_NIBBLE32,
    LAYOUT_NIBBLE32_HI,
    LAYOUT_SCALE_BYTES,
    PackedWeight,
    decompose,
    pack,
    unpack_ref,
)

TERMS = 2  # activation terms per block by default (see the module docstring)
EXACT_TERMS = 3  # what `matmul_exact` (traced passes) uses
FINE_BITS = 7
FINE = 1 << FINE_BITS  # each term after the first counts in units FINE times finer


def _split_terms(units: np.ndarray, terms: int) -> list[np.ndarray]:
    """Integers in units of xd / FINE^(terms-1) -> the terms' bytes, high first: each but the
    last rounded half up (so |q1| <= 127 and later terms lie in [-FINE/2, FINE/2])."""
    qs = []
    for k in range(terms - 1, 0, -1):
        bits = FINE_BITS * k
        q = (units + (1 << (bits - 1))) >> bits
        qs.append(q)
        units = units - (q << bits)
    return qs + [units]

# --- activation quantization ---------------------------------------------------------------------


def quantize_activations_ref(x: np.ndarray, terms: int = 1):
    """x (n, n_in) float32 -> xq (terms*n, n_in) int8, xd (n, n_in/32), xs (n, n_in/16) float32.

    Rows t of xq hold q1, rows n+t (terms >= 2) q2, rows 2n+t (terms=3) q3 (module
    docstring); xs is the sum per 16 of the activations the kernels see
    (`dequantize_activations_ref`).
    """
    n, n_in = x.shape
    blocks = x.reshape(n, n_in // 32, 32)
    xd = np.abs(blocks).max(axis=2) / np.float32(127)  # (n, nb)
    inv = np.divide(1, xd, out=np.zeros_like(xd), where=xd > 0)
    s = blocks * inv[..., None]  # (n, nb, 32) x in units of xd
    fine = FINE ** (terms - 1)  # x in units of xd / fine: 8, 15 or 22 bits
    units = np.rint(s * np.float32(fine)).astype(np.int32)  # (n, nb, 32)
    xq = np.concatenate([q.astype(np.int8).reshape(n, n_in) for q in _split_terms(units, terms)])
    sums = units.reshape(n, n_in // 16, 16).sum(axis=2)  # (n, n_in/16)
    xs = np.repeat(xd, 2, axis=1) * (sums.astype(np.float32) * np.float32(1 / fine))
    return xq, xd.astype(np.float32), xs.astype(np.float32)


def dequantize_activations_ref(xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """The activations x^ (n, n_in) float32 the kernels see: xd * (q1 + q2 / FINE + ...)."""
    n = xd.shape[0]
    units = xq[:n].astype(np.float32)
    for k in range(1, xq.shape[0] // n):
        units += xq[k * n:(k + 1) * n].astype(np.float32) / np.float32(FINE**k)
    return units * np.repeat(xd, 32, axis=1)


# 1.5 * 2^23: (v + MAGIC) - MAGIC rounds v to the nearest integer (ties to even) for |v| < 2^22,
# as np.rint does, without a libm call; valid only without fastmath (which would cancel it).
MAGIC = np.float32(12582912.0)


# The float32 bits of MAGIC + k are ROUNDED_BITS + k for |k| < 2^22: rounding by MAGIC and
# reading the integer from the bits needs no float-to-int conversion (which stays scalar).
ROUNDED_BITS = np.int32(0x4B400000)


@jit.njit_strict(error_model="numpy")
def _quantize_rows(x, xq, xd, xs, t_lo, t_hi):
    """Tokens t_lo..t_hi-1 of `quantize_activations`, in passes simple enough to vectorize
    (inner loops over one block; the bits of x through a view of the 2-D array, whose rows
    LLVM knows to be contiguous). The block length `b32` = 32 is computed at run time: with a
    literal 32 LLVM unrolled the per-block loops fully, and its straight-line vectorizer cannot
    check that x and units do not overlap, so they ran scalar (the whole quantizer ~2x slower,
    ~8 % of a Gemma-3 prefill)."""
    n, n_in = x.shape
    nb = n_in // 32
    b32 = n_in // nb  # 32, unknown to LLVM (see above)
    terms = xq.shape[0] // n
    mult = np.float32(FINE ** (terms - 1))
    unit = np.float32(1) / mult
    units = np.empty(n_in, np.int32)  # x in units of xd / FINE^(terms-1)
    rounded = units.view(np.float32)  # the same memory: MAGIC + units, as float32
    amax = np.empty(nb, np.int32)  # max |x| per block as float32 bits (they sort as the floats)
    amax_f = amax.view(np.float32)
    bits = x.view(np.int32)
    for t in range(t_lo, t_hi):
        xd_t, xs_t = xd[t], xs[t]
        for j in range(nb):
            m = np.int32(0)
            for e in range(b32):
                m = max(m, bits[t, b32 * j + e] & np.int32(0x7FFFFFFF))
            amax[j] = m
        for j in range(nb):
            d = amax_f[j] / np.float32(127)
            s = (np.float32(1) / d if d > 0 else np.float32(0)) * mult
            xd_t[j] = d
            for e in range(b32):
                rounded[b32 * j + e] = x[t, b32 * j + e] * s + MAGIC
        for e in range(n_in):
            units[e] -= ROUNDED_BITS
        for i in range(n_in // 16):
            total = np.int32(0)
            for e in range(16 * i, 16 * i + 16):
                total += units[e]
            xs_t[i] = xd_t[i // 2] * (np.float32(total) * unit)
        q1 = xq[t]
        if terms == 2:  # units = FINE * q1 + q2, q1 rounded half up
            q2 = xq[n + t]
            for e in range(n_in):
                u = units[e]
                q = (u + np.int32(FINE // 2)) >> np.int32(FINE_BITS)
                q1[e] = q
                q2[e] = u - q * np.int32(FINE)
        elif terms == 3:  # units = FINE^2 q1 + FINE q2 + q3 (`_split_terms`)
            q2, q3 = xq[n + t], xq[2 * n + t]
            for e in range(n_in):
                u = units[e]
                q = (u + np.int32(FINE * FINE // 2)) >> np.int32(2 * FINE_BITS)
                q1[e] = q
                u -= q * np.int32(FINE * FINE)
                q = (u + np.int32(FINE // 2)) >> np.int32(FINE_BITS)
                q2[e] = q
                q3[e] = u - q * np.int32(FINE)
        else:
            for e in range(n_in):
                q1[e] = units[e]


@jit.njit_strict
def quantize_activations(x, xq, xd, xs):
    """Numba twin of `quantize_activations_ref`, writing into xq, xd, xs; the number of terms
    is xq.shape[0] // x.shape[0] (1, 2 or 3). Strict float maths: the rounding must match."""
    _quantize_rows(x, xq, xd, xs, 0, x.shape[0])


@jit.pnjit_strict
def quantize_activations_parallel(x, xq, xd, xs):
    """`quantize_activations` on all threads, 16 tokens per task (prefill)."""
    n = x.shape[0]
    for c in prange((n + 15) // 16):
        _quantize_rows(x, xq, xd, xs, 16 * c, min(n, 16 * c + 16))


PARALLEL_ROWS = 32  # from this many tokens on, quantize them on all threads


@jit.njit_strict(inline="always")
def quantize_activations_auto(x, xq, xd, xs):
    """`quantize_activations`, on all threads for PARALLEL_ROWS tokens or more (its prange
    runs in parallel where a parallel function inlines it, e.g. `kernels.vnni.linear`). Only
    the loop is inlined: the rounding stays in `_quantize_rows`, compiled strict."""
    n = x.shape[0]
    if n >= PARALLEL_ROWS:
        for c in prange((n + 15) // 16):
            _quantize_rows(x, xq, xd, xs, 16 * c, min(n, 16 * c + 16))
    else:
        _quantize_rows(x, xq, xd, xs, 0, n)


# --- portable fallback over the packed layout ----------------------------------------------------


@jit.njit
def _half(lo, hi):
    """float16 stored as two little-endian bytes -> float32 (Numba has no CPU float16)."""
    bits = np.int32(lo) | (np.int32(hi) << 8)
    exp, frac = (bits >> 10) & 0x1F, bits & 0x3FF
    if exp == 0:
        v = math.ldexp(np.float64(frac), -24)
    elif exp == 31:
        v = np.inf if frac == 0 else np.nan
    else:
        v = math.ldexp(np.float64(frac | 0x400), exp - 25)
    return np.float32(-v if bits & 0x8000 else v)


@jit.pnjit
def qmatmul_generic(w, layout, block_bytes, xq, xd, xs, n_out, out):
    """Same contract as `kernels.vnni.qmatmul_vnni`, in plain Numba: one group per iteration."""
    n_tok, n_x32 = xd.shape
    n_in = n_x32 * 32
    terms = xq.shape[0] // n_tok
    unit = np.float32(1.0 / FINE) if terms >= 2 else np.float32(1)  # of the first two terms
    blk = LAYOUT_BLK[layout]
    hi = layout == LAYOUT_NIBBLE32_HI
    nibble = layout == LAYOUT_NIBBLE32 or hi
    n_chunks = blk // 8 if nibble else blk // 4  # 64-byte chunks of quants per block
    sbase0 = block_bytes - LAYOUT_SCALE_BYTES[layout]  # the scales' offset in a record
    nb = n_in // blk
    n_groups = (n_out + GROUP - 1) // GROUP
    for g in prange(n_groups):
        acc = np.zeros((n_tok, GROUP), np.float32)
        isum = np.zeros(GROUP, np.int32)
        isum_lo = np.zeros(GROUP, np.int32)  # the third term's, at scale xd / FINE^2
        for b in range(nb):
            base = (g * nb + b) * block_bytes
            sbase = base + sbase0
            e0 = b * blk
            for t in range(n_tok):
                isum[:] = 0
                isum_lo[:] = 0
                for term in range(terms):  # sum_e u * (q1 * FINE + q2), exact in int32
                    row = term * n_tok + t
                    into = isum_lo if term == 2 else isum  # the third: its own sum
                    if term == 1:
                        for r in range(GROUP):
                            isum[r] *= FINE
                    for k in range(n_chunks):
                        for r in range(GROUP):
                            for i in range(4):
                                byte = np.int32(w[base + 64 * k + 4 * r + i])
                                if nibble:
                                    into[r] += (byte & 15) * np.int32(xq[row, e0 + 4 * k + i])
                                    into[r] += (byte >> 4) * np.int32(xq[row, e0 + 16 + 4 * k + i])
                                else:
                                    into[r] += byte * np.int32(xq[row, e0 + 4 * k + i])
                    if hi:  # u += 16 where the 5th bit is set: bit 4r + i of uint64 2k + h
                        for v in range(2 * n_chunks):
                            plane = base + 64 * n_chunks + 8 * v
                            e = e0 + 16 * (v % 2) + 4 * (v // 2)  # element of lane 0
                            for r in range(GROUP):
                                for i in range(4):
                                    lane = 4 * r + i
                                    bit = (np.int32(w[plane + lane // 8]) >> (lane % 8)) & 1
                                    into[r] += (bit << 4) * np.int32(xq[row, e + i])
                xd_t = xd[t, e0 // 32] * unit
                xsum = xs[t, e0 // 16] + (xs[t, e0 // 16 + 1] if blk == 32 else np.float32(0))
                for r in range(GROUP):
                    d = _half(w[sbase + 2 * r], w[sbase + 2 * r + 1])
                    if layout == LAYOUT_BYTE32:  # m implied (kernels.qpack)
                        m = d * np.float32(BYTE32_M)
                    else:
                        m = _half(w[sbase + 32 + 2 * r], w[sbase + 33 + 2 * r])
                    acc[t, r] += d * xd_t * np.float32(isum[r]) + m * xsum
                    if terms == 3:
                        acc[t, r] += d * (xd_t * unit) * np.float32(isum_lo[r])
        for t in range(n_tok):
            for r in range(min(GROUP, n_out - g * GROUP)):
                out[t, g * GROUP + r] = acc[t, r]


# --- public entry points -------------------------------------------------------------------------


def matmul_ref(x: np.ndarray, w: PackedWeight, terms: int = TERMS) -> np.ndarray:
    """x (n, n_in) float32 -> (n, n_out): the float product with x rounded as the kernels do."""
    if w.data is None:
        return x @ w.dense.T
    xq, xd, _ = quantize_activations_ref(x, terms)
    return dequantize_activations_ref(xq, xd) @ unpack_ref(w).T


def matmul(x: np.ndarray, w: PackedWeight, out: np.ndarray | None = None, isa: str | None = None,
           terms: int = TERMS):
    """x (n, n_in) float32 -> out (n, n_out) float32 = x @ W.T, activations rounded to
    `terms` (1, 2 or 3) 8-bit terms per block of 32 (error bound: module docstring)."""
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    n, n_in = x.shape
    if out is None:
        out = np.empty((n, w.n_out), np.float32)
    if w.data is None:  # dense float weights: BLAS
        return np.matmul(x, w.dense.T, out=out)
    if terms not in (1, 2, 3):
        raise ValueError(f"terms must be 1, 2 or 3, not {terms}")
    if isa is None:
        isa = jit.ISA
        if isa == "vnni":  # quantize + the kernel on as many threads as pay, in one call
            _load_kernel("vnni")
            _KERNELS["linear"](x, w.data, w.layout, w.block_bytes, w.n_out, terms, out)
            return out
    xq = np.empty((terms * n, n_in), np.int8)  # term k of token t is row k*n + t
    xd = np.empty((n, n_in // 32), np.float32)
    xs = np.empty((n, n_in // 16), np.float32)
    (quantize_activations_parallel if n >= PARALLEL_ROWS else quantize_activations)(x, xq, xd, xs)
    kernel = _KERNELS.get(isa) or _load_kernel(isa)
    kernel(w.data, w.layout, w.block_bytes, xq, xd, xs, w.n_out, out)
    return out


def matvec(x: np.ndarray, w: PackedWeight, out: np.ndarray | None = None, isa: str | None = None,
           terms: int = TERMS):
    """Decode: x (n_in,) float32 -> out (n_out,) float32 = W @ x."""
    res = matmul(x.reshape(1, -1), w, None if out is None else out.reshape(1, -1), isa, terms)
    return res.reshape(-1)


# --- exact products (traced passes) ---------------------------------------------------------------

RESIDUAL_PEAK = 2.0**14  # the largest residual scale, once scaled by 2^k (float16 max: 65504)


@dataclass
class ScaleResidual:
    """What float16 block scales left out of a PackedWeight (module docstring): the same quants
    with scales 2^k (d - f16(d)) and 2^k (m - f16(m)); `unit` = 2^-k."""

    weight: PackedWeight
    unit: float


def scale_residual(w: PackedWeight, parts: list[tuple]) -> ScaleResidual | None:
    """The residual of `w`, packed from the GGUF tensors it was made of: `parts` is
    [(raw bytes, qtype, (n_out, n_in))], stacked row-wise as `w` is (one, or a fused q|k|v).
    None when the scales are exact in float16 already (every format but the K-quants)."""
    if w.data is None:
        return None
    split = [decompose(raw, qtype, shape) for raw, qtype, shape in parts]
    left = [(u, d - d.astype(np.float16), m - m.astype(np.float16), layout)
            for u, d, m, layout in split]  # exact in float32: d and f16(d) are that close
    peak = max(max(np.abs(dd).max(initial=0), np.abs(dm).max(initial=0)) for _, dd, dm, _ in left)
    if peak == 0:
        return None
    k = int(math.log2(RESIDUAL_PEAK)) - math.frexp(float(peak))[1]  # peak * 2^k < RESIDUAL_PEAK
    scale = np.float32(2.0**k)
    data = np.concatenate([pack(u, dd * scale, dm * scale, layout) for u, dd, dm, layout in left])
    assert data.size == w.data.size, "the parts must stack as the weight does"
    residual = PackedWeight(w.qtype, w.n_out, w.n_in, w.layout, data=data)
    return ScaleResidual(residual, 2.0**-k)


def matmul_exact(x: np.ndarray, w: PackedWeight, residual: ScaleResidual | None = None,
                 isa: str | None = None) -> np.ndarray:
    """x (n, n_in) -> (n, n_out) = x @ W.T within float32 rounding of the product of the exact
    GGUF weights: 22-bit activations (EXACT_TERMS), plus `residual`'s share (module docstring)."""
    y = matmul(x, w, isa=isa, terms=EXACT_TERMS)
    if residual is not None:
        y += np.float32(residual.unit) * matmul(x, residual.weight, isa=isa, terms=EXACT_TERMS)
    return y


# Below this many (weight bytes x tokens) one thread beats waking the others.
SERIAL_BYTES = 96 * 1024
_KERNELS = {"generic": qmatmul_generic}


def _load_kernel(isa: str):
    """The VNNI module is imported on first use (its intrinsics only compile on such CPUs)."""
    if isa not in ("vnni", "vnni-serial"):
        raise ValueError(f"unknown isa {isa!r}")
    from kernels.vnni import linear, qmatmul_vnni, qmatmul_vnni_serial

    _KERNELS.update({"vnni": qmatmul_vnni, "vnni-serial": qmatmul_vnni_serial, "linear": linear})
    return _KERNELS[isa]
