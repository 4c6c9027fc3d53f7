"""One decoder layer per kernel call, for every untraced pass on AVX-512 VNNI CPUs.

A decode step runs each layer's ~15 operations on a handful of rows (one per sequence). Run
one by one from Python (`engine/models/llama.py`'s `attention_block` and `ffn_block`), every
operation pays a dispatch into Numba, its allocations and, for the parallel ones, a thread
launch: on 2 cores that was ~10 % of SmolLM2's decode step. `decoder_layer` runs the same
operations with the same kernels, in the same order, from one call:

    h = rms_norm(x, attn_norm)
    q, k, v = h @ [Wq | Wk | Wv].T                      one packed matrix, or three
    q, k = rms_norm(q, q_norm), rms_norm(k, k_norm)     per head; gemma3 only
    q, k = rope(q), rope(k)
    store k, v in the KV cache
    o = attention(q, cache) @ Wo.T
    o = rms_norm(o, post_attention_norm)                gemma3 only
    x = x + o
    h = rms_norm(x, ffn_norm)
    m = (silu or gelu)(h @ Wgate.T) * (h @ Wup.T) @ Wdown.T
    m = rms_norm(m, post_ffw_norm)                      gemma3 only
    x = x + m

The Python model code stays the readable statement of the maths and the path for traced
passes, other CPUs and architectures with more than this. The two agree to float32 rounding,
not bit for bit: Numba compiles the kernels into this function's own code, where LLVM may
contract and vectorize them otherwise than alone (tests/kernels/test_decode_layer.py). So a
model runs *every* untraced pass here, prefill included, never some passes one way and some
the other: a sequence's numbers then do not depend on which sequences share its steps or how
its prompt was chunked (tests/engine/test_scheduler.py).

Weights come as the `kernels.qpack` group streams of up to seven matrices, slots `Q` .. `DOWN`
(`meta[slot]` = layout, block bytes, n_out; n_out = 0 for an empty slot: when q|k|v or
gate|up are stacked into one stream, the stack sits in the first slot of its group).
"""

from __future__ import annotations

import numpy as np

from kernels.attention import _prefill_jobs, kv_store, kv_store_ref, paged_attention_ref
from kernels.jit import njit, pnjit
from kernels.norms import (
    gelu_gate,
    gelu_gate_ref,
    rms_norm,
    rms_norm_ref,
    rope,
    rope_ref,
    silu_gate,
    silu_gate_ref,
)
from kernels.qmatmul import matmul_ref
from kernels.qpack import PackedWeight
from kernels.vnni import linear

Q, K, V, O, GATE, UP, DOWN = range(7)  # weight slots
META_LAYOUT, META_BLOCK_BYTES, META_N_OUT = range(3)  # columns of `meta`


def decoder_layer_ref(x, weights, meta, attn_norm, ffn_norm, q_norm, k_norm, post_attn_norm,
                      post_ffw_norm, shape, eps, gelu, neox, table, k_cache, v_cache, slots,
                      block_tables, row_seq, positions, window, scale, terms):
    """NumPy twin of `decoder_layer` (same arguments; k_cache, v_cache written in place)."""
    n, dim = x.shape
    n_heads, n_kv, hd, ffn = (int(v) for v in shape)
    qd, kvd = n_heads * hd, n_kv * hd

    def linears(h, first, last):  # the slots' products side by side
        ys = []
        for s in range(first, last + 1):
            layout, block_bytes, n_out = (int(v) for v in meta[s])
            if n_out:
                del block_bytes  # implied by the layout
                w = PackedWeight(None, n_out, h.shape[1], layout, data=weights[s])
                ys.append(matmul_ref(h, w, terms))
        return np.concatenate(ys, axis=1)

    def norm(v, weight):
        return rms_norm_ref(v, weight, eps) if weight.size else v

    qkv = linears(rms_norm_ref(x, attn_norm, eps), Q, V)
    q = norm(qkv[:, :qd].reshape(n, n_heads, hd), q_norm)
    k = norm(qkv[:, qd:qd + kvd].reshape(n, n_kv, hd), k_norm)
    v = qkv[:, qd + kvd:].reshape(n, n_kv, hd)
    q, k = rope_ref(q, table, neox), rope_ref(k, table, neox)
    kv_store_ref(k_cache, v_cache, slots, k, v)
    att = paged_attention_ref(q, k_cache, v_cache, block_tables, row_seq, positions, window,
                              scale)
    x = x + norm(linears(att, O, O), post_attn_norm)
    gate_up = linears(rms_norm_ref(x, ffn_norm, eps), GATE, UP)
    act = (gelu_gate_ref if gelu else silu_gate_ref)(gate_up[:, :ffn], gate_up[:, ffn:])
    return x + norm(linears(act, DOWN, DOWN), post_ffw_norm)


