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
float32 at the scale `xd / 128^2`. A tile of `nt` tokens
shares each 64-byte weight load. Only call these when `jit.HAS_AVX512_VNNI`.

The driver lives in this module too: Numba's `cache=True` would not notice an edit of the IR
generator if it sat in another file.
"""

from __future__ import annotations

from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.jit import njit, pnjit
from kernels.qmatmul import FINE_BITS
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


def _make_group_dot(layout: int, nt: int, terms: int):
    """An intrinsic computing 16 output rows x `nt` tokens for one group (see module doc).

    Call as `group_dot(w, w_off, xq, xd, xs, t0, n_in, q2_off, out, out_off, n_out, n_valid)`:
    w (uint8 flat) from byte w_off; xq int8 (terms * n_tok, n_in), the second term's rows from
    element q2_off (the third's from 2 * q2_off); xd float32 (n_tok, n_in/32); xs float32
    (n_tok, n_in/16); tokens t0..t0+nt-1; out float32 flat, rows of length n_out, written at
    out_off + t*n_out for the first n_valid of the 16 lanes.
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
            dpbusd = cgutils.get_or_insert_function(
                mod,
                ir.FunctionType(_i32x16, [_i32x16, _i8x64, _i8x64]),
                "llvm.x86.avx512.vpdpbusd.512",
            )
            prefetch = cgutils.get_or_insert_function(
                mod,
                ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]),
                "llvm.prefetch.p0",
            )
            n_blocks = builder.sdiv(n_in_, _i64(blk))
            n_x32 = builder.sdiv(n_in_, _i64(32))
            n_x16 = builder.sdiv(n_in_, _i64(16))
            accs = [
                cgutils.alloca_once_value(builder, ir.Constant(_f32x16, None)) for _ in range(nt)
            ]
            low4 = _splat(builder, _i8(0x0F), _i8x64)
            shift = _splat(builder, _i32(FINE_BITS), _i32x16)
            unit = _splat(builder, ir.Constant(ir.FloatType(), 2.0**-FINE_BITS), _f32x16)
            four = _splat(builder, _i8(4), _i8x64)
            sixteen = _splat(builder, _i8(16), _i8x64)
            no_bits = ir.Constant(_i8x64, None)
            with cgutils.for_range(builder, n_blocks) as loop:
                b = loop.index
                base = builder.add(w_off_, builder.mul(b, _i64(block_bytes)))
                for line in range(block_bytes // 64):
                    ahead = builder.add(base, _i64(PREFETCH_BYTES + 64 * line))
                    builder.call(prefetch, [builder.gep(wp, [ahead]), _i32(0), _i32(3), _i32(1)])
                # weights of this block: n_chunks x <64 x i8>, shared by all nt tokens
                chunks = [
                    builder.load(
                        _ptr(builder, wp, builder.add(base, _i64(64 * k)), _i8x64), align=1
                    )
                    for k in range(n_chunks)
                ]
                if nibble:
                    lo = [builder.and_(c, low4) for c in chunks]
                    hi = [builder.lshr(c, four) for c in chunks]
                if hi_bits:  # or in 16 where the lane's bit in the plane is set: a masked op
                    hbase = builder.add(base, _i64(64 * n_chunks))

                    def fifth(vec, index):  # vec | (bit j of uint64 `index` ? 16 : 0), per lane j
                        word = builder.load(
                            _ptr(builder, wp, builder.add(hbase, _i64(8 * index)), _i64), align=1
                        )
                        mask = builder.bitcast(word, ir.VectorType(ir.IntType(1), 64))
                        return builder.or_(vec, builder.select(mask, sixteen, no_bits))

                    lo = [fifth(lo[k], 2 * k) for k in range(n_chunks)]
                    hi = [fifth(hi[k], 2 * k + 1) for k in range(n_chunks)]
                sbase = builder.add(base, _i64(quant_bytes(layout)))
                d = builder.fpext(builder.load(_ptr(builder, wp, sbase, _f16x16), align=1), _f32x16)
                if layout == LAYOUT_BYTE32:  # m = -128 d, not stored: m xsum = d (-128 xsum)
                    m = d
                else:
                    m = builder.fpext(
                        builder.load(_ptr(builder, wp, builder.add(sbase, _i64(32)), _f16x16),
                                     align=1),
                        _f32x16,
                    )
                e0 = builder.mul(b, _i64(blk))  # first element of the block
                for t in range(nt):
                    tok = builder.add(t0_, _i64(t))
                    xrow = builder.add(builder.mul(tok, n_in_), e0)

                    def chain(row):  # sum_e u[r, e] * xq[row + e] over the block
                        def xdword(e):  # 4 activations broadcast to 16 lanes
                            v = builder.load(
                                _ptr(builder, xqp, builder.add(row, _i64(e)), _i32), align=1
                            )
                            return builder.bitcast(_splat(builder, v, _i32x16), _i8x64)

                        acc = ir.Constant(_i32x16, None)
                        for k in range(n_chunks):
                            if nibble:
                                acc = builder.call(dpbusd, [acc, lo[k], xdword(4 * k)])
                                acc = builder.call(dpbusd, [acc, hi[k], xdword(16 + 4 * k)])
                            else:
                                acc = builder.call(dpbusd, [acc, chunks[k], xdword(4 * k)])
                        return acc

                    acc = chain(xrow)
                    if terms >= 2:  # (sum u q1) * 128 + sum u q2
                        fine = chain(builder.add(xrow, q2_off_))
                        acc = builder.add(builder.shl(acc, shift), fine)
                    if terms == 3:  # sum u q3, at 1/128 of acc's scale
                        finer = chain(builder.add(xrow, builder.mul(q2_off_, _i64(2))))
                    # activation scale of this block and the sum of its dequantized activations
                    ix = builder.add(builder.mul(tok, n_x32), builder.sdiv(e0, _i64(32)))
                    xd_t = builder.load(builder.gep(xdp, [ix]))
                    is16 = builder.add(builder.mul(tok, n_x16), builder.sdiv(e0, _i64(16)))
                    xsum = builder.load(builder.gep(xsp, [is16]))
                    if blk == 32:
                        nxt = builder.load(builder.gep(xsp, [builder.add(is16, _i64(1))]))
                        xsum = builder.fadd(xsum, nxt)
                    if layout == LAYOUT_BYTE32:  # exact, and the same per token in any tile
                        xsum = builder.fmul(xsum, ir.Constant(ir.FloatType(), BYTE32_M))
                    scale = builder.fmul(d, _splat(builder, xd_t, _f32x16))
                    if terms >= 2:
                        scale = builder.fmul(scale, unit)
                    total = builder.load(accs[t])
                    total = builder.fadd(total, builder.fmul(builder.sitofp(acc, _f32x16), scale))
                    if terms == 3:
                        fine_scale = builder.fmul(scale, unit)
                        total = builder.fadd(
                            total, builder.fmul(builder.sitofp(finer, _f32x16), fine_scale)
                        )
                    total = builder.fadd(total, builder.fmul(m, _splat(builder, xsum, _f32x16)))
                    builder.store(total, accs[t])
            # masked store of the first n_valid lanes
            lanes = ir.Constant(_i32x16, list(range(GROUP)))
            mask = builder.icmp_unsigned(
                "<", lanes, _splat(builder, builder.trunc(n_valid_, _i32), _i32x16)
            )
            mstore = cgutils.get_or_insert_function(
                mod,
                ir.FunctionType(
                    ir.VoidType(),
                    [_f32x16, _f32x16.as_pointer(), _i32, ir.VectorType(ir.IntType(1), GROUP)],
                ),
                "llvm.masked.store.v16f32.p0",
            )
            for t in range(nt):
                o = builder.add(out_off_, builder.mul(_i64(t), n_out_))
                dst = builder.bitcast(builder.gep(outp, [o]), _f32x16.as_pointer())
                builder.call(mstore, [builder.load(accs[t]), dst, _i32(4), mask])
            return context.get_dummy_value()

        return sig, codegen

    return group_dot


TILE = 4  # tokens per weight load in the prefill kernel
# one intrinsic per (layout, tile of 1 or TILE tokens, activation terms)
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
_dot_h32_t1 = _make_group_dot(LAYOUT_NIBBLE32_HI, 1, 1)  # 5-bit formats
_dot_h32_t4 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE, 1)
_dot2_h32_t1 = _make_group_dot(LAYOUT_NIBBLE32_HI, 1, 2)
_dot2_h32_t4 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE, 2)
_dot3_h32_t1 = _make_group_dot(LAYOUT_NIBBLE32_HI, 1, 3)
_dot3_h32_t4 = _make_group_dot(LAYOUT_NIBBLE32_HI, TILE, 3)


