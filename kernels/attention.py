"""Attention: causal grouped-query attention over the paged KV cache (prefill and decode
alike, several sequences in one call), and bidirectional attention over packed sequences for
encoders (bert).

Causal: a query at position p sees keys at positions max(0, p - window + 1) .. p of its own
sequence (`window` <= 0: no window). Head h reads kv head h // (n_head // n_kv_head).
`attention_ref` is the maths for one sequence over contiguous keys; `paged_attention_ref`
applies it to each row of a packed batch over the paged cache (`engine/kv.py`).
Encoder: see `encoder_attention_ref`.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.jit import njit, pnjit

KV_BLOCK = 16  # positions per KV-cache block (the one definition; engine.kv uses it)


def attention_weights_ref(q, k, q_pos, window: int, scale: float,
                          softcap: float = 0.0) -> np.ndarray:
    """The attention probabilities: q (n, n_head, hd) at positions q_pos (n,) over keys
    k (n_kv_head, n_keys, hd) at positions 0..n_keys-1 -> (n, n_head, n_keys) float32, each
    row summing to 1 over the keys it may see (0 elsewhere). The paged kernels never keep
    these; `engine/trace.py` recomputes them here from the cached keys.

    `softcap` > 0 caps the scaled scores softly, `softcap * tanh(s / softcap)` (gemma2)."""
    n, n_head, _ = q.shape
    n_kv_head, n_keys, _ = k.shape
    group = n_head // n_kv_head
    q_pos = np.asarray(q_pos)[:, None]  # (n, 1)
    k_pos = np.arange(n_keys)[None, :]  # (1, n_keys)
    allowed = k_pos <= q_pos
    if window > 0:
        allowed &= k_pos > q_pos - window
    weights = np.empty((n, n_head, n_keys), np.float32)
    for h in range(n_head):
        scores = (q[:, h, :] @ k[h // group].T) * scale  # (n, n_keys)
        if softcap > 0:
            scores = softcap * np.tanh(scores / softcap)
        scores = np.where(allowed, scores, -np.inf)
        w = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights[:, h, :] = w / w.sum(axis=-1, keepdims=True)
    return weights


def attention_ref(q, k, v, pos0: int, window: int, scale: float,
                  softcap: float = 0.0) -> np.ndarray:
    """q (n, n_head, hd); k, v (n_kv_head, n_keys, hd) float32 -> (n, n_head * hd)."""
    n, n_head, hd = q.shape
    group = n_head // k.shape[0]
    weights = attention_weights_ref(q, k, pos0 + np.arange(n), window, scale, softcap)
    out = np.empty((n, n_head, hd), np.float32)
    for h in range(n_head):
        out[:, h, :] = weights[:, h, :] @ v[h // group]  # (n, hd)
    return out.reshape(n, n_head * hd)


def paged_attention_ref(q, k_cache, v_cache, block_tables, row_seq, positions, window: int,
                        scale: float, softcap: float = 0.0) -> np.ndarray:
    """Causal attention of packed queries, each over its own sequence in a paged KV cache.

    q (n, n_head, hd) float32: row t belongs to sequence row_seq[t] (n,) and sits at position
    positions[t] (n,) of it. k_cache, v_cache (n_kv_head, n_slots, hd) float32 hold every
    sequence's keys and values; position p of sequence s is in slot
    `block_tables[s, p // KV_BLOCK] * KV_BLOCK + p % KV_BLOCK` (block_tables (B, max_blocks)).
    Row t sees positions max(0, p - window + 1) .. p of its sequence (window <= 0: all).
    Returns (n, n_head * hd): `attention_ref` over the gathered keys, for each run of rows
    that are consecutive positions of one sequence.
    """
    n, n_head, hd = q.shape
    out = np.empty((n, n_head * hd), np.float32)
    a = 0
    while a < n:
        b = a + 1  # rows a..b-1: one sequence, positions p0, p0 + 1, ...
        while b < n and row_seq[b] == row_seq[a] and positions[b] == positions[b - 1] + 1:
            b += 1
        p0, last = int(positions[a]), int(positions[b - 1])
        seen = np.arange(last + 1)  # (n_keys,) positions 0..last of the sequence
        table = block_tables[row_seq[a]]
        slots = table[seen // KV_BLOCK] * KV_BLOCK + seen % KV_BLOCK
        keys, values = k_cache[:, slots], v_cache[:, slots]  # (n_kv_head, n_keys, hd)
        out[a:b] = attention_ref(q[a:b], keys, values, p0, window, scale, softcap)
        a = b
    return out


def kv_store_ref(k_cache, v_cache, slots, k, v) -> None:
    """Write this step's keys and values into the paged cache, in place: row t of k, v
    (n, n_kv_head, hd) goes to slot slots[t] (n,) of k_cache, v_cache (n_kv_head, n_slots, hd)."""
    k_cache[:, slots] = k.transpose(1, 0, 2)
    v_cache[:, slots] = v.transpose(1, 0, 2)


@njit
def kv_store(k_cache, v_cache, slots, k, v):
    """Numba twin of `kv_store_ref` (NumPy's scattered assignment costs ~50 us a layer)."""
    n, n_kv, hd = k.shape
    for t in range(n):
        slot = slots[t]
        for h in range(n_kv):
            for e in range(hd):
                k_cache[h, slot, e] = k[t, h, e]
                v_cache[h, slot, e] = v[t, h, e]


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits` (a bitcast; LLVM vectorizes it)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", error_model="numpy")
def _exp(x):
    """float32 e^x for x <= 0 (softmax weights), branch-free so loops vectorize.

    math.exp is a scalar libm call per score. Cephes' expf: x = n ln2 + r with |r| <= ln2/2,
    e^r by a degree-7 polynomial, times 2^n built from its exponent bits; below -87 it
    flushes to ~1e-38 instead of 0 (no weight that small matters). Max relative error
    ~3e-7 (tests/kernels/test_norms_attention.py).
    """
    x = max(x, np.float32(-87.0))
    n = -np.int32(np.float32(0.5) - x * np.float32(1.4426950408889634))  # round(x / ln2)
    nf = np.float32(n)
    r = x - nf * np.float32(0.693359375) - nf * np.float32(-2.12194440e-4)  # ln2 in two parts
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1)
    return p * _f32_from_bits((n + np.int32(127)) << np.int32(23))


# --- LLVM IR shared by the intrinsics below (16 float32 lanes: one AVX-512 register) ---------

_F32X16 = ir.VectorType(ir.FloatType(), 16)
_I32, _I64 = ir.IntType(32), ir.IntType(64)


def _vec_ptr(builder, base, index):
    """`(<16 x float>*) (base + index)` for a float* base and an i64 element index."""
    return builder.bitcast(builder.gep(base, [index]), _F32X16.as_pointer())


def _fma16(builder):
    """LLVM's fused multiply-add on 16 floats (one rounding per lane)."""
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_F32X16, [_F32X16] * 3), "llvm.fma.v16f32")


def _splat16(builder, scalar):
    """A float broadcast to the 16 lanes."""
    v = builder.insert_element(ir.Constant(_F32X16, ir.Undefined), scalar, _I32(0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), None))


# The three passes of one (row, kv head) job, as functions of their own: LLVM vectorizes
# their loops over head_dim only outside the parallel loop's body.


def _make_block_scores(n_vec: int):
    """An intrinsic `out[j + i] = qs . vc[slot0 + i]` for i < run <= 16: one query head's
    scores against up to 16 consecutive keys (hd = 16 * n_vec floats each), keys in the lanes.

    Per key, the products of one 16-float slice of the head sit in the 16 lanes of a register,
    summed over the n_vec slices by fused multiply-adds; the 16 keys' registers are then summed
    across their lanes all at once by a tree of shuffles and adds (16 keys x 16 lanes -> 16
    sums in 15 steps), where a scalar loop would pay a horizontal sum per key. Lanes past
    `run` are computed from key 0 again and not stored (a masked store). Each score is the
    same sum in the same order whatever the other lanes hold, so a row's numbers do not
    depend on the batch it is in."""
    f32x16, i32, i64 = _F32X16, _I32, _I64

    @intrinsic
    def block_scores(typingctx, qs, kc, slot0, run, out, j):
        if not all(a.layout == "C" for a in (qs, kc, out)):
            return None  # the pointer arithmetic below needs contiguous rows
        sig = types.void(qs, kc, slot0, run, out, j)

        def codegen(context, builder, signature, args):
            qs_, kc_, slot0_, run_, out_, j_ = args
            tys = signature.args

            def data(arr, ty):
                return context.make_array(ty)(context, builder, arr).data

            qp, kp, op = data(qs_, tys[0]), data(kc_, tys[1]), data(out_, tys[4])
            slot0_ = context.cast(builder, slot0_, tys[2], types.int64)
            run_ = context.cast(builder, run_, tys[3], types.int64)
            j_ = context.cast(builder, j_, tys[5], types.int64)
            fma = _fma16(builder)

            def vec_at(base, index):  # <16 x float> at float index
                return builder.load(_vec_ptr(builder, base, index), align=4)

            q = [vec_at(qp, i64(16 * v)) for v in range(n_vec)]
            hd = i64(16 * n_vec)

            def products(i):  # lane e: sum over v of q[16v + e] * key_i[16v + e]
                valid = builder.icmp_signed("<", i64(i), run_)
                row = builder.mul(builder.add(slot0_, builder.select(valid, i64(i), i64(0))), hd)
                acc = builder.fmul(q[0], vec_at(kp, row))
                for v in range(1, n_vec):
                    acc = builder.call(fma, [q[v], vec_at(kp, builder.add(row, i64(16 * v))),
                                             acc])
                return acc

            def combine(x, y, width):  # x, y: 16/width keys x width partial sums each
                half = width // 2
                lo, hi = [], []
                for base in (0, 16):  # lanes of x, then of y
                    for k in range(16 // width):
                        lo += [base + k * width + e for e in range(half)]
                        hi += [base + k * width + half + e for e in range(half)]
                mask = ir.VectorType(i32, 16)
                a = builder.shuffle_vector(x, y, ir.Constant(mask, [i32(i) for i in lo]))
                b = builder.shuffle_vector(x, y, ir.Constant(mask, [i32(i) for i in hi]))
                return builder.fadd(a, b)

            # a binary counter of partial trees: at most one pending tree per width
            stack = []  # (width, vector): keys in order, `width` partials per key
            for i in range(16):
                item = (16, products(i))
                while stack and stack[-1][0] == item[0]:
                    width, left = stack.pop()
                    item = (width // 2, combine(left, item[1], width))
                stack.append(item)
            (_, sums), = stack  # key i's score in lane i
            lanes = ir.Constant(ir.VectorType(i64, 16), [i64(i) for i in range(16)])
            store_mask = builder.icmp_signed(
                "<", lanes, builder.shuffle_vector(
                    builder.insert_element(ir.Constant(ir.VectorType(i64, 16), ir.Undefined),
                                           run_, i32(0)),
                    ir.Constant(ir.VectorType(i64, 16), ir.Undefined),
                    ir.Constant(ir.VectorType(i32, 16), None)))
            masked_store = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [f32x16, f32x16.as_pointer(), i32,
                                                ir.VectorType(ir.IntType(1), 16)]),
                "llvm.masked.store.v16f32.p0v16f32")
            target = builder.bitcast(builder.gep(op, [j_]), f32x16.as_pointer())
            builder.call(masked_store, [sums, target, i32(4), store_mask])
            return context.get_dummy_value()

        return sig, codegen

    return block_scores


# head sizes with a vectorized score pass (16 floats a register); others use the loops
_block_scores_64 = _make_block_scores(4)
_block_scores_96 = _make_block_scores(6)
_block_scores_128 = _make_block_scores(8)
_block_scores_256 = _make_block_scores(16)


@njit(error_model="numpy")
def _scores(q, kc, table, lo, n_keys, scale, scores):
    """scores (group, n_keys) = scale * q (group, hd) . the keys at positions lo.. of one
    sequence, read from kc (slots, hd) block by block (a block's slots are contiguous)."""
    group, hd = q.shape
    qs = np.empty((group, hd), np.float32)
    for g in range(group):
        for e in range(hd):
            qs[g, e] = q[g, e] * np.float32(scale)
    vectorized = hd in (64, 96, 128, 256)
    j = 0
    while j < n_keys:
        pos = lo + j
        block = pos // KV_BLOCK
        first = pos - block * KV_BLOCK
        run = min(KV_BLOCK - first, n_keys - j)  # keys of this block in range
        slot0 = table[block] * KV_BLOCK + first
        if vectorized:
            for g in range(group):
                if hd == 64:
                    _block_scores_64(qs[g], kc, slot0, run, scores[g], j)
                elif hd == 128:
                    _block_scores_128(qs[g], kc, slot0, run, scores[g], j)
                elif hd == 256:
                    _block_scores_256(qs[g], kc, slot0, run, scores[g], j)
                else:
                    _block_scores_96(qs[g], kc, slot0, run, scores[g], j)
        else:
            for i in range(run):
                key = kc[slot0 + i]
                for g in range(group):
                    s = np.float32(0)
                    for e in range(hd):
                        s += qs[g, e] * key[e]
                    scores[g, j + i] = s
        j += run


@njit(error_model="numpy")
def _softmax(scores, total):
    """Each row of scores (group, n_keys) -> exp(score - max) in place; total (group,) their
    sums."""
    group, n_keys = scores.shape
    for g in range(group):
        row = scores[g]
        best = row[0]
        for j in range(1, n_keys):
            best = max(best, row[j])
        t = np.float32(0)
        for j in range(n_keys):
            w = _exp(row[j] - best)
            row[j] = w
            t += w
        total[g] = t


@njit(error_model="numpy")
def _weighted_values(weights, vc, table, lo, acc):
    """acc (group, hd) = weights (group, n_keys) @ the values at positions lo.. (vc (slots,
    hd)), block by block as in `_scores`."""
    group, n_keys = weights.shape
    acc[:] = 0
    j = 0
    while j < n_keys:
        pos = lo + j
        block = pos // KV_BLOCK
        first = pos - block * KV_BLOCK
        run = min(KV_BLOCK - first, n_keys - j)
        slot0 = table[block] * KV_BLOCK + first
        for i in range(run):
            value = vc[slot0 + i]
            for g in range(group):
                w = weights[g, j + i]
                row = acc[g]
                for e in range(value.shape[0]):
                    row[e] += w * value[e]
        j += run


@pnjit(error_model="numpy")
def paged_attention(q, k_cache, v_cache, block_tables, row_seq, positions, window, scale, out):
    """Numba twin of `paged_attention_ref`, writing out (n, n_head * hd).

    One parallel job per (query row, kv head): the `group` query heads that read the same kv
    head share each key and value load. Per job: scores over the visible keys, softmax, the
    weighted sum of the value rows (two passes over the keys, a block of the cache at a time).
    Every number a row gets is computed by the same loops whatever else is in the batch, so a
    sequence's output does not depend on which sequences share its forward pass, nor on how
    its prompt was chunked.
    """
    n, n_head, hd = q.shape
    n_kv = k_cache.shape[0]
    group = n_head // n_kv
    for job in prange(n * n_kv):
        t, kv = job // n_kv, job % n_kv
        p = positions[t]
        lo = max(0, p - window + 1) if window > 0 else 0
        n_keys = p + 1 - lo
        table = block_tables[row_seq[t]]
        scores = np.empty((group, n_keys), np.float32)
        total = np.empty(group, np.float32)
        acc = np.empty((group, hd), np.float32)
        _scores(q[t, kv * group:(kv + 1) * group], k_cache[kv], table, lo, n_keys, scale,
                scores)
        _softmax(scores, total)
        _weighted_values(scores, v_cache[kv], table, lo, acc)
        for g in range(group):
            inv = np.float32(1) / total[g]
            h = kv * group + g
            for e in range(hd):
                out[t, h * hd + e] = acc[g, e] * inv


@pnjit
def paged_attention_softcap(q, k_cache, v_cache, block_tables, row_seq, positions, window,
                            scale, softcap, out):
    """Numba twin of `paged_attention_ref` with `softcap` > 0 (gemma2): `paged_attention`
    with each scaled score s replaced by softcap * tanh(s / softcap) before the softmax. A
    kernel of its own so that the models without soft-capping keep theirs as it is."""
    n, n_head, hd = q.shape
    n_kv = k_cache.shape[0]
    group = n_head // n_kv
    cap = np.float32(softcap)
    for job in prange(n * n_kv):
        t, kv = job // n_kv, job % n_kv
        p = positions[t]
        lo = max(0, p - window + 1) if window > 0 else 0
        n_keys = p + 1 - lo
        table = block_tables[row_seq[t]]
        qs = np.empty((group, hd), np.float32)
        for g in range(group):
            for e in range(hd):
                qs[g, e] = q[t, kv * group + g, e] * np.float32(scale)
        scores = np.empty((group, n_keys), np.float32)
        for j in range(n_keys):
            pos = lo + j
            slot = table[pos // KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK
            for g in range(group):
                s = np.float32(0)
                for e in range(hd):
                    s += qs[g, e] * k_cache[kv, slot, e]
                scores[g, j] = cap * np.float32(math.tanh(s / cap))
        total = np.zeros(group, np.float32)
        for g in range(group):
            best = scores[g].max()
            for j in range(n_keys):
                w = np.float32(math.exp(scores[g, j] - best))
                scores[g, j] = w
                total[g] += w
        acc = np.zeros((group, hd), np.float32)
        for j in range(n_keys):
            pos = lo + j
            slot = table[pos // KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK
            for g in range(group):
                w = scores[g, j]
                for e in range(hd):
                    acc[g, e] += w * v_cache[kv, slot, e]
        for g in range(group):
            inv = np.float32(1) / total[g]
            h = kv * group + g
            for e in range(hd):
                out[t, h * hd + e] = acc[g, e] * inv


# --- encoder attention (bert): bidirectional, several sequences packed back to back -------------


def encoder_attention_ref(qkv, starts, scale: float) -> np.ndarray:
    """Bidirectional attention within each sequence of a packed batch.

    qkv (n, 3, n_head, hd) float32 is the fused q|k|v projection of B sequences back to back:
    sequence s is rows starts[s] .. starts[s+1] - 1 (starts (B+1,) int, starts[0] = 0,
    starts[B] = n). A query sees every key of its own sequence and none of the others: the
    same result as padding each sequence to the longest and masking the padded keys, without
    computing the padding. Returns (n, n_head * hd).
    """
    n, _, n_head, hd = qkv.shape
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (n, n_head, hd) each
    out = np.empty((n, n_head, hd), np.float32)
    for s in range(len(starts) - 1):
        a, b = int(starts[s]), int(starts[s + 1])
        for h in range(n_head):
            scores = (q[a:b, h, :] @ k[a:b, h, :].T) * scale  # (len, len)
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            weights /= weights.sum(axis=-1, keepdims=True)
            out[a:b, h, :] = weights @ v[a:b, h, :]  # (len, hd)
    return out.reshape(n, n_head * hd)


@njit
def encoder_attention(qkv, starts, scale, out):
    """Numba twin of `encoder_attention_ref`, writing out (n, n_head * hd).

    One job per (sequence, head); sentences are short, so a job's keys and values stay in
    cache: for each query, scores over its sequence, softmax, weighted sum of values. The
    q, k, v rows are read in place from the contiguous qkv (no copies). Single-threaded on
    purpose: encoders get their parallelism from whole sentences run on separate threads
    (engine.llm), which needs no OpenMP pool spinning between the BLAS calls.
    """
    n, _, n_head, hd = qkv.shape
    n_seq = starts.shape[0] - 1
    for job in range(n_seq * n_head):
        s, h = job // n_head, job % n_head
        a, b = starts[s], starts[s + 1]
        scores = np.empty(b - a, np.float32)  # (len,)
        acc = np.empty(hd, np.float32)
        for i in range(a, b):
            best = np.float32(-np.inf)
            for j in range(a, b):
                t = np.float32(0)
                for e in range(hd):
                    t += qkv[i, 0, h, e] * qkv[j, 1, h, e]
                t *= np.float32(scale)
                scores[j - a] = t
                best = max(best, t)
            total = np.float32(0)
            for j in range(b - a):
                p = np.float32(math.exp(scores[j] - best))
                scores[j] = p
                total += p
            acc[:] = 0
            for j in range(a, b):
                p = scores[j - a]
                for e in range(hd):
                    acc[e] += p * qkv[j, 2, h, e]
            inv = np.float32(1) / total
            for e in range(hd):
                out[i, h * hd + e] = acc[e] * inv


# --- prefill: the same maths per row, the value pass with its sums in registers -----------------


def _make_accumulate_heads(n_heads: int, n_vec: int = 4):
    """An intrinsic `acc[g0 + h, col:col + 16 n_vec] += sum_i w[g0 + h, w_off + i] *
    vc[slot0 + i, col:col + 16 n_vec]` over i < run, for the `n_heads` query heads from g0
    that read one kv head: each value slice loaded once for all of them, their n_vec x n_heads
    sums held in registers across the keys (up to 16 independent FMA chains, where one head
    alone waits on 4; and no read and write back of acc per key). Key by key in order, one
    fused multiply-add per element and key: the very roundings of `_weighted_values`."""
    f32x16, i64 = _F32X16, _I64

    @intrinsic
    def accumulate(typingctx, acc, w, w_off, vc, slot0, run, g0, col):
        if not all(a.layout == "C" for a in (acc, w, vc)):
            return None  # the pointer arithmetic below needs contiguous rows
        sig = types.void(acc, w, w_off, vc, slot0, run, g0, col)

        def codegen(context, builder, signature, args):
            tys = signature.args
            acc_, w_, vc_ = args[0], args[1], args[3]
            w_off_, slot0_, run_, g0_, col_ = (
                context.cast(builder, args[i], tys[i], types.int64) for i in (2, 4, 5, 6, 7))
            acc_arr = context.make_array(tys[0])(context, builder, acc_)
            w_arr = context.make_array(tys[1])(context, builder, w_)
            vc_arr = context.make_array(tys[3])(context, builder, vc_)
            hd = builder.extract_value(acc_arr.shape, 1)
            n_keys = builder.extract_value(w_arr.shape, 1)
            accp, wp, vcp = acc_arr.data, w_arr.data, vc_arr.data
            fma = _fma16(builder)

            heads = [builder.add(g0_, i64(h)) for h in range(n_heads)]
            acc_at = [[builder.add(builder.add(builder.mul(g, hd), col_), i64(16 * v))
                       for v in range(n_vec)] for g in heads]
            sums = []
            for h in range(n_heads):
                row = []
                for v in range(n_vec):
                    slot = cgutils.alloca_once(builder, f32x16)
                    builder.store(builder.load(_vec_ptr(builder, accp, acc_at[h][v]), align=4),
                                  slot)
                    row.append(slot)
                sums.append(row)
            w_rows = [builder.add(builder.mul(g, n_keys), w_off_) for g in heads]
            with cgutils.for_range(builder, run_) as loop:
                i = loop.index
                row = builder.add(builder.mul(builder.add(slot0_, i), hd), col_)
                values = [builder.load(_vec_ptr(builder, vcp, builder.add(row, i64(16 * v))),
                                       align=4) for v in range(n_vec)]
                for h in range(n_heads):
                    wv = _splat16(builder, builder.load(builder.gep(wp, [builder.add(w_rows[h],
                                                                                      i)])))
                    for v in range(n_vec):
                        builder.store(builder.call(fma, [wv, values[v],
                                                         builder.load(sums[h][v])]),
                                      sums[h][v])
            for h in range(n_heads):
                for v in range(n_vec):
                    builder.store(builder.load(sums[h][v]),
                                  _vec_ptr(builder, accp, acc_at[h][v]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return accumulate


# up to 4 query heads of one kv head at a time, 64 floats of each (head sizes 64, 128, 256)
_accumulate_heads_1 = _make_accumulate_heads(1)
_accumulate_heads_2 = _make_accumulate_heads(2)
_accumulate_heads_3 = _make_accumulate_heads(3)
_accumulate_heads_4 = _make_accumulate_heads(4)
# head size 96: one head at a time, all 96 floats
_accumulate_96 = _make_accumulate_heads(1, 6)


@njit(error_model="numpy")
def _weighted_values_prefill(weights, vc, table, lo, acc):
    """`_weighted_values`, bit for bit (each sum over the keys in the same order, one FMA a
    key), with the sums kept in registers over a block's keys: for head sizes that are a
    multiple of 64, up to 4 query heads at a time (`_accumulate_heads_*`); 96, one head at a
    time; other sizes run `_weighted_values` itself."""
    group, n_keys = weights.shape
    hd = acc.shape[1]
    heads = hd % 64 == 0
    if not heads and hd != 96:
        _weighted_values(weights, vc, table, lo, acc)
        return
    acc[:] = 0
    j = 0
    while j < n_keys:
        pos = lo + j
        block = pos // KV_BLOCK
        first = pos - block * KV_BLOCK
        run = min(KV_BLOCK - first, n_keys - j)
        slot0 = table[block] * KV_BLOCK + first
        if heads:
            for col in range(0, hd, 64):
                for g0 in range(0, group, 4):
                    left = group - g0
                    if left >= 4:
                        _accumulate_heads_4(acc, weights, j, vc, slot0, run, g0, col)
                    elif left == 3:
                        _accumulate_heads_3(acc, weights, j, vc, slot0, run, g0, col)
                    elif left == 2:
                        _accumulate_heads_2(acc, weights, j, vc, slot0, run, g0, col)
                    else:
                        _accumulate_heads_1(acc, weights, j, vc, slot0, run, g0, col)
        else:
            for g in range(group):
                _accumulate_96(acc, weights, j, vc, slot0, run, g, 0)
        j += run


@pnjit(error_model="numpy")
def paged_attention_prefill(q, k_cache, v_cache, block_tables, row_seq, positions, window, scale,
                            out):
    """`paged_attention` for many rows (prefill), bit for bit the same numbers per row: the
    value pass is `_weighted_values_prefill`. Separate so that the decode kernel stays as it
    is; `FastBackend.attention` picks this one from PREFILL_ROWS rows."""
    _prefill_jobs(q, k_cache, v_cache, block_tables, row_seq, positions, window, scale, out)


@njit(inline="always", error_model="numpy")
def _prefill_jobs(q, k_cache, v_cache, block_tables, row_seq, positions, window, scale, out):
    """The body of `paged_attention_prefill`, inlined where it is called: a parallel loop of
    the caller's own (kernels/decode_layer.py runs every row of a layer through it)."""
    n, n_head, hd = q.shape
    n_kv = k_cache.shape[0]
    group = n_head // n_kv
    for job in prange(n * n_kv):
        t, kv = job // n_kv, job % n_kv
        p = positions[t]
        lo = max(0, p - window + 1) if window > 0 else 0
        n_keys = p + 1 - lo
        table = block_tables[row_seq[t]]
        scores = np.empty((group, n_keys), np.float32)
        total = np.empty(group, np.float32)
        acc = np.empty((group, hd), np.float32)
        _scores(q[t, kv * group:(kv + 1) * group], k_cache[kv], table, lo, n_keys, scale,
                scores)
        _softmax(scores, total)
        _weighted_values_prefill(scores, v_cache[kv], table, lo, acc)
        for g in range(group):
            inv = np.float32(1) / total[g]
            h = kv * group + g
            for e in range(hd):
                out[t, h * hd + e] = acc[g, e] * inv


PREFILL_ROWS = 16  # rows from which FastBackend.attention uses paged_attention_prefill