@njit(inline="always")
def _linear(x, w, meta_row, terms, out, col):
    """out[:, col : col + n_out] = x (n, n_in) @ W.T for one packed matrix."""
    n_out = meta_row[META_N_OUT]
    y = np.empty((x.shape[0], n_out), np.float32)
    linear(x, w, meta_row[META_LAYOUT], meta_row[META_BLOCK_BYTES], n_out, terms, y)
    out[:, col:col + n_out] = y


@njit(inline="always")
def _linears(x, weights, meta, first, last, terms, out):
    """The matrices of slots first..last side by side into out (n, sum of n_out); a stacked
    group (one matrix) straight into out."""
    used = 0
    for s in range(first, last + 1):
        used += meta[s, META_N_OUT] > 0
    if used == 1:
        m = meta[first]
        linear(x, weights[first], m[META_LAYOUT], m[META_BLOCK_BYTES], m[META_N_OUT], terms, out)
        return
    col = 0
    for s in range(first, last + 1):
        if meta[s, META_N_OUT] > 0:
            _linear(x, weights[s], meta[s], terms, out, col)
            col += meta[s, META_N_OUT]


@njit
def _norm(x, weight, eps):
    """rms_norm of the rows of a contiguous x (n, d) -> a new array."""
    out = np.empty_like(x)
    rms_norm(x, weight, eps, out)
    return out


@pnjit
def decoder_layer(x, weights, meta, attn_norm, ffn_norm, q_norm, k_norm, post_attn_norm,
                  post_ffw_norm, shape, eps, gelu, neox, table, k_cache, v_cache, slots,
                  block_tables, row_seq, positions, window, scale, terms):
    """One layer of a pass: x (n, dim) float32 -> the residual stream after the
    layer (a new array); the rows' keys and values go into k_cache, v_cache (this layer's,
    (n_kv_heads, n_slots, hd)) at `slots` on the way.

    shape = (n_heads, n_kv_heads, head_dim, ffn_dim); the norm weights q_norm, k_norm,
    post_attn_norm, post_ffw_norm are empty arrays where the model has none; `table` is
    the rows' RoPE table (n, 2, hd/2); the rest as in `kernels.attention.paged_attention`.
    """
    n, dim = x.shape
    n_heads, n_kv, hd, ffn = shape[0], shape[1], shape[2], shape[3]
    qd, kvd = n_heads * hd, n_kv * hd
    # attention
    h = _norm(x, attn_norm, eps)
    qkv = np.empty((n, qd + 2 * kvd), np.float32)
    _linears(h, weights, meta, Q, V, terms, qkv)
    q = np.ascontiguousarray(qkv[:, :qd]).reshape(n, n_heads, hd)
    k = np.ascontiguousarray(qkv[:, qd:qd + kvd]).reshape(n, n_kv, hd)
    v = np.ascontiguousarray(qkv[:, qd + kvd:]).reshape(n, n_kv, hd)
    if q_norm.size > 0:  # per-head norms (gemma3)
        q = _norm(q.reshape(n * n_heads, hd), q_norm, eps).reshape(n, n_heads, hd)
        k = _norm(k.reshape(n * n_kv, hd), k_norm, eps).reshape(n, n_kv, hd)
    q_rot = np.empty_like(q)
    k_rot = np.empty_like(k)
    rope(q, table, neox, q_rot)
    rope(k, table, neox, k_rot)
    kv_store(k_cache, v_cache, slots, k_rot, v)
    att = np.empty((n, qd), np.float32)
    # paged_attention_prefill's body, inlined, for every row (one kernel, so a row's numbers do
    # not depend on how many share the pass; and the parallel loop must be this function's
    # own: a cached function that called another parallel one crashed when loaded)
    _prefill_jobs(q_rot, k_cache, v_cache, block_tables, row_seq, positions, window, scale,
                  att)
    o = np.empty((n, dim), np.float32)
    _linears(att, weights, meta, O, O, terms, o)
    if post_attn_norm.size > 0:
        o = _norm(o, post_attn_norm, eps)
    x = x + o
    # feed-forward
    h = _norm(x, ffn_norm, eps)
    gate_up = np.empty((n, 2 * ffn), np.float32)
    _linears(h, weights, meta, GATE, UP, terms, gate_up)
    act = np.empty((n, ffn), np.float32)
    gate = np.ascontiguousarray(gate_up[:, :ffn])
    up = np.ascontiguousarray(gate_up[:, ffn:])
    if gelu:
        gelu_gate(gate, up, act)
    else:
        silu_gate(gate, up, act)
    m = np.empty((n, dim), np.float32)
    _linears(act, weights, meta, DOWN, DOWN, terms, m)
    if post_ffw_norm.size > 0:
        m = _norm(m, post_ffw_norm, eps)
    return x + m
