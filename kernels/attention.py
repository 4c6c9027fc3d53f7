"""Attention: causal grouped-query attention over the KV cache (prefill and decode alike), and
bidirectional attention over packed sequences for encoders (bert).

Causal: query i of the n new tokens sits at position pos0 + i and sees keys at positions
max(0, pos0 + i - window + 1) .. pos0 + i (`window` <= 0: no window). Head h reads kv head
h // (n_head // n_kv_head). Encoder: see `encoder_attention_ref`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kernels.jit import njit, pnjit


def attention_ref(q, k, v, pos0: int, window: int, scale: float) -> np.ndarray:
    """q (n, n_head, hd); k, v (n_kv_head, n_keys, hd) float32 -> (n, n_head * hd)."""
    n, n_head, hd = q.shape
    n_kv_head, n_keys, _ = k.shape
    group = n_head // n_kv_head
    q_pos = pos0 + np.arange(n)[:, None]  # (n, 1)
    k_pos = np.arange(n_keys)[None, :]  # (1, n_keys)
    allowed = k_pos <= q_pos
    if window > 0:
        allowed &= k_pos > q_pos - window
    out = np.empty((n, n_head, hd), np.float32)
    for h in range(n_head):
        scores = (q[:, h, :] @ k[h // group].T) * scale  # (n, n_keys)
        scores = np.where(allowed, scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        out[:, h, :] = weights @ v[h // group]  # (n, hd)
    return out.reshape(n, n_head * hd)


@pnjit
def attention(q, k, v, n_keys, pos0, window, scale, out):
    """Numba twin of `attention_ref`, writing out (n, n_head * hd).

    k, v may be longer buffers `(n_kv_head, capacity, hd)` (the cache itself, so they stay
    C-contiguous and the inner loops vectorize); only their first `n_keys` positions are read.
    One parallel job per (query, head): scores over its visible keys, softmax, weighted sum of
    the value rows (two passes over the keys, no online rescaling). Meant for decode (a few
    queries); `attention_blas` is faster for prefill.
    """
    n, n_head, hd = q.shape
    group = n_head // k.shape[0]
    for job in prange(n * n_head):
        i, h = job // n_head, job % n_head
        kv = h // group
        qpos = pos0 + i
        hi = min(qpos + 1, n_keys)
        lo = max(0, qpos - window + 1) if window > 0 else 0
        qh = q[i, h] * np.float32(scale)  # (hd,)
        scores = np.empty(hi - lo, np.float32)  # (visible keys,)
        for j in range(lo, hi):
            s = np.float32(0)
            for e in range(hd):
                s += qh[e] * k[kv, j, e]
            scores[j - lo] = s
        best = scores.max()
        total = np.float32(0)
        for j in range(hi - lo):
            scores[j] = math.exp(scores[j] - best)
            total += scores[j]
        acc = np.zeros(hd, np.float32)
        for j in range(lo, hi):
            p = scores[j - lo]
            for e in range(hd):
                acc[e] += p * v[kv, j, e]
        inv = np.float32(1) / total
        for e in range(hd):
            out[i, h * hd + e] = acc[e] * inv


def attention_blas(q, k, v, n_keys: int, pos0: int, window: int, scale: float, out) -> None:
    """Prefill: the same maths as `attention`, one BLAS matmul per kv head for its query heads.

    For many queries the (n * group, hd) @ (hd, n_keys) products dominate, and BLAS beats a
    per-key Numba loop by ~5x. Writes out (n, n_head * hd).
    """
    n, n_head, hd = q.shape
    n_kv_head = k.shape[0]
    group = n_head // n_kv_head
    q_pos = pos0 + np.arange(n)[:, None]  # (n, 1)
    k_pos = np.arange(n_keys)[None, :]  # (1, n_keys)
    hidden = k_pos > q_pos
    if window > 0:
        hidden |= k_pos <= q_pos - window
    out3 = out.reshape(n, n_head, hd)
    for kv in range(n_kv_head):
        qg = q[:, kv * group : (kv + 1) * group, :] * np.float32(scale)  # (n, group, hd)
        scores = qg.reshape(n * group, hd) @ k[kv, :n_keys].T  # (n * group, n_keys)
        scores = scores.reshape(n, group, n_keys)
        scores[np.broadcast_to(hidden[:, None, :], scores.shape)] = -np.inf
        scores -= scores.max(axis=2, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=2, keepdims=True)
        out3[:, kv * group : (kv + 1) * group, :] = scores @ v[kv, :n_keys]  # (n, group, hd)


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
