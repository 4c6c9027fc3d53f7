"""RMSNorm, RoPE, gated activations and attention: each Numba kernel against its NumPy twin."""

import numpy as np
import pytest

from kernels import attention, norms

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_rms_norm():
    x, w = randn(5, 576) * 3, randn(576)
    out = np.empty_like(x)
    norms.rms_norm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, norms.rms_norm_ref(x, w, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neox", [False, True])
def test_rope(neox):
    x, pos = randn(7, 3, 64), np.array([0, 1, 2, 50, 51, 1000, 8191])
    out = np.empty_like(x)
    norms.rope(x, pos, 10000.0, neox, out)
    np.testing.assert_allclose(out, norms.rope_ref(x, pos, 10000.0, neox), rtol=1e-5, atol=1e-5)
    norms.rope(x, pos, 10000.0, neox, x)  # in place
    np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("name", ["silu_gate", "gelu_gate"])
def test_gates(name):
    g, u = randn(3, 1536) * 4, randn(3, 1536)
    g[0, :3] = [-100, 100, 0]
    out = np.empty_like(g)
    getattr(norms, name)(g, u, out)
    ref = getattr(norms, name + "_ref")(g, u)
    # tanh is a rational approximation (abs. error ~1e-7): compare relative to |gate * up|
    np.testing.assert_array_less(np.abs(out - ref), 1e-6 * (1 + np.abs(g * u)))


@pytest.mark.parametrize(
    "n, pos0, window, n_head, n_kv",
    [
        (1, 0, 0, 9, 3),
        (1, 37, 0, 9, 3),
        (6, 0, 0, 4, 1),
        (5, 20, 0, 4, 1),
        (6, 30, 8, 4, 1),
        (1, 40, 16, 4, 2),
    ],
)
@pytest.mark.parametrize("kernel", ["attention", "attention_blas"])
def test_attention(n, pos0, window, n_head, n_kv, kernel):
    hd = 64
    q, k, v = randn(n, n_head, hd), randn(n_kv, pos0 + n, hd), randn(n_kv, pos0 + n, hd)
    out = np.full((n, n_head * hd), np.nan, np.float32)
    getattr(attention, kernel)(q, k, v, pos0 + n, pos0, window, 0.125, out)
    ref = attention.attention_ref(q, k, v, pos0, window, 0.125)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


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


# --- bert: LayerNorm, erf GELU, bias add, encoder attention -------------------------------------


def test_layer_norm_odd_shape():
    x, w, b = randn(7, 383) * 3 + 5, randn(383), randn(383)
    out = np.empty_like(x)
    norms.layer_norm(x, w, b, 1e-12, out)
    np.testing.assert_allclose(out, norms.layer_norm_ref(x, w, b, 1e-12), rtol=1e-4, atol=1e-5)


def test_add_layer_norm_in_place():
    x, y, w, b = randn(5, 97), randn(5, 97) * 10, randn(97), randn(97)
    ref = norms.add_layer_norm_ref(x, y, w, b, 1e-5)
    norms.add_layer_norm(x, y, w, b, 1e-5, x)  # out = x, as the fast backend calls it
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-5)


def test_gelu_is_erf_not_tanh():
    x = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30]]).astype(np.float32)
    x = x.reshape(1, -1)
    out = np.empty_like(x)
    norms.gelu(x, out)
    ref = norms.gelu_ref(x)
    np.testing.assert_array_less(np.abs(out - ref), 2e-7 * (1 + np.abs(x)))
    assert abs(float(norms.gelu_ref(np.float32([[1.0]]))[0, 0]) - 0.8413447) < 1e-6  # Phi(1)


@pytest.mark.parametrize("gelu", [False, True])
def test_add_bias(gelu):
    x, b = randn(3, 1537) * 3, randn(1537)
    out = np.empty_like(x)
    norms.add_bias(x, b, gelu, out)
    ref = norms.add_bias_ref(x, b, gelu)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lengths", [[1], [7], [3, 1, 9, 2], [17, 5]])
def test_encoder_attention(lengths):
    n, n_head, hd = sum(lengths), 3, 24
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    qkv = randn(n, 3, n_head, hd)
    out = np.full((n, n_head * hd), np.nan, np.float32)
    attention.encoder_attention(qkv, starts, 0.2, out)
    ref = attention.encoder_attention_ref(qkv, starts, 0.2)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


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
