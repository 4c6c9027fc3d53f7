"""The reference backend's operations on small cases checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from engine.backends.reference import ReferenceBackend
from kernels.attention import attention_ref
from kernels.norms import rope_inv_freq

B = ReferenceBackend()


def test_rms_norm_by_hand():
    x = np.array([[3.0, 4.0]], dtype=np.float32)  # mean square 12.5
    out = B.rms_norm(x, np.array([1.0, 2.0], np.float32), eps=0.0)
    np.testing.assert_allclose(out, [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_rotates_pairs_by_position(neox):
    # head_dim 4: pair 0 rotates by pos * 1, pair 1 by pos * base^(-1/2) = pos / 100.
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]], dtype=np.float32)  # (1 token, 1 head, 4)
    out = B.rope(x, B.rope_table(np.array([2]), rope_inv_freq(10000.0, 4)), neox=neox)[0, 0]
    pairs = [(0, 1), (2, 3)] if not neox else [(0, 2), (1, 3)]
    for (i, j), angle in zip(pairs, [2.0, 0.02]):
        a, b = x[0, 0, i], x[0, 0, j]
        c, s = np.cos(angle), np.sin(angle)
        assert out[i] == pytest.approx(a * c - b * s, rel=1e-5)
        assert out[j] == pytest.approx(a * s + b * c, rel=1e-5)


def test_rope_at_position_zero_is_identity_and_keeps_norms():
    x = np.random.default_rng(0).normal(size=(3, 2, 8)).astype(np.float32)
    out = B.rope(x, B.rope_table(np.array([0, 5, 9]), rope_inv_freq(10000.0, 8)), neox=True)
    np.testing.assert_allclose(out[0], x[0], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


def test_attention_by_hand_causal_and_gqa():
    # The reference backend's attention is `attention_ref` over each sequence's gathered keys.
    # Two query heads share one kv head; keys are orthogonal so weights are easy to write.
    k = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)  # (1 kv head, 2 pos, 2)
    v = np.array([[[10.0, 0.0], [0.0, 20.0]]], dtype=np.float32)
    q = np.array([[[0.0, 0.0], [5.0, 0.0]],  # position 0: sees only key 0
                  [[0.0, 0.0], [0.0, np.log(3.0)]]], dtype=np.float32)  # (2, 2 heads, 2)
    out = attention_ref(q, k, v, pos0=0, window=0, scale=1.0).reshape(2, 2, 2)
    np.testing.assert_allclose(out[0, 0], [10, 0])  # causal: only position 0
    np.testing.assert_allclose(out[0, 1], [10, 0])
    np.testing.assert_allclose(out[1, 0], [5, 10])  # equal scores → mean of both values
    np.testing.assert_allclose(out[1, 1], [2.5, 15], rtol=1e-6)  # weights 1:3


def test_attention_sliding_window_sees_only_recent_keys():
    k = np.zeros((1, 4, 2), np.float32)
    v = np.arange(8, dtype=np.float32).reshape(1, 4, 2)
    q = np.zeros((1, 1, 2), np.float32)  # the query at position 3
    out = attention_ref(q, k, v, pos0=3, window=2, scale=1.0)
    np.testing.assert_allclose(out[0], v[0, 2:].mean(axis=0))  # keys 2 and 3 only


def test_gated_activations():
    g = np.array([[0.0, 1.0, -30.0]], np.float32)
    u = np.array([[2.0, 2.0, 2.0]], np.float32)
    np.testing.assert_allclose(B.silu_gate(g, u), [[0.0, 2 / (1 + np.exp(-1)), 0.0]],
                               atol=1e-6)
    gelu_1 = 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (1 + 0.044715)))
    np.testing.assert_allclose(B.gelu_gate(g, u)[0, :2], [0.0, 2 * gelu_1], rtol=1e-6)
