"""The generation loop: stop sequences, max_tokens, end of turn, cancellation, context."""

from __future__ import annotations

import pytest

from engine.errors import ContextOverflowError, EngineError
from engine.generate import StopMatcher


def test_stop_matcher_holds_back_a_possible_stop_and_cuts_at_it():
    m = StopMatcher(["\nUser:"])
    assert m.push("Hello") == ("Hello", False)
    assert m.push(" there\n") == (" there", False)  # "\n" could start the stop
    assert m.push("Us") == ("", False)
    assert m.push("er: hi") == ("", True)  # the stop itself is never emitted


def test_stop_matcher_releases_text_that_stops_matching():
    m = StopMatcher(["###"])
    assert m.push("a#") == ("a", False)
    assert m.push("#b") == ("##b", False)
    assert m.flush() == ""


def test_stop_matcher_earliest_of_several():
    m = StopMatcher(["world", "lo w"])
    assert m.push("hello world") == ("hel", True)


def test_generate_stops_on_a_stop_sequence_across_tokens(smollm2_ref):
    ids = smollm2_ref.tokenizer.encode("1, 2, 3, 4,")
    steps = list(smollm2_ref.generate(ids, max_tokens=20, temperature=0.0, stop=[" 7,"]))
    text = "".join(s.text for s in steps)
    assert text == " 5, 6,"
    assert steps[-1].finish_reason == "stop"
    assert all(s.finish_reason is None for s in steps[:-1])


def test_generate_max_tokens_gives_length(smollm2_ref):
    ids = smollm2_ref.tokenizer.encode("The capital of France is")
    steps = list(smollm2_ref.generate(ids, max_tokens=3, temperature=0.0))
    assert len(steps) == 3
    assert steps[-1].finish_reason == "length"
    assert "".join(s.text for s in steps).startswith(" Paris")


def test_generate_ends_at_end_of_turn(smollm2_ref):
    ids = smollm2_ref.chat_prompt_ids([{"role": "user", "content": "Say OK."}])
    steps = list(smollm2_ref.generate(ids, max_tokens=64, temperature=0.0))
    assert steps[-1].finish_reason == "stop"
    assert steps[-1].id in smollm2_ref.tokenizer.eot_ids
    assert "<|im_end|>" not in "".join(s.text for s in steps)


def test_should_stop_cancels_before_the_next_token(smollm2_ref):
    ids = smollm2_ref.tokenizer.encode("Once upon a time")
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    steps = list(smollm2_ref.generate(ids, max_tokens=50, should_stop=should_stop, seed=1))
    assert [s.finish_reason for s in steps] == [None, None, "cancelled"]


def test_prompt_longer_than_context_is_a_clear_error(smollm2_ref):
    with pytest.raises(ContextOverflowError, match="context window"):
        next(smollm2_ref.generate([1] * (smollm2_ref.n_ctx + 5), max_tokens=1))


def test_bad_token_ids_and_max_tokens_are_clear_errors(smollm2_ref):
    with pytest.raises(EngineError, match="outside the vocabulary"):
        next(smollm2_ref.generate([10**7], max_tokens=1))
    with pytest.raises(EngineError, match="max_tokens"):
        next(smollm2_ref.generate([1, 2], max_tokens=0))
    with pytest.raises(EngineError, match="empty"):
        next(smollm2_ref.generate([], max_tokens=1))


def test_seeded_generation_is_reproducible(smollm2_ref):
    ids = smollm2_ref.tokenizer.encode("Once upon a time")
    a = [s.id for s in smollm2_ref.generate(ids, max_tokens=8, temperature=1.0, seed=123)]
    b = [s.id for s in smollm2_ref.generate(ids, max_tokens=8, temperature=1.0, seed=123)]
    assert a == b
