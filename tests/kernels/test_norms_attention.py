"""What the twin table (test_twins.py) does not check: in-place calls, cache views, and the
NumPy twins themselves on cases whose answer is known."""

import numpy as np

from kernels import attention, norms

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_rope_in_place():
    x, pos = randn(7, 3, 64), np.array([0, 1, 2, 50, 51, 1000, 8191])
    for neox in (False, True):
        out = np.empty_like(x)
        norms.rope(x, pos, 10000.0, neox, out)
        y = x.copy()
        norms.rope(y, pos, 10000.0, neox, y)  # out = x
        np.testing.assert_array_equal(y, out)


def test_attention_on_cache_view():
    """k, v are usually a prefix view of a bigger preallocated cache."""
    cache_k, cache_v = randn(3, 64, 64), randn(3, 64, 64)
    q = randn(2, 9, 64)
    k, v = cache_k[:, :12], cache_v[:, :12]
    out = np.empty((2, 9 * 64), np.float32)
    attention.attention(q, cache_k, cache_v, 12, 10, 0, 0.125, out)
    np.testing.assert_allclose(
        out, attention.attention_ref(q, k, v, 10, 0, 0.125), rtol=1e-4, atol=1e-5
    )


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
