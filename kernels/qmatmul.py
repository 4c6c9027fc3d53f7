"""Quantized linear layers: `y = x @ W.T` with W in the packed layout of `kernels.qpack`.

Activations are quantized to 8 bits per block of 32 (llama.cpp's Q8_1 idea) so the dot product
runs on integers:

    xd[t, j]  = max |x[t, 32j : 32j+32]| / 127           float32 scale per 32 activations
    xq[t, e]  = round(x[t, e] / xd[t, e // 32])          int8 in [-127, 127]
    xs[t, i]  = xd[t, i // 2] * sum(xq[t, 16i : 16i+16]) float32 sum per 16 (for the offsets m)

The integer maths is exact; the only error against the float product `x @ W.T` is the rounding
of the activations, at most `xd / 2` per element, so for every output

    |y[t, r] - (x @ W.T)[t, r]| <= sum_e |W[r, e]| * xd[t, e // 32] / 2

which is typically ~0.5 % of `|W| @ |x|` (as in llama.cpp). The tests assert this bound.

Paths (chosen by `isa`, default `kernels.jit.ISA`): `vnni` (AVX-512 VNNI, `kernels.vnni`;
`vnni-serial` runs it on one thread, chosen by default for small products), `generic` and
`avx2` (plain Numba integer loops over the same layout, portable and slow).
Dense float weights (F32, F16 and formats without a packed layout) use NumPy's BLAS matmul.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kernels import jit
from kernels.qpack import LAYOUT_BYTE16, LAYOUT_NIBBLE32, PackedWeight, unpack_ref

GROUP = 16

# --- activation quantization ---------------------------------------------------------------------


def quantize_activations_ref(x: np.ndarray):
    """x (n, n_in) float32 -> xq (n, n_in) int8, xd (n, n_in/32), xs (n, n_in/16) float32."""
    n, n_in = x.shape
    blocks = x.reshape(n, n_in // 32, 32)
    xd = np.abs(blocks).max(axis=2) / np.float32(127)  # (n, nb)
    inv = np.divide(1, xd, out=np.zeros_like(xd), where=xd > 0)
    xq = np.rint(blocks * inv[..., None]).astype(np.int8)  # (n, nb, 32)
    sums = xq.reshape(n, n_in // 16, 16).sum(axis=2, dtype=np.int32)  # (n, n_in/16)
    xs = np.repeat(xd, 2, axis=1) * sums.astype(np.float32)
    return xq.reshape(n, n_in), xd.astype(np.float32), xs.astype(np.float32)


@jit.njit
def quantize_activations(x, xq, xd, xs):
    """Numba twin of `quantize_activations_ref`, writing into xq, xd, xs."""
    n, n_in = x.shape
    for t in range(n):
        for j in range(n_in // 32):
            amax = np.float32(0.0)
            for e in range(32 * j, 32 * j + 32):
                amax = max(amax, abs(x[t, e]))
            d = amax / np.float32(127)
            inv = np.float32(1) / d if d > 0 else np.float32(0)
            xd[t, j] = d
            for h in range(2):
                s = 0
                for e in range(32 * j + 16 * h, 32 * j + 16 * h + 16):
                    q = np.int32(np.rint(x[t, e] * inv))
                    xq[t, e] = q
                    s += q
                xs[t, 2 * j + h] = d * np.float32(s)


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
    n_tok, n_in = xq.shape
    blk = 16 if layout == LAYOUT_BYTE16 else 32
    nibble = layout == LAYOUT_NIBBLE32
    n_chunks = blk // 4 // (2 if nibble else 1)
    nb = n_in // blk
    n_groups = (n_out + GROUP - 1) // GROUP
    for g in prange(n_groups):
        acc = np.zeros((n_tok, GROUP), np.float32)
        isum = np.zeros(GROUP, np.int32)
        for b in range(nb):
            base = (g * nb + b) * block_bytes
            sbase = base + 64 * n_chunks
            e0 = b * blk
            for t in range(n_tok):
                isum[:] = 0
                for k in range(n_chunks):
                    for r in range(GROUP):
                        for i in range(4):
                            byte = np.int32(w[base + 64 * k + 4 * r + i])
                            if nibble:
                                isum[r] += (byte & 15) * np.int32(xq[t, e0 + 4 * k + i])
                                isum[r] += (byte >> 4) * np.int32(xq[t, e0 + 16 + 4 * k + i])
                            else:
                                isum[r] += byte * np.int32(xq[t, e0 + 4 * k + i])
                xd_t = xd[t, e0 // 32]
                xsum = xs[t, e0 // 16] + (xs[t, e0 // 16 + 1] if blk == 32 else np.float32(0))
                for r in range(GROUP):
                    d = _half(w[sbase + 2 * r], w[sbase + 2 * r + 1])
                    m = _half(w[sbase + 32 + 2 * r], w[sbase + 33 + 2 * r])
                    acc[t, r] += d * xd_t * np.float32(isum[r]) + m * xsum
        for t in range(n_tok):
            for r in range(min(GROUP, n_out - g * GROUP)):
                out[t, g * GROUP + r] = acc[t, r]


# --- public entry points -------------------------------------------------------------------------


def matmul_ref(x: np.ndarray, w: PackedWeight) -> np.ndarray:
    """x (n, n_in) float32 -> (n, n_out): the float product with x rounded as the kernels do."""
    if w.data is None:
        return x @ w.dense.T
    xq, xd, _ = quantize_activations_ref(x)
    x_used = xq.astype(np.float32) * np.repeat(xd, 32, axis=1)  # (n, n_in) dequantized x
    return x_used @ unpack_ref(w).T


def matmul(x: np.ndarray, w: PackedWeight, out: np.ndarray | None = None, isa: str | None = None):
    """Prefill: x (n, n_in) float32 -> out (n, n_out) float32 = x @ W.T (activations 8-bit)."""
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    n, n_in = x.shape
    if out is None:
        out = np.empty((n, w.n_out), np.float32)
    if w.data is None:  # dense float weights: BLAS
        return np.matmul(x, w.dense.T, out=out)
    xq = np.empty((n, n_in), np.int8)
    xd = np.empty((n, n_in // 32), np.float32)
    xs = np.empty((n, n_in // 16), np.float32)
    quantize_activations(x, xq, xd, xs)
    if isa is None:
        isa = jit.ISA
        if isa == "vnni" and n * w.data.size < SERIAL_BYTES:
            isa = "vnni-serial"
    kernel = _KERNELS.get(isa) or _load_kernel(isa)
    kernel(w.data, w.layout, w.block_bytes, xq, xd, xs, w.n_out, out)
    return out


def matvec(x: np.ndarray, w: PackedWeight, out: np.ndarray | None = None, isa: str | None = None):
    """Decode: x (n_in,) float32 -> out (n_out,) float32 = W @ x."""
    res = matmul(x.reshape(1, -1), w, None if out is None else out.reshape(1, -1), isa)
    return res.reshape(-1)


# Below this many (weight bytes x tokens) one thread beats waking the others.
SERIAL_BYTES = 96 * 1024
_KERNELS = {"generic": qmatmul_generic, "avx2": qmatmul_generic}


def _load_kernel(isa: str):
    """The VNNI module is imported on first use (its intrinsics only compile on such CPUs)."""
    if isa not in ("vnni", "vnni-serial"):
        raise ValueError(f"unknown isa {isa!r}")
    from kernels.vnni import qmatmul_vnni, qmatmul_vnni_serial

    _KERNELS.update({"vnni": qmatmul_vnni, "vnni-serial": qmatmul_vnni_serial})
    return _KERNELS[isa]
