"""Continuous batching on the real SmolLM2: a sequence's tokens do not depend on the company it
keeps (batch size, arrival time, chunking, preemption, the prefix cache); n choices share one
prefill; a cancelled sequence leaves at once; the KV budget is kept."""

from __future__ import annotations

import time
from itertools import islice

import numpy as np
import pytest

import engine
from engine.errors import ContextOverflowError
from engine.kv import BLOCK
from tests.helpers import model_path

TOPICS = ["the sea", "a red fox", "winter in Oslo", "bread", "the moon", "a violin",
          "chess", "rain on a roof"]


@pytest.fixture(scope="module")
def llm():
    model = engine.load_model(model_path("smollm2"))
    list(model.generate([1, 2, 3], max_tokens=1))  # the scheduler exists from here on
    return model


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.chat_prompt_ids([{"role": "user", "content": f"Tell me about {t}."}])
            for t in TOPICS]


def tokens(stream) -> list[tuple[int, float]]:
    return [(t.id, t.logprob) for t in stream]


def alone(llm, ids, **options):
    return tokens(llm.generate(ids, logprobs=0, **options))


@pytest.fixture(scope="module")
def greedy_alone(llm, prompts):
    return [alone(llm, p, max_tokens=24, temperature=0.0) for p in prompts]


def test_eight_greedy_requests_together_give_what_each_gives_alone(llm, prompts,
                                                                   greedy_alone):
    before = llm.serving_stats()["sequences"], llm.serving_stats()["steps"]
    streams = [llm.generate(p, max_tokens=24, temperature=0.0, logprobs=0) for p in prompts]
    together = [tokens(s) for s in streams]
    assert together == greedy_alone  # ids and log-probs, bit for bit
    stats = llm.serving_stats()
    batch = (stats["sequences"] - before[0]) / (stats["steps"] - before[1])
    assert batch > 6  # they really ran side by side


def test_seeded_sampling_together_equals_alone(llm, prompts):
    opts = dict(max_tokens=20, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    want = [alone(llm, p, seed=100 + i, **opts) for i, p in enumerate(prompts[:5])]
    streams = [llm.generate(p, seed=100 + i, logprobs=0, **opts)
               for i, p in enumerate(prompts[:5])]
    assert [tokens(s) for s in streams] == want


def test_a_request_joining_mid_batch_changes_nobody(llm, prompts, greedy_alone):
    first = [llm.generate(p, max_tokens=24, temperature=0.0, logprobs=0) for p in prompts[:3]]
    head = [[(t.id, t.logprob) for t in islice(s, 6)] for s in first]  # 6 tokens each
    late = llm.generate(prompts[3], max_tokens=24, temperature=0.0, logprobs=0)
    rest = [tokens(s) for s in first]
    assert [h + r for h, r in zip(head, rest)] == greedy_alone[:3]
    assert tokens(late) == greedy_alone[3]


def test_a_closed_stream_leaves_within_one_step_and_the_others_finish(llm, prompts,
                                                                      greedy_alone):
    streams = [llm.generate(p, max_tokens=24, temperature=0.0, logprobs=0) for p in prompts[:3]]
    got = [next(s) for s in streams]
    steps = llm.serving_stats()["steps"]
    streams[1].close()  # the client went away
    rest = list(streams[1])  # what it gets: the cancellation marker, then the end
    assert [t.finish_reason for t in rest][-1:] == ["cancelled"] and len(rest) <= 2
    assert llm.serving_stats()["steps"] - steps <= 2
    assert all(s.out is not streams[1]._channel for s in llm.scheduler.running)
    for i in (0, 2):
        assert [(got[i].id, got[i].logprob)] + tokens(streams[i]) == greedy_alone[i]


def test_a_dropped_stream_stops_its_generation(llm, prompts):
    steps = llm.serving_stats()["steps"]
    stream = llm.generate(prompts[0], max_tokens=200, temperature=0.0)
    next(stream)
    del stream  # the reader went away without closing it
    for _ in range(200):
        if not llm.scheduler.running:
            break
        time.sleep(0.01)
    assert not llm.scheduler.running and llm.serving_stats()["steps"] - steps < 100


def test_n_choices_share_one_prefill(llm, prompts):
    ids = prompts[4]
    before = llm.serving_stats()["prefill_rows"], llm.serving_stats()["rows"]
    streams = llm.submit(ids, 4, max_tokens=8, temperature=1.0, seed=7, logprobs=0)
    outs = [tokens(s) for s in streams]
    stats = llm.serving_stats()
    prefill, rows = stats["prefill_rows"] - before[0], stats["rows"] - before[1]
    cached = streams[0].cached_tokens
    assert prefill == len(ids) - cached  # the prompt ran once, not four times
    assert rows <= prefill + sum(len(o) for o in outs)  # then one row per generated token
    # each choice is the generation its seed gives alone
    assert outs == [alone(llm, ids, max_tokens=8, temperature=1.0, seed=7 + i) for i in range(4)]


def test_a_shared_history_comes_from_the_prefix_cache(llm):
    story = "The archive held letters from every decade of the town's history. " * 80
    turn1 = [{"role": "user", "content": story + "Summarize it."}]
    ids1 = llm.chat_prompt_ids(turn1)
    assert len(ids1) > 1000
    first = llm.generate(ids1, max_tokens=4, temperature=0.0)
    reply = "".join(t.text for t in first)
    turn2 = turn1 + [{"role": "assistant", "content": reply},
                     {"role": "user", "content": "Shorter, please."}]
    ids2 = llm.chat_prompt_ids(turn2)
    warm = llm.generate(ids2, max_tokens=1, temperature=0.0, logprobs=20)
    warm_top = next(warm).top_logprobs
    assert warm.cached_tokens >= len(ids1) - 2 * BLOCK  # the first turn, but for its last block
    cold = engine.load_model(model_path("smollm2")).generate(ids2, max_tokens=1,
                                                             temperature=0.0, logprobs=20)
    cold_top = next(cold).top_logprobs
    assert cold.cached_tokens == 0
    assert [i for i, _ in warm_top] == [i for i, _ in cold_top]
    np.testing.assert_allclose([lp for _, lp in warm_top], [lp for _, lp in cold_top], atol=1e-4)


def test_preemption_under_a_small_kv_budget_keeps_every_output(prompts, greedy_alone):
    # 24 blocks = 384 positions for 8 sequences of ~45 prompt + 24 tokens (5 blocks each at
    # the end, the first shared): sequences must wait, and are preempted when the pool is full
    small = engine.load_model(model_path("smollm2"), kv_cache_mb=24 * 0.703125)
    assert small.generate(prompts[0], max_tokens=1, temperature=0.0) is not None
    streams = [small.generate(p, max_tokens=24, temperature=0.0, logprobs=0) for p in prompts]
    assert [tokens(s) for s in streams] == greedy_alone
    stats = small.serving_stats()
    assert stats["kv_blocks"] == 24 and stats["preempted"] > 0


def test_a_request_that_can_never_fit_the_kv_budget_is_refused(prompts):
    tiny = engine.load_model(model_path("smollm2"), kv_cache_mb=4 * 0.703125)  # 64 positions
    with pytest.raises(ContextOverflowError, match="KV cache"):
        tiny.generate(prompts[0], max_tokens=100)
