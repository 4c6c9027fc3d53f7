"""FastBackend against ReferenceBackend (plain NumPy) on the same calls.

Everything but `linear` agrees to float rounding; `linear` rounds the activations per block of
32 (see kernels.qmatmul), so it is held to the looser bound of one 8-bit term instead.
"""

import sys

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q

from engine.backends import get_backend
from engine.backends.fast import FastBackend
from engine.backends.reference import ReferenceBackend
from engine.batch import Batch
from engine.errors import EngineError
from engine.gguf_file import TensorInfo
from engine.kv import KVPool
from kernels.norms import rope_inv_freq
from kernels.qmatmul import quantize_activations_ref
from kernels.testing import random_tensor

RNG = np.random.default_rng(0)
FAST, REF = FastBackend(), ReferenceBackend()


def tensor(qtype, shape, seed=0):
    raw = random_tensor(qtype, shape, seed)
    return TensorInfo("w", shape, qtype, raw.size, raw)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def linear_bound(x, W):
    _, xd, _ = quantize_activations_ref(x)
    return (np.repeat(xd, 32, axis=1) / 2) @ np.abs(W).T * 1.01 + 2e-3 * np.abs(x) @ np.abs(W).T


@pytest.mark.parametrize(
    "qtype", [Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.F32, Q.Q3_K], ids=lambda q: q.name
)
@pytest.mark.parametrize("n", [1, 7])
def test_linear(qtype, n):
    t = tensor(qtype, (48, 256))
    x = randn(n, 256)
    W = REF.prepare(t)
    got = FAST.linear(x, FAST.prepare(t))
    np.testing.assert_array_less(np.abs(got - REF.linear(x, W)), linear_bound(x, W) + 1e-5)


def test_linear_many_matches_linear():
    ts = [tensor(Q.Q5_0, (64, 256), 1), tensor(Q.Q5_K, (32, 256), 2), tensor(Q.Q5_0, (40, 256), 3)]
    fused = FAST.prepare_many(ts)
    assert fused.stacked is not None  # same layout, first sizes multiples of 16: one kernel call
    x = randn(3, 256)
    for y, t in zip(FAST.linear_many(x, fused), ts, strict=True):
        np.testing.assert_allclose(y, FAST.linear(x, FAST.prepare(t)), rtol=1e-5, atol=1e-5)
    for other in (Q.Q4_1, Q.Q5_0):  # Q8_0 shares no layout (gemma3's attn_v beside Q5_0 q, k)
        mixed = FAST.prepare_many([tensor(other, (32, 256)), tensor(Q.Q8_0, (32, 256))])
        assert mixed.stacked is None and len(FAST.linear_many(x, mixed)) == 2


def test_embed():
    t = tensor(Q.Q8_0, (100, 64))
    ids = np.array([0, 99, 5, 5])
    np.testing.assert_array_equal(
        FAST.embed(FAST.prepare_embedding(t), ids), REF.embed(REF.prepare_embedding(t), ids)
    )


@pytest.mark.parametrize("shape", [(4, 576), (4, 3, 64)])
def test_rms_norm(shape):
    x, w = randn(*shape), randn(shape[-1])
    np.testing.assert_allclose(
        FAST.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("neox", [False, True])
def test_rope(neox):
    x, pos = randn(5, 4, 256), np.arange(17, 22)
    freqs = rope_inv_freq(1e6, 256)
    table = FAST.rope_table(pos, freqs)
    np.testing.assert_allclose(table, REF.rope_table(pos, freqs), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        FAST.rope(x, table, neox), REF.rope(x, table, neox), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("window", [0, 4])
def test_attention_over_the_kv_pool(window):
    """Two sequences, one decoding at position 12, one prefilling 3 rows, in one call."""
    pool = KVPool(n_layers=2, n_kv_heads=2, head_dim=64, n_blocks=4)
    pool.k[:], pool.v[:] = randn(*pool.k.shape), randn(*pool.v.shape)
    batch = Batch.pack([([0], 12), ([0, 0, 0], 0)], pool, [[2], [1]])
    q = randn(4, 4, 64)
    got = FAST.attention(q, batch, 1, window, 0.125)
    np.testing.assert_allclose(got, REF.attention(q, batch, 1, window, 0.125), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["silu_gate", "gelu_gate"])
def test_gates(name):
    g, u = randn(2, 300) * 3, randn(2, 300)
    got, ref = getattr(FAST, name)(g, u), getattr(REF, name)(g, u)
    np.testing.assert_array_less(np.abs(got - ref), 1e-6 * (1 + np.abs(g * u)))


def test_a_broken_numba_is_an_error_not_a_silent_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "engine.backends.fast", None)  # its import now fails
    with pytest.raises(EngineError, match='backend="reference"'):
        get_backend("fast")
    assert get_backend("reference").name == "reference"
    with pytest.raises(EngineError, match="choose from fast, reference"):
        get_backend("fastest")


def test_compute_threads_narrow_the_forward_pass_on_the_compute_thread():
    """`numbalm serve --compute-threads 1` (a replica per core): Numba's pool is sized at import,
    so the setting must reach the thread that runs the kernels, not the environment."""
    import numba

    import engine
    from engine.compute import COMPUTE
    from kernels import jit

    try:
        engine.set_compute_threads(1)
        assert COMPUTE.call(numba.get_num_threads) == 1 and jit.compute_threads() == 1
        with pytest.raises(ValueError, match="threads must be 1 to"):
            engine.set_compute_threads(jit.max_threads() + 1)
        assert jit.compute_threads() == 1  # a refused setting changes nothing
    finally:
        engine.set_compute_threads(jit.max_threads())
    assert COMPUTE.call(numba.get_num_threads) == jit.compute_threads() == jit.max_threads()
