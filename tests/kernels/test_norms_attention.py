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
