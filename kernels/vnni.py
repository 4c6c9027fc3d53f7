"""AVX-512 VNNI quantized matmul over the 16-row groups of `kernels.qpack`.

Numba has no vector types, so the inner loop over one group's blocks is written directly in LLVM
IR (llvmlite) inside a Numba `@intrinsic`; the outer loops (groups in parallel, token tiles) are
plain Numba in `qmatmul_vnni`. Per block of one group and one token:

    acc_i32[r] = sum_e u[r, e] * xq[e]             vpdpbusd: unsigned weight x signed activation
    acc_f32[r] += d[r] * xd * acc_i32[r] + m[r] * xsum

which is `sum_e (d u + m)[r, e] * (xd xq)[e]` exactly, with `xsum = xd * sum_e xq[e]`. The
5-bit layout (NIBBLE32_HI) ors each lane's 5th bit into its nibble first: the plane's uint64 is
bitcast to a <64 x i1> mask, a `select` of 16 or 0 (kmovq and a masked vmovdqu8, no scalar
loop); BYTE32 (Q8_0) stores no m and adds `d * (-128 xsum)` instead. With two
activation terms (`kernels.qmatmul`: x = xd / 128 * (128 q1 + q2)) the integer sum becomes
`(sum u q1) << 7 + sum u q2` (two independent vpdpbusd chains; |sum| < 2^28 per block, no
overflow) and the scale `xd / 128`, so only the integer work doubles. Three terms (traced
passes) add a third chain, kept as its own int32 sum (another << 7 would overflow) and added in
float32 at the scale `xd / 128^2`. A tile of `nt` tokens shares each 64-byte weight load.
Only call these when `jit.HAS_INT8_DOT`: AVX-512 VNNI, or AVX2, where `_Int8Dot` gets the
same integer sums from vpmaddubsw + vpmaddwd (Q8_0's as sums of q, see there).

The driver lives in this module too: Numba's `cache=True` would not notice an edit of the IR
generator if it sat in another file.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels import jit
from kernels.jit import njit, pnjit
from kernels.qmatmul import FINE_BITS, SERIAL_BYTES, quantize_activations_auto
from kernels.qpack import (
    BYTE32_M,
    GROUP,
    HI_BYTES,
    LAYOUT_BLK,
    LAYOUT_BYTE16,
    LAYOUT_BYTE32,
    LAYOUT_NIBBLE32,
    LAYOUT_NIBBLE32_HI,
    is_nibble,
    quant_bytes,
    record_bytes,
)

PREFETCH_BYTES = 4096  # how far ahead of the current block the weight stream is prefetched

_i8, _i32, _i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_f32x16 = ir.VectorType(ir.FloatType(), GROUP)
_i32x16 = ir.VectorType(_i32, GROUP)
_i8x64 = ir.VectorType(_i8, 64)
_f16x16 = ir.VectorType(ir.HalfType(), GROUP)


def _splat(builder, scalar, vec_type):
    """Broadcast a scalar to every lane of `vec_type`."""
    v = builder.insert_element(ir.Constant(vec_type, ir.Undefined), scalar, _i32(0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, vec_type.count), None))


def _ptr(builder, base, offset, pointee):
    """`(pointee*)(base + offset)` for an i8* base and an i64 byte offset."""
    return builder.bitcast(builder.gep(base, [offset]), pointee.as_pointer())


def _invariant(builder, load):
    """Mark a load as reading memory that does not change while the kernel runs, so that the
    register allocator may load it again rather than spill it."""
    load.set_metadata("invariant.load", builder.module.add_metadata([]))
    return load


# The largest |activation| of any term (kernels.qmatmul: the first term is within +-127, the
# finer ones within +-64) and the largest weight byte of each layout (Q8_0's: |q| <= 128):
# what bounds the int16 sums of the AVX2 dot product below.
X_PEAK = 127
_U_PEAK = {LAYOUT_NIBBLE32: 15, LAYOUT_NIBBLE32_HI: 31, LAYOUT_BYTE16: 63, LAYOUT_BYTE32: 128}


class _Int8Dot:
    """The integer sums `sum_{k<4} u[4r+k] * x[4r+k]` added to lane r of an int32 accumulator,
    for u (64 x uint8) weights and x (64 x int8) activations, on this CPU.

    With AVX-512 VNNI, `acc = add(acc, u, x)` is one vpdpbusd. On AVX2
    (`jit.INT8_DOT == "avx2"`) each 32-byte half takes vpmaddubsw (pairs of products summed to
    int16): `p = add(p, u, x)` from `zero16` is exact for up to `limit` parts (8 for 4-bit
    weights), then `acc = end(acc, p)` widens the sums with one vpmaddwd by ones (pairs of int16
    to int32). Q8_0's bytes (u = q + 128, up to 255) would saturate a pair: there `signed` is set
    and the sums are of q itself, as vpmaddubsw(|q|, x * sign(q)), so that the kernel leaves out
    its `m = -128 d` term (the same value, with less cancellation).
    """

    def __init__(self, builder, layout: int):
        self.builder = builder
        mod = builder.module
        self.vnni = jit.INT8_DOT == "vpdpbusd"
        self.signed = not self.vnni and layout == LAYOUT_BYTE32
        if self.vnni:
            self.limit = None  # no limit: vpdpbusd accumulates in int32
            self.vpdpbusd = cgutils.get_or_insert_function(
                mod, ir.FunctionType(_i32x16, [_i32x16, _i8x64, _i8x64]),
                "llvm.x86.avx512.vpdpbusd.512")
            return
        i8x32, i16x16 = ir.VectorType(_i8, 32), ir.VectorType(ir.IntType(16), 16)
        # a vpmaddubsw lane sums two products; int16 holds 32767
        self.limit = 32767 // (2 * _U_PEAK[layout] * X_PEAK)  # 8, 4, 2 and 1
        assert self.limit >= 1, "a single vpmaddubsw would saturate"
        self.maddubs = cgutils.get_or_insert_function(
            mod, ir.FunctionType(i16x16, [i8x32, i8x32]), "llvm.x86.avx2.pmadd.ub.sw")
        self.maddwd = cgutils.get_or_insert_function(
            mod, ir.FunctionType(ir.VectorType(_i32, 8), [i16x16, i16x16]),
            "llvm.x86.avx2.pmadd.wd")
        self.psign = cgutils.get_or_insert_function(
            mod, ir.FunctionType(i8x32, [i8x32, i8x32]), "llvm.x86.avx2.psign.b")
        self.ones = _splat(builder, ir.IntType(16)(1), i16x16)
        self.flip = _splat(builder, _i8(0x80), _i8x64)
        self.zero16 = ir.Constant(ir.VectorType(ir.IntType(16), 32), None)

    def _half(self, v, h):  # elements h*n/2 .. (h+1)*n/2 - 1 of v (n lanes)
        n = v.type.count // 2
        return self.builder.shuffle_vector(
            v, v, ir.Constant(ir.VectorType(_i32, n), list(range(h * n, h * n + n))))

    def _join(self, lo, hi):  # the two halves back as one vector
        n = lo.type.count * 2
        return self.builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_i32, n),
                                                               list(range(n))))

    def add(self, p, u, x):
        b = self.builder
        if self.vnni:
            return b.call(self.vpdpbusd, [p, u, x])
        if self.signed:  # q = u - 128 as int8: |q| (up to 128, unsigned) by x with q's sign
            q = b.xor(u, self.flip)
            u = b.select(b.icmp_signed("<", q, ir.Constant(q.type, None)), b.neg(q), q)
        halves = []
        for h in range(2):
            xh = self._half(x, h)
            if self.signed:
                xh = b.call(self.psign, [xh, self._half(q, h)])
            halves.append(b.call(self.maddubs, [self._half(u, h), xh]))
        return b.add(p, self._join(*halves))

    def end(self, acc, p):
        if self.vnni:
            return p
        b = self.builder
        quads = [b.call(self.maddwd, [self._half(p, h), self.ones]) for h in range(2)]
        return b.add(acc, self._join(*quads))


def _make_group_dot(layout: int, nt: int, terms: int, groups: int = 1):
    """An intrinsic computing `groups` x 16 output rows x `nt` tokens (see module doc).

    Call as `group_dot(w, w_off, xq, xd, xs, t0, n_in, q2_off, out, out_off, n_out, n_valid)`:
    w (uint8 flat) from byte w_off (the groups follow each other in the stream); xq int8
    (terms * n_tok, n_in), the second term's rows from element q2_off (the third's from
    2 * q2_off); xd float32
    (n_tok, n_in/32); xs float32 (n_tok, n_in/16); tokens t0..t0+nt-1; out float32 flat, rows
    of length n_out, written at out_off + t*n_out for the first n_valid of the groups * 16
    lanes.
    """
    blk = LAYOUT_BLK[layout]
    nibble = is_nibble(layout)
    hi_bits = layout == LAYOUT_NIBBLE32_HI  # 5th bits after the nibbles
    n_chunks = (quant_bytes(layout) - (HI_BYTES if hi_bits else 0)) // 64  # 64-byte quant loads
    block_bytes = record_bytes(layout)

    @intrinsic
    def group_dot(typingctx, w, w_off, xq, xd, xs, t0, n_in, q2_off, out, out_off, n_out,
                  n_valid):
        sig = types.void(w, w_off, xq, xd, xs, t0, n_in, q2_off, out, out_off, n_out, n_valid)

        def codegen(context, builder, signature, args):
            tys = signature.args
            w_, w_off_, xq_, xd_, xs_, t0_, n_in_, q2_off_, out_, out_off_, n_out_, n_valid_ = [
                context.cast(builder, a, ty, types.int64) if isinstance(ty, types.Integer) else a
                for a, ty in zip(args, tys, strict=True)
            ]

            def data(arr, ty, elem):
                p = context.make_array(ty)(context, builder, arr).data
                return builder.bitcast(p, elem.as_pointer())

            wp, xqp = data(w_, tys[0], _i8), data(xq_, tys[2], _i8)
            xdp, xsp = data(xd_, tys[3], ir.FloatType()), data(xs_, tys[4], ir.FloatType())
            outp = data(out_, tys[8], ir.FloatType())
            mod = builder.module
            dot = _Int8Dot(builder, layout)
            prefetch = cgutils.get_or_insert_function(
                mod,
                ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]),
                "llvm.prefetch.p0",
            )
            fma = cgutils.get_or_insert_function(
                mod, ir.FunctionType(_f32x16, [_f32x16] * 3), "llvm.fma.v16f32"
            )
            n_blocks = builder.sdiv(n_in_, _i64(blk))
            group_bytes = builder.mul(n_blocks, _i64(block_bytes))
            n_x32 = builder.sdiv(n_in_, _i64(32))
            n_x16 = builder.sdiv(n_in_, _i64(16))
            # accs[t][g]: the float32 sums of token t0 + t, rows of group g
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(_f32x16, None))
                     for _ in range(groups)] for _ in range(nt)]
            low4 = _splat(builder, _i8(0x0F), _i8x64)
            shift = _splat(builder, _i32(FINE_BITS), _i32x16)
            unit = _splat(builder, ir.Constant(ir.FloatType(), 2.0**-FINE_BITS), _f32x16)
            four = _splat(builder, _i8(4), _i8x64)
            sixteen = _splat(builder, _i8(16), _i8x64)
            no_bits = ir.Constant(_i8x64, None)

            def fifth(vec, base, index):  # vec | (bit j of the plane's uint64 `index` ? 16 : 0)
                hbase = builder.add(base, _i64(64 * n_chunks))  # the plane follows the nibbles
                word = _invariant(builder, builder.load(
                    _ptr(builder, wp, builder.add(hbase, _i64(8 * index)), _i64), align=1))
                mask = builder.bitcast(word, ir.VectorType(ir.IntType(1), 64))
                return builder.or_(vec, builder.select(mask, sixteen, no_bits))

            with cgutils.for_range(builder, n_blocks) as loop:
                b = loop.index
                bases = [builder.add(builder.add(w_off_, builder.mul(_i64(g), group_bytes)),
                                     builder.mul(b, _i64(block_bytes))) for g in range(groups)]
                for base in bases:
                    for line in range(block_bytes // 64):
                        ahead = builder.add(base, _i64(PREFETCH_BYTES + 64 * line))
                        builder.call(prefetch, [builder.gep(wp, [ahead]), _i32(0), _i32(3),
                                                _i32(1)])
                e0 = builder.mul(b, _i64(blk))  # first element of the block
                toks = [builder.add(t0_, _i64(t)) for t in range(nt)]
                rows = [builder.add(builder.mul(tok, n_in_), e0) for tok in toks]

                def xdword(row, e):  # 4 activations broadcast to 16 lanes
                    v = builder.load(_ptr(builder, xqp, builder.add(row, _i64(e)), _i32), align=1)
                    return builder.bitcast(_splat(builder, v, _i32x16), _i8x64)

                def x_of(t, j, e):  # token t's term j, elements e..e+3 broadcast
                    row = rows[t] if j == 0 else builder.add(rows[t],
                                                             builder.mul(q2_off_, _i64(j)))
                    return xdword(row, e)

                def unpack(k):  # [(u of each group, first element)] of the 64-byte chunk k
                    chunks = [_invariant(builder, builder.load(_ptr(
                        builder, wp, builder.add(base, _i64(64 * k)), _i8x64), align=1))
                        for base in bases]
                    if not nibble:
                        return [(chunks, 4 * k)]
                    # low nibbles: elements 4k.., high nibbles: 16 + 4k..
                    los = [builder.and_(c, low4) for c in chunks]
                    his = [builder.lshr(c, four) for c in chunks]
                    if hi_bits:  # or in 16 where the lane's bit in the plane is set
                        los = [fifth(v, base, 2 * k) for v, base in zip(los, bases)]
                        his = [fifth(v, base, 2 * k + 1) for v, base in zip(his, bases)]
                    return [(los, 4 * k), (his, 16 + 4 * k)]

                # sums[t][g] = sum_e u[r, e] * x[t, e] over the block, in units of the last
                # term, (sum u q1) * 128 + sum u q2 (the third term, if any, apart in `finer`).
                # Each 4-activation broadcast serves the `groups` weight chunks beside it (a
                # broadcast load per vpdpbusd would hold vpdpbusd to ~1 per cycle instead of
                # ~2), each weight chunk the nt tokens.
                zero = ir.Constant(_i32x16, None)
                finer = None  # terms == 3: sum u q1 * 128 + sum u q2, at 128x sums' scale
                if dot.vnni:  # term by term: one chain, the second term's from the first shifted
                    sums = [[zero] * groups for _ in range(nt)]
                    for j in range(terms):
                        if j == 1:
                            sums = [[builder.shl(a, shift) for a in row] for row in sums]
                        if j == 2:
                            finer, sums = sums, [[zero] * groups for _ in range(nt)]
                        for k in range(n_chunks):
                            for us, e in unpack(k):
                                for t in range(nt):
                                    x = x_of(t, j, e)
                                    for g in range(groups):
                                        sums[t][g] = dot.add(sums[t][g], us[g], x)
                else:  # chunk by chunk, every term of it (its unpacked weights used at once,
                    # not kept in registers for the next term): int16 sums per term, widened
                    # into int32 every `limit` parts
                    wide = [[[zero] * groups for _ in range(nt)] for _ in range(terms)]
                    partial = [[[dot.zero16] * groups for _ in range(nt)] for _ in range(terms)]

                    def widen():
                        for j in range(terms):
                            for t in range(nt):
                                for g in range(groups):
                                    wide[j][t][g] = dot.end(wide[j][t][g], partial[j][t][g])
                                    partial[j][t][g] = dot.zero16

                    parts_in = 0
                    for k in range(n_chunks):
                        for us, e in unpack(k):
                            if parts_in == dot.limit:
                                widen()
                                parts_in = 0
                            for j in range(terms):
                                for t in range(nt):
                                    x = x_of(t, j, e)
                                    for g in range(groups):
                                        partial[j][t][g] = dot.add(partial[j][t][g], us[g], x)
                            parts_in += 1
                    widen()
                    sums = wide[0]
                    if terms >= 2:
                        sums = [[builder.add(builder.shl(a, shift), b2) for a, b2 in zip(
                            ra, rb, strict=True)] for ra, rb in zip(sums, wide[1], strict=True)]
                    if terms == 3:
                        finer, sums = sums, wide[2]
                for g, base in enumerate(bases):
                    sbase = builder.add(base, _i64(quant_bytes(layout)))
                    d = builder.fpext(builder.load(_ptr(builder, wp, sbase, _f16x16), align=1),
                                      _f32x16)
                    if dot.signed:  # sums of q, not of u = q + 128: no m term
                        m = None
                    elif layout == LAYOUT_BYTE32:  # m = -128 d, not stored: m xsum = d (-128 xsum)
                        m = d
                    else:
                        m = builder.fpext(builder.load(_ptr(builder, wp, builder.add(
                            sbase, _i64(32)), _f16x16), align=1), _f32x16)
                    for t in range(nt):
                        tok = toks[t]
                        # activation scale of this block and the sum of its dequantized
                        # activations
                        ix = builder.add(builder.mul(tok, n_x32), builder.sdiv(e0, _i64(32)))
                        xd_t = builder.load(builder.gep(xdp, [ix]))
                        is16 = builder.add(builder.mul(tok, n_x16), builder.sdiv(e0, _i64(16)))
                        xsum = builder.load(builder.gep(xsp, [is16]))
                        if blk == 32:
                            nxt = builder.load(builder.gep(xsp, [builder.add(is16, _i64(1))]))
                            xsum = builder.fadd(xsum, nxt)
                        if layout == LAYOUT_BYTE32:  # exact, the same per token in any tile
                            xsum = builder.fmul(xsum, ir.Constant(ir.FloatType(), BYTE32_M))
                        scale = builder.fmul(d, _splat(builder, xd_t, _f32x16))
                        if terms >= 2:  # a power of two: exact in any order
                            scale = builder.fmul(scale, unit)
                        # two explicit FMAs: the same rounding whatever the tile, so a row's
                        # output does not depend on the rows beside it (free to reassociate,
                        # LLVM chose differently for tiles of 1 and of 4)
                        total = builder.load(accs[t][g])
                        if terms == 3:  # sums holds the third term; finer the first two
                            total = builder.call(fma, [builder.sitofp(finer[t][g], _f32x16),
                                                       scale, total])
                            total = builder.call(fma, [builder.sitofp(sums[t][g], _f32x16),
                                                       builder.fmul(scale, unit), total])
                        else:
                            total = builder.call(fma, [builder.sitofp(sums[t][g], _f32x16),
                                                       scale, total])
                        if m is not None:
                            total = builder.call(fma, [m, _splat(builder, xsum, _f32x16), total])
                        builder.store(total, accs[t][g])
            # masked store of the first n_valid lanes
            mstore = cgutils.get_or_insert_function(
                mod,
                ir.FunctionType(
                    ir.VoidType(),
                    [_f32x16, _f32x16.as_pointer(), _i32, ir.VectorType(ir.IntType(1), GROUP)],
                ),
                "llvm.masked.store.v16f32.p0",
            )
            for g in range(groups):
                lanes = ir.Constant(_i32x16, list(range(GROUP * g, GROUP * (g + 1))))
                mask = builder.icmp_signed(
                    "<", lanes, _splat(builder, builder.trunc(n_valid_, _i32), _i32x16)
                )
                for t in range(nt):
                    o = builder.add(out_off_, builder.add(builder.mul(_i64(t), n_out_),
                                                          _i64(GROUP * g)))
                    dst = builder.bitcast(builder.gep(outp, [o]), _f32x16.as_pointer())
                    builder.call(mstore, [builder.load(accs[t][g]), dst, _i32(4), mask])
            return context.get_dummy_value()

        return sig, codegen

    return group_dot


TILE = 4  # tokens per weight load in the prefill kernel
TILE8 = 8  # tokens per weight load for a pair of groups, from 8 rows
# Pairs of groups (and their tiles of 2 and TILE8 tokens) only with AVX-512's 32 registers: with
# AVX2's 16 (of half the width) their sums spill, and one group at a time is faster (8 rows of
# SmolLM2's ffn_up: 0.26 -> 0.18 ms; the Q8_0 head: 11.0 -> 8.7 ms)
PAIRS = jit.INT8_DOT == "vpdpbusd"
PAIR = 2  # groups per call: each activation broadcast serves two weight chunks
# one intrinsic per (layout, tile of 1 or TILE tokens, activation terms, 1 or PAIR groups)
_dot_n32_t1 = _make_group_dot(LAYOUT_NIBBLE32, 1, 1)
_dot_n32_t4 = _make_group_dot(LAYOUT_NIBBLE32, TILE, 1)
_dot_b32_t1 = _make_group_dot(LAYOUT_BYTE32, 1, 1)
_dot_b32_t4 = _make_group_dot(LAYOUT_BYTE32, TILE, 1)
_dot_b16_t1 = _make_group_dot(LAYOUT_BYTE16, 1, 1)
_dot_b16_t4 = _make_group_dot(LAYOUT_BYTE16, TILE, 1)
_dot2_n32_t1 = _make_group_dot(LAYOUT_NIBBLE32, 1, 2)
_dot2_n32_t4 = _make_group_dot(LAYOUT_NIBBLE32, TILE, 2)
_dot2_b32_t1 = _make_group_dot(LAYOUT_BYTE32, 1, 2)
_dot2_b32_t4 = _make_group_dot(LAYOUT_BYTE32, TILE, 2)
_dot2_b16_t1 = _make_group_dot(LAYOUT_BYTE16, 1, 2)
_dot2_b16_t4 = _make_group_dot(LAYOUT_BYTE16, TILE, 2)
_dot3_n32_t1 = _make_group_dot(LAYOUT_NIBBLE32, 1, 3)  # three terms: traced passes
_dot3_n32_t4 = _make_group_dot(LAYOUT_NIBBLE32, TILE, 3)
_dot3_b32_t1 = _make_group_dot(LAYOUT_BYTE32, 1, 3)
_dot3_b32_t4 = _make_group_dot(LAYOUT_BYTE32, TILE, 3)
_dot3_b16_t1 = _make_group_dot(LAYOUT_BYTE16, 1, 3)
_dot3_b16_t4 = _make_group_dot(LAYOUT_BYTE16, TILE, 3)
_pair_n32_t1 = _make_group_dot(LAYOUT_NIBBLE32, 1, 1, PAIR)
_pair_n32_t4 = _make_group_dot(LAYOUT_NIBBLE32, TILE, 1, PAIR)
_pair_b32_t1 = _make_group_dot(LAYOUT_BYTE32, 1, 1, PAIR)
_pair_b32_t4 = _make_group_dot(LAYOUT_BYTE32, TILE, 1, PAIR)
_pair_b16_t1 = _make_group_dot(LAYOUT_BYTE16, 1, 1, PAIR)
_pair_b16_t4 = _make_group_dot(LAYOUT_BYTE16, TILE, 1, PAIR)
_pair2_n32_t1 = _make_group_dot(LAYOUT_NIBBLE32, 1, 2, PAIR)
_pair2_n32_t4 = _make_group_dot(LAYOUT_NIBBLE32, TILE, 2, PAIR)
_pair2_b32_t1 = _make_group_dot(LAYOUT_BYTE32, 1, 2, PAIR)
_pair2_b32_t4 = _make_group_dot(LAYOUT_BYTE32, TILE, 2, PAIR)
_pair2_b16_t1 = _make_group_dot(LAYOUT_BYTE16, 1, 2, PAIR)
_pair2_b16_t4 = _make_group_dot(LAYOUT_BYTE16, TILE, 2, PAIR)
# and tiles of eight tokens for the pairs, from 8 rows: each pair's weights are read once per
# block for all eight, so that a batched decode step's weight stream keeps a steady pace (with
# tiles of 4, the first tile waited on memory and the second left it idle: 8 rows of SmolLM2's
# layers, 7.6 -> 6.9 ms); the sums that do not fit the registers wait in L1
_pair_n32_t8 = _make_group_dot(LAYOUT_NIBBLE32, TILE8, 1, PAIR)
_pair_b32_t8 = _make_group_dot(LAYOUT_BYTE32, TILE8, 1, PAIR)
_pair_b16_t8 = _make_group_dot(LAYOUT_BYTE16, TILE8, 1, PAIR)
_pair_h32_t8 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE8, 1, PAIR)
_pair2_n32_t8 = _make_group_dot(LAYOUT_NIBBLE32, TILE8, 2, PAIR)
_pair2_b32_t8 = _make_group_dot(LAYOUT_BYTE32, TILE8, 2, PAIR)
_pair2_b16_t8 = _make_group_dot(LAYOUT_BYTE16, TILE8, 2, PAIR)
_pair2_h32_t8 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE8, 2, PAIR)
# and tiles of two tokens for the pairs: a decode step of 2 or 3 rows reads the weights once
_pair_n32_t2 = _make_group_dot(LAYOUT_NIBBLE32, 2, 1, PAIR)
_pair_b32_t2 = _make_group_dot(LAYOUT_BYTE32, 2, 1, PAIR)
_pair_b16_t2 = _make_group_dot(LAYOUT_BYTE16, 2, 1, PAIR)
_pair2_n32_t2 = _make_group_dot(LAYOUT_NIBBLE32, 2, 2, PAIR)
_pair2_b32_t2 = _make_group_dot(LAYOUT_BYTE32, 2, 2, PAIR)
_pair2_b16_t2 = _make_group_dot(LAYOUT_BYTE16, 2, 2, PAIR)
_dot_h32_t1 = _make_group_dot(LAYOUT_NIBBLE32_HI, 1, 1)  # 5-bit formats
_dot_h32_t4 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE, 1)
_dot2_h32_t1 = _make_group_dot(LAYOUT_NIBBLE32_HI, 1, 2)
_dot2_h32_t4 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE, 2)
_dot3_h32_t1 = _make_group_dot(LAYOUT_NIBBLE32_HI, 1, 3)
_dot3_h32_t4 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE, 3)
_pair_h32_t1 = _make_group_dot(LAYOUT_NIBBLE32_HI, 1, 1, PAIR)
_pair_h32_t2 = _make_group_dot(LAYOUT_NIBBLE32_HI, 2, 1, PAIR)
_pair_h32_t4 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE, 1, PAIR)
_pair2_h32_t1 = _make_group_dot(LAYOUT_NIBBLE32_HI, 1, 2, PAIR)
_pair2_h32_t2 = _make_group_dot(LAYOUT_NIBBLE32_HI, 2, 2, PAIR)
_pair2_h32_t4 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE, 2, PAIR)


@njit
def _dot(layout, terms, tile, w, w_off, xq, xd, xs, t, n_in, q2_off, outf, o, n_out, n_valid):
    """Dispatch one tile (`tile` = 1 or TILE tokens from t) of one group to its intrinsic."""
    a = (w, w_off, xq, xd, xs, t, n_in, q2_off, outf, o, n_out, n_valid)
    if terms == 3:  # exact (traced) passes
        if tile == TILE:
            if layout == LAYOUT_NIBBLE32:
                _dot3_n32_t4(*a)
            elif layout == LAYOUT_BYTE32:
                _dot3_b32_t4(*a)
            elif layout == LAYOUT_NIBBLE32_HI:
                _dot3_h32_t4(*a)
            else:
                _dot3_b16_t4(*a)
        elif layout == LAYOUT_NIBBLE32:
            _dot3_n32_t1(*a)
        elif layout == LAYOUT_BYTE32:
            _dot3_b32_t1(*a)
        elif layout == LAYOUT_NIBBLE32_HI:
            _dot3_h32_t1(*a)
        else:
            _dot3_b16_t1(*a)
    elif terms == 1:
        if tile == TILE:
            if layout == LAYOUT_NIBBLE32:
                _dot_n32_t4(*a)
            elif layout == LAYOUT_BYTE32:
                _dot_b32_t4(*a)
            elif layout == LAYOUT_NIBBLE32_HI:
                _dot_h32_t4(*a)
            else:
                _dot_b16_t4(*a)
        elif layout == LAYOUT_NIBBLE32:
            _dot_n32_t1(*a)
        elif layout == LAYOUT_BYTE32:
            _dot_b32_t1(*a)
        elif layout == LAYOUT_NIBBLE32_HI:
            _dot_h32_t1(*a)
        else:
            _dot_b16_t1(*a)
    elif tile == TILE:
        if layout == LAYOUT_NIBBLE32:
            _dot2_n32_t4(*a)
        elif layout == LAYOUT_BYTE32:
            _dot2_b32_t4(*a)
        elif layout == LAYOUT_NIBBLE32_HI:
            _dot2_h32_t4(*a)
        else:
            _dot2_b16_t4(*a)
    elif layout == LAYOUT_NIBBLE32:
        _dot2_n32_t1(*a)
    elif layout == LAYOUT_BYTE32:
        _dot2_b32_t1(*a)
    elif layout == LAYOUT_NIBBLE32_HI:
        _dot2_h32_t1(*a)
    else:
        _dot2_b16_t1(*a)


@njit
def _dot_pair(layout, terms, tile, w, w_off, xq, xd, xs, t, n_in, q2_off, outf, o, n_out,
              n_valid):
    """`_dot` for the PAIR groups from w_off (one or two activation terms; tiles of 1, 2,
    TILE or TILE8 tokens)."""
    a = (w, w_off, xq, xd, xs, t, n_in, q2_off, outf, o, n_out, n_valid)
    if tile == TILE8:
        if terms == 1:
            if layout == LAYOUT_NIBBLE32:
                _pair_n32_t8(*a)
            elif layout == LAYOUT_BYTE32:
                _pair_b32_t8(*a)
            elif layout == LAYOUT_NIBBLE32_HI:
                _pair_h32_t8(*a)
            else:
                _pair_b16_t8(*a)
        elif layout == LAYOUT_NIBBLE32:
            _pair2_n32_t8(*a)
        elif layout == LAYOUT_BYTE32:
            _pair2_b32_t8(*a)
        elif layout == LAYOUT_NIBBLE32_HI:
            _pair2_h32_t8(*a)
        else:
            _pair2_b16_t8(*a)
    elif tile == 2:
        if terms == 1:
            if layout == LAYOUT_NIBBLE32:
                _pair_n32_t2(*a)
            elif layout == LAYOUT_BYTE32:
                _pair_b32_t2(*a)
            elif layout == LAYOUT_NIBBLE32_HI:
                _pair_h32_t2(*a)
            else:
                _pair_b16_t2(*a)
        elif layout == LAYOUT_NIBBLE32:
            _pair2_n32_t2(*a)
        elif layout == LAYOUT_BYTE32:
            _pair2_b32_t2(*a)
        elif layout == LAYOUT_NIBBLE32_HI:
            _pair2_h32_t2(*a)
        else:
            _pair2_b16_t2(*a)
    elif terms == 1:
        if tile == TILE:
            if layout == LAYOUT_NIBBLE32:
                _pair_n32_t4(*a)
            elif layout == LAYOUT_BYTE32:
                _pair_b32_t4(*a)
            elif layout == LAYOUT_NIBBLE32_HI:
                _pair_h32_t4(*a)
            else:
                _pair_b16_t4(*a)
        elif layout == LAYOUT_NIBBLE32:
            _pair_n32_t1(*a)
        elif layout == LAYOUT_BYTE32:
            _pair_b32_t1(*a)
        elif layout == LAYOUT_NIBBLE32_HI:
            _pair_h32_t1(*a)
        else:
            _pair_b16_t1(*a)
    elif tile == TILE:
        if layout == LAYOUT_NIBBLE32:
            _pair2_n32_t4(*a)
        elif layout == LAYOUT_BYTE32:
            _pair2_b32_t4(*a)
        elif layout == LAYOUT_NIBBLE32_HI:
            _pair2_h32_t4(*a)
        else:
            _pair2_b16_t4(*a)
    elif layout == LAYOUT_NIBBLE32:
        _pair2_n32_t1(*a)
    elif layout == LAYOUT_BYTE32:
        _pair2_b32_t1(*a)
    elif layout == LAYOUT_NIBBLE32_HI:
        _pair2_h32_t1(*a)
    else:
        _pair2_b16_t1(*a)


@njit
def _group(w, layout, group_bytes, xq, xd, xs, n_out, outf, g, n_groups):
    """Rows 16g.. of `n_groups` (1 or PAIR) groups for every token: tiles of TILE8 tokens
    (a pair) or TILE, then the remainder (by two for a pair, else one by one)."""
    n_tok = xd.shape[0]
    n_in = xq.shape[1]
    terms = xq.shape[0] // n_tok
    q2_off = n_tok * n_in  # first element of the second term's rows
    w_off = g * group_bytes
    n_valid = min(n_groups * GROUP, n_out - g * GROUP)
    pair = PAIRS and n_groups == PAIR and terms < 3
    t = 0
    while t < n_tok:
        if pair and t + TILE8 <= n_tok:
            tile = TILE8
        elif t + TILE <= n_tok:
            tile = TILE
        elif pair and t + 2 <= n_tok:
            tile = 2
        else:
            tile = 1
        o = t * n_out + g * GROUP
        if pair:
            _dot_pair(layout, terms, tile, w, w_off, xq, xd, xs, t, n_in, q2_off, outf, o,
                      n_out, n_valid)
        else:  # one group at a time (three terms: too many sums for the registers of two)
            for i in range(n_groups):
                _dot(layout, terms, tile, w, w_off + i * group_bytes, xq, xd, xs, t, n_in,
                     q2_off, outf, o + i * GROUP, n_out, n_valid - i * GROUP)
        t += tile


@njit(inline="always")
def _all_groups(w, layout, block_bytes, xq, xd, xs, n_out, out):
    """Every pair of groups, as a prange: parallel in a parallel function (its body is
    inlined, so a fused layer's own parallel regions run it, kernels/decode_layer.py), a
    plain loop in a serial one."""
    group_bytes = block_bytes * (xq.shape[1] // LAYOUT_BLK[layout])
    outf = out.reshape(-1)
    n_groups = (n_out + GROUP - 1) // GROUP
    for p in prange((n_groups + PAIR - 1) // PAIR):
        g = PAIR * p
        _group(w, layout, group_bytes, xq, xd, xs, n_out, outf, g, min(PAIR, n_groups - g))


@pnjit
def qmatmul_vnni(w, layout, block_bytes, xq, xd, xs, n_out, out):
    """out (n_tok, n_out) = x @ W.T for a packed W and quantized x (see kernels.qmatmul).

    w: uint8 group stream; xq (terms * n_tok, n_in) int8; xd (n_tok, n_in/32),
    xs (n_tok, n_in/16). Pairs of groups of 16 rows are shared out between the threads.
    """
    _all_groups(w, layout, block_bytes, xq, xd, xs, n_out, out)


@njit
def qmatmul_vnni_serial(w, layout, block_bytes, xq, xd, xs, n_out, out):
    """`qmatmul_vnni` on the calling thread: for small matrices, where waking the other
    threads (~3 us) costs more than it saves."""
    _all_groups(w, layout, block_bytes, xq, xd, xs, n_out, out)


@pnjit(inline="always")
def linear(x, w, layout, block_bytes, n_out, terms, out):
    """out (n, n_out) = x (n, n_in) float32 @ W.T for a packed W: the activations quantized to
    `terms` terms, then the kernel on all threads, or on this one for small products where
    waking the others costs more than it saves. What `kernels.qmatmul.matmul` runs here, and
    what `kernels.decode_layer` inlines into a layer."""
    n, n_in = x.shape
    xq = np.empty((terms * n, n_in), np.int8)  # term k of token t is row k*n + t
    xd = np.empty((n, n_in // 32), np.float32)
    xs = np.empty((n, n_in // 16), np.float32)
    quantize_activations_auto(x, xq, xd, xs)
    if terms * n * w.size < SERIAL_BYTES:
        qmatmul_vnni_serial(w, layout, block_bytes, xq, xd, xs, n_out, out)
    else:
        _all_groups(w, layout, block_bytes, xq, xd, xs, n_out, out)
