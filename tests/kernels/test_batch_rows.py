"""The batching contract at kernel level: row i of a batched call is bit for bit the row
computed alone. The scheduler relies on it (a sequence's tokens must not depend on what else
is in the step; tests/engine/test_scheduler.py checks that end to end)."""

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q

from kernels import attention, jit, norms, qmatmul
from kernels.qpack import repack
from kernels.testing import random_tensor

RNG = np.random.default_rng(14)
BLOCK = attention.KV_BLOCK


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def each_row_alone(run, x):
    """run(x[i:i+1]) for every row i, stacked."""
    return np.concatenate([run(x[i:i + 1]) for i in range(len(x))])


@pytest.mark.parametrize("window", [0, 20])
def test_paged_attention_rows(window):
    """Rows of four sequences (three decoding, one prefilling five positions) over shuffled
    blocks: each row equals that row's query run alone at its position."""
    n_kv, group, hd = 3, 3, 64
    k_cache, v_cache = randn(n_kv, 24 * BLOCK, hd), randn(n_kv, 24 * BLOCK, hd)
    tables = RNG.permutation(24).astype(np.int32).reshape(4, 6)  # (B, blocks), shuffled
    row_seq = np.array([0, 1, 2, 3, 3, 3, 3, 3], np.int32)
    positions = np.array([5, 40, 95, 30, 31, 32, 33, 34])
    q = randn(len(positions), n_kv * group, hd)

    def run(q, tables, row_seq, positions):
        out = np.empty((len(q), n_kv * group * hd), np.float32)
        attention.paged_attention(q, k_cache, v_cache, tables, row_seq, positions, window,
                                  0.125, out)
        return out

    batched = run(q, tables, row_seq, positions)
    for i in range(len(q)):
        alone = run(q[i:i + 1], tables[row_seq[i]:row_seq[i] + 1], np.zeros(1, np.int32),
                    positions[i:i + 1])
        np.testing.assert_array_equal(batched[i], alone[0])
    ref = attention.paged_attention_ref(q, k_cache, v_cache, tables, row_seq, positions,
                                        window, 0.125)
    np.testing.assert_allclose(batched, ref, rtol=1e-4, atol=1e-5)


# 80: no register-held value pass, the loops; groups of 3 and 6 (4 + 2) query heads per kv head
@pytest.mark.parametrize("hd, group", [(256, 4), (64, 4), (80, 4), (64, 3), (128, 6), (96, 2)])
@pytest.mark.parametrize("window", [0, 20])
def test_paged_attention_prefill_is_the_decode_kernel(window, hd, group):
    """The prefill kernel gives every row the very numbers of `paged_attention` (so a prompt's
    result does not depend on how it was chunked, nor on which kernel ran each chunk)."""
    n_kv = 1
    k_cache, v_cache = randn(n_kv, 24 * BLOCK, hd), randn(n_kv, 24 * BLOCK, hd)
    tables = RNG.permutation(24).astype(np.int32).reshape(2, 12)
    row_seq = np.array([0] * 40 + [1] * 3, np.int32)  # a prefill chunk, and a short one
    positions = np.concatenate([np.arange(150, 190), np.arange(7, 10)])
    q = randn(len(positions), n_kv * group, hd)
    outs = []
    for kernel in (attention.paged_attention, attention.paged_attention_prefill):
        out = np.empty((len(q), n_kv * group * hd), np.float32)
        kernel(q, k_cache, v_cache, tables, row_seq, positions, window, 0.0625, out)
        outs.append(out)
    np.testing.assert_array_equal(outs[1], outs[0])


def test_exp_matches_numpy():
    x = np.linspace(-80, 0, 20001, dtype=np.float32)
    scores = x.reshape(1, -1).copy()
    total = np.empty(1, np.float32)
    attention._softmax(scores, total)  # max is 0: the weights are exp(x)
    want = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(scores[0], want, rtol=5e-7, atol=0)


FREQS = norms.rope_inv_freq(10000.0, 64)  # plain RoPE, head_dim 64


def test_rope_rows():
    positions = np.array([0, 7, 300, 8191, 12])
    x = randn(5, 9, 64)
    table = np.empty((5, 2, 32), np.float32)
    norms.rope_table(positions, FREQS, 1.0, table)

    def run(idx):
        t = np.empty((len(idx), 2, 32), np.float32)
        norms.rope_table(positions[idx], FREQS, 1.0, t)
        out = np.empty((len(idx), 9, 64), np.float32)
        norms.rope(x[idx], t, False, out)
        return out

    batched = run(np.arange(5))
    for i in range(5):
        np.testing.assert_array_equal(batched[i], run(np.array([i]))[0])


def test_rms_norm_and_gate_rows():
    x, w = randn(8, 576) * 3, randn(576)

    def norm(x):
        out = np.empty_like(x)
        norms.rms_norm(x, w, 1e-5, out)
        return out

    np.testing.assert_array_equal(norm(x), each_row_alone(norm, x))
    gate, up = randn(8, 1536) * 4, randn(8, 1536)
    out = np.empty_like(gate)
    norms.silu_gate(gate, up, out)
    for i in range(8):
        alone = np.empty((1, 1536), np.float32)
        norms.silu_gate(gate[i:i + 1], up[i:i + 1], alone)
        np.testing.assert_array_equal(out[i], alone[0])


@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("n", [8, 40])  # 40: the parallel quantizer (16 rows per task)
def test_quantize_rows(n, terms):
    x = randn(n, 576) * 5
    x[1, :64] = 0  # an all-zero block

    def run(x):
        m = len(x)
        xq = np.empty((terms * m, 576), np.int8)
        xd, xs = np.empty((m, 18), np.float32), np.empty((m, 36), np.float32)
        (qmatmul.quantize_activations_parallel if m >= 32 else
         qmatmul.quantize_activations)(x, xq, xd, xs)
        return xq, xd, xs

    xq, xd, xs = run(x)
    want = qmatmul.quantize_activations_ref(x, terms)
    for got, ref in zip((xq, xd, xs), want):
        np.testing.assert_array_equal(got, ref)
    for i in range(n):
        aq, ad, a_s = run(x[i:i + 1])
        np.testing.assert_array_equal(xq[i], aq[0])
        if terms == 2:
            np.testing.assert_array_equal(xq[n + i], aq[1])
        np.testing.assert_array_equal(xd[i], ad[0])
        np.testing.assert_array_equal(xs[i], a_s[0])


ISAS = ["generic"] + (["vnni", "vnni-serial"] if jit.HAS_INT8_DOT else [])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q6_K, Q.Q5_0], ids=lambda q: q.name)
# VNNI tiles (a pair of groups): 8, 8+4+1, 4+1, 4+2, 2+1 tokens; a lone group: 4+4, 4+4+4+1
@pytest.mark.parametrize("n", [8, 13, 5, 6, 3])
@pytest.mark.parametrize("terms", [1, 2])
def test_matmul_rows(isa, qtype, n, terms):
    """Decode rows in one matmul (VNNI: tiles of eight, four, two and one tokens; 80 rows =
    two pairs of groups and one group alone) give each row what a one-row matmul (a matvec)
    gives, for every layout."""
    w = repack(random_tensor(qtype, (80, 256), seed=3), qtype, (80, 256))
    x = randn(n, 256)
    batched = qmatmul.matmul(x, w, isa=isa, terms=terms)
    for i in range(n):
        np.testing.assert_array_equal(batched[i],
                                      qmatmul.matmul(x[i:i + 1], w, isa=isa, terms=terms)[0])