@njit
def _dot(layout, terms, tile, w, w_off, xq, xd, xs, t, n_in, q2_off, outf, o, n_out, n_valid):
    """Dispatch one tile (`tile` = 1 or TILE tokens from t) to its intrinsic."""
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
def _group(w, layout, group_bytes, xq, xd, xs, n_out, outf, g):
    """Rows 16g..16g+15 for every token: tiles of TILE tokens, then the remainder one by one."""
    n_tok = xd.shape[0]
    n_in = xq.shape[1]
    terms = xq.shape[0] // n_tok
    q2_off = n_tok * n_in  # first element of the second term's rows
    w_off = g * group_bytes
    n_valid = min(GROUP, n_out - g * GROUP)
    t = 0
    while t < n_tok:
        tile = TILE if t + TILE <= n_tok else 1
        o = t * n_out + g * GROUP
        _dot(layout, terms, tile, w, w_off, xq, xd, xs, t, n_in, q2_off, outf, o, n_out, n_valid)
        t += tile


@pnjit
def qmatmul_vnni(w, layout, block_bytes, xq, xd, xs, n_out, out):
    """out (n_tok, n_out) = x @ W.T for a packed W and quantized x (see kernels.qmatmul).

    w: uint8 group stream; xq (terms * n_tok, n_in) int8; xd (n_tok, n_in/32),
    xs (n_tok, n_in/16). Groups of 16 rows are shared out between the threads.
    """
    group_bytes = block_bytes * (xq.shape[1] // LAYOUT_BLK[layout])
    outf = out.reshape(-1)
    for g in prange((n_out + GROUP - 1) // GROUP):
        _group(w, layout, group_bytes, xq, xd, xs, n_out, outf, g)


@njit
def qmatmul_vnni_serial(w, layout, block_bytes, xq, xd, xs, n_out, out):
    """`qmatmul_vnni` on the calling thread: for small matrices, where waking the other
    threads (~3 us) costs more than it saves."""
    group_bytes = block_bytes * (xq.shape[1] // LAYOUT_BLK[layout])
    outf = out.reshape(-1)
    for g in range((n_out + GROUP - 1) // GROUP):
        _group(w, layout, group_bytes, xq, xd, xs, n_out, outf, g)
