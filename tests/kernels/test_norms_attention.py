"""What the twin table (test_twins.py) does not check: in-place calls, cache views, and the
NumPy twins themselves on cases whose answer is known."""

import numpy as np

from kernels import attention, norms

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


FREQS = norms.rope_inv_freq(10000.0, 64)  # plain RoPE, head_dim 64


def test_rope_in_place():
    x, pos = randn(7, 3, 64), np.array([0, 1, 2, 50, 51, 1000, 8191])
    table = norms.rope_table_ref(pos, norms.rope_inv_freq(10000.0, 64))
    for neox in (False, True):
        out = np.empty_like(x)
        norms.rope(x, table, neox, out)
        y = x.copy()
        norms.rope(y, table, neox, y)  # out = x
        np.testing.assert_array_equal(y, out)


def test_rope_table_rows_do_not_depend_on_the_batch():
    """A row's angles are the same computed with other rows or alone (batching contract)."""
    pos = np.array([3, 700, 41, 8000])
    both = np.empty((4, 2, 32), np.float32)
    norms.rope_table(pos, FREQS, 1.0, both)
    for i in range(4):
        alone = np.empty((1, 2, 32), np.float32)
        norms.rope_table(pos[i:i + 1], FREQS, 1.0, alone)
        np.testing.assert_array_equal(both[i], alone[0])


def test_paged_attention_reads_the_blocks_of_its_own_sequence():
    """The twin's gather: keys spread over shuffled blocks give what contiguous keys give."""
    block = attention.KV_BLOCK
    k, v = randn(3, 40, 64), randn(3, 40, 64)  # one sequence, 40 positions, contiguous
    q = randn(2, 9, 64)  # its positions 38 and 39
    order = [4, 0, 2]  # the sequence's blocks, in position order
    k_cache, v_cache = randn(3, 5 * block, 64), randn(3, 5 * block, 64)  # other blocks: noise
    for i, b in enumerate(order):
        n = min(block, 40 - i * block)
        k_cache[:, b * block:b * block + n] = k[:, i * block:i * block + n]
        v_cache[:, b * block:b * block + n] = v[:, i * block:i * block + n]
    tables, rows = np.array([order], np.int32), np.zeros(2, np.int32)
    got = attention.paged_attention_ref(q, k_cache, v_cache, tables, rows, np.array([38, 39]),
                                        0, 0.125)
    np.testing.assert_allclose(got, attention.attention_ref(q, k, v, 38, 0, 0.125), rtol=1e-6)


# --- bert: LayerNorm, erf GELU, encoder attention -------------------------------------------------


def test_add_layer_norm_in_place():
    x, y, w, b = randn(5, 97), randn(5, 97) * 10, randn(97), randn(97)
    ref = norms.add_layer_norm_ref(x, y, w, b, 1e-5)
    norms.add_layer_norm(x, y, w, b, 1e-5, x)  # out = x, as the fast backend calls it
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-5)


def test_gelu_is_erf_not_tanh():
    assert abs(float(norms.gelu_ref(np.float32([[1.0]]))[0, 0]) - 0.8413447) < 1e-6  # Phi(1)


def test_encoder_attention_sees_only_its_own_sequence():
    """Same as running each sequence alone, i.e. padding plus a key mask."""
    qkv = randn(6, 3, 2, 8)
    both = attention.encoder_attention_ref(qkv, np.array([0, 2, 6]), 0.5)
    first = attention.encoder_attention_ref(qkv[:2], np.array([0, 2]), 0.5)
    second = attention.encoder_attention_ref(qkv[2:], np.array([0, 4]), 0.5)
    np.testing.assert_allclose(both, np.concatenate([first, second]), rtol=1e-6)
    # and bidirectional: the first query already sees the last value of its sequence
    changed = qkv.copy()
    changed[5, 2] += 1
    after = attention.encoder_attention_ref(changed, np.array([0, 2, 6]), 0.5)
    assert not np.allclose(after[2], both[2]) and np.allclose(after[:2], both[:2])
