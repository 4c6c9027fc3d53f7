"""Sampling: each rule on small hand-made distributions, seeds, and log-probs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from engine.errors import EngineError
from engine.sampling import Sampler, SamplingParams, apply_penalties, log_softmax

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], dtype=np.float32))


def draws(params: SamplingParams, n=4000, logits=LOGITS, history=()):
    sampler = Sampler(params)
    return Counter(sampler(logits, list(history)).token for _ in range(n))


def test_greedy_is_argmax():
    assert draws(SamplingParams(temperature=0.0), n=10) == Counter({0: 10})


def test_temperature_one_follows_the_distribution():
    counts = draws(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.0, seed=1), n=20000)
    freq = np.array([counts[i] for i in range(5)]) / 20000
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.015)


def test_top_k_keeps_k_most_likely():
    assert set(draws(SamplingParams(top_k=2, seed=2))) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token (0.15) is needed as well.
    assert set(draws(SamplingParams(top_p=0.8, seed=3))) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    # min_p 0.2: threshold 0.1 keeps 0.5, 0.25, 0.15.
    assert set(draws(SamplingParams(min_p=0.2, seed=4))) == {0, 1, 2}


def test_low_temperature_sharpens():
    counts = draws(SamplingParams(temperature=0.1, seed=5), n=2000)
    assert counts[0] / 2000 > 0.99


def test_same_seed_same_tokens_and_independent_of_other_samplers():
    a = Sampler(SamplingParams(seed=42))
    b = Sampler(SamplingParams(seed=42))
    other = Sampler(SamplingParams(seed=7))
    seq_a = []
    for _ in range(50):
        seq_a.append(a(LOGITS, []).token)
        other(LOGITS, [])  # interleaved draws elsewhere must not disturb a
    seq_b = [b(LOGITS, []).token for _ in range(50)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1


def test_penalties():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    p = SamplingParams(repetition_penalty=2.0)
    np.testing.assert_allclose(apply_penalties(logits, [0, 1], p), [1.0, -4.0, 1.0])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    np.testing.assert_allclose(apply_penalties(logits, [0, 0, 2], p), [1.0, -2.0, 0.25])


def test_the_penalties_look_back_repeat_last_n_tokens():
    logits = np.array([2.0, 2.0, 2.0], dtype=np.float32)
    p = SamplingParams(repetition_penalty=2.0, repeat_last_n=2)
    np.testing.assert_allclose(apply_penalties(logits, [0, 1, 2], p), [2.0, 1.0, 1.0])
    p = SamplingParams(repetition_penalty=2.0, repeat_last_n=0)  # none
    np.testing.assert_allclose(apply_penalties(logits, [0, 1, 2], p), logits)
    with pytest.raises(EngineError, match="repeat_last_n"):
        SamplingParams(repeat_last_n=-2).validate(3)


def test_penalize_prompt_false_counts_only_the_reply():
    from engine.generate import Decoding
    from tests.server.fake_engine import FakeTokenizer

    tok = FakeTokenizer()
    d = Decoding(tok, [65, 66], n_ctx=64, params=SamplingParams(penalize_prompt=False))
    assert d.history == []
    assert Decoding(tok, [65, 66], n_ctx=64).history == [65, 66]


def test_logit_bias_can_force_or_ban_a_token():
    assert draws(SamplingParams(temperature=0.0, logit_bias={3: 100.0}), n=3) == Counter({3: 3})
    counts = draws(SamplingParams(logit_bias={0: -100.0}, seed=6), n=500)
    assert 0 not in counts


def test_defaults_are_llamacpps():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)


def test_none_means_default():
    assert SamplingParams(logit_bias=None, seed=None).logit_bias == {}
    assert SamplingParams(logit_bias={"5": 1}).logit_bias == {5: 1.0}


def test_logprobs_of_chosen_and_top_n():
    choice = Sampler(SamplingParams(temperature=0.0, logprobs=3))(LOGITS, [])
    expected = log_softmax(LOGITS)
    assert choice.token == 0
    assert choice.logprob == pytest.approx(expected[0], abs=1e-6)
    assert [t for t, _ in choice.top_logprobs] == [0, 1, 2]
    assert choice.top_logprobs[1][1] == pytest.approx(np.log(0.25), abs=1e-5)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(min_p=2.0), dict(top_k=-1), dict(logit_bias={99: 1.0})])
def test_invalid_parameters_are_clear_errors(bad):
    with pytest.raises(EngineError):
        SamplingParams(**bad).validate(n_vocab=5)


# -- a grammar's mask (llguidance bitmask: bit i of int32 word i // 32 allows token i) -------

def mask_of(*allowed: int, n_vocab: int = 5) -> np.ndarray:
    bits = np.zeros(32 * ((n_vocab + 31) // 32), dtype=np.uint8)
    bits[list(allowed)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32).copy()


def masked_draws(params: SamplingParams, mask: np.ndarray, n=4000, logits=LOGITS):
    sampler = Sampler(params)
    return Counter(sampler(logits, [], mask).token for _ in range(n))


def test_greedy_picks_the_best_allowed_token():
    assert masked_draws(SamplingParams(temperature=0.0), mask_of(1, 3), n=5) == Counter({1: 5})


def test_full_distribution_is_renormalized_over_allowed_tokens():
    counts = masked_draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=8),
                          mask_of(1, 3, 4), n=20000)
    assert set(counts) == {1, 3, 4}
    p = np.exp(LOGITS[[1, 3, 4]])
    np.testing.assert_allclose([counts[i] / 20000 for i in (1, 3, 4)], p / p.sum(), atol=0.015)


def test_truncation_never_keeps_only_forbidden_tokens():
    # top-k 1 / top-p 0.5 alone would keep only token 0; the mask forbids it.
    for params in (SamplingParams(top_k=1, seed=9), SamplingParams(top_p=0.5, seed=9),
                   SamplingParams(min_p=0.9, seed=9)):
        assert masked_draws(params, mask_of(2, 4), n=200) == Counter({2: 200})


def test_mask_applies_after_logit_bias():
    params = SamplingParams(temperature=0.0, logit_bias={0: 100.0, 4: 50.0})
    assert masked_draws(params, mask_of(1, 4), n=3) == Counter({4: 3})


def test_masked_logprobs_are_of_the_masked_distribution():
    choice = Sampler(SamplingParams(temperature=0.0, logprobs=4))(LOGITS, [], mask_of(1, 3))
    p = np.exp(LOGITS[[1, 3]].astype(np.float64))
    assert choice.token == 1
    assert choice.logprob == pytest.approx(np.log(p[0] / p.sum()), abs=1e-6)
    assert [t for t, _ in choice.top_logprobs] == [1, 3]  # forbidden tokens are not listed


def test_mask_leaves_the_callers_logits_alone():
    logits = LOGITS.copy()
    Sampler(SamplingParams(temperature=0.0))(logits, [], mask_of(2))
    np.testing.assert_array_equal(logits, LOGITS)
