"""The token-bitmask kernel against its NumPy twin and against llguidance's own apply."""

import numpy as np
import pytest

from kernels.mask import apply_token_bitmask, apply_token_bitmask_ref

RNG = np.random.default_rng(0)


def words_for(n_vocab: int, allowed: np.ndarray) -> np.ndarray:
    """A bitmask (n_words,) int32 with exactly the tokens in `allowed` set."""
    bits = np.zeros(32 * ((n_vocab + 31) // 32), dtype=np.uint8)
    bits[allowed] = 1
    return np.packbits(bits, bitorder="little").view(np.int32).copy()


def both(logits: np.ndarray, bitmask: np.ndarray) -> tuple[np.ndarray, int]:
    ref, fast = logits.copy(), logits.copy()
    apply_token_bitmask_ref(ref, bitmask)
    n_allowed = apply_token_bitmask(fast, bitmask)
    np.testing.assert_array_equal(fast, ref)
    return fast, n_allowed


@pytest.mark.parametrize("n_vocab", [49152, 1001, 33, 5])
def test_random_mask_matches_the_reference(n_vocab):
    logits = RNG.standard_normal(n_vocab).astype(np.float32)
    allowed = np.flatnonzero(RNG.random(n_vocab) < 0.3)
    out, n_allowed = both(logits, words_for(n_vocab, allowed))
    assert n_allowed == len(allowed)
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(out)), allowed)
    np.testing.assert_array_equal(out[allowed], logits[allowed])


def test_all_allowed_changes_nothing():
    logits = RNG.standard_normal(1001).astype(np.float32)
    bitmask = np.full((1001 + 31) // 32, -1, dtype=np.int32)  # llguidance's "allocate" value
    out, n_allowed = both(logits, bitmask)
    assert n_allowed == 1001
    np.testing.assert_array_equal(out, logits)


@pytest.mark.parametrize("only", [0, 31, 32, 999, 1000])
def test_none_allowed_but_one(only):
    logits = RNG.standard_normal(1001).astype(np.float32)
    out, n_allowed = both(logits, words_for(1001, np.array([only])))
    assert n_allowed == 1
    assert np.argmax(out) == only and np.isneginf(np.delete(out, only)).all()


def test_logits_past_the_mask_are_forbidden():
    logits = RNG.standard_normal(70).astype(np.float32)
    out, n_allowed = both(logits, np.full(2, -1, dtype=np.int32))  # covers 64 tokens
    assert n_allowed == 64 and np.isneginf(out[64:]).all()


def test_agrees_with_llguidance_numpy_apply():
    llg_numpy = pytest.importorskip("llguidance.numpy")
    logits = RNG.standard_normal(1001).astype(np.float32)
    bitmask = words_for(1001, np.flatnonzero(RNG.random(1001) < 0.5))
    expected = logits.copy()[None, :]
    llg_numpy.apply_token_bitmask_inplace(expected, bitmask[None, :].copy())
    out, _ = both(logits, bitmask)
    np.testing.assert_array_equal(out, expected[0])
