"""The generation loop: prefill the prompt, then decode one token at a time.

    logits = prefill(prompt)                      # one forward pass over the whole prompt
    repeat: token = sample(logits)                # engine/sampling.py
            text  = detokenize(token)             # UTF-8 safe, stop sequences held back
            yield; logits = decode_one(token)     # one position through the KV cache

Every sampled token yields one `GeneratedToken`; the last one carries `finish_reason`.

With a grammar (engine/constrain.py) each step also asks it which tokens may come next. That
mask is computed in a worker thread during the forward pass only when a core is free beyond
Numba's threads (`constrain.OVERLAP_MASK`); otherwise right after it, in this thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .cache import KVCache
from .constrain import Grammar
from .errors import ContextOverflowError, EngineError
from .sampling import Sampler, SamplingParams
from .tokenizer import check_token_ids


@dataclass
class GeneratedToken:
    id: int
    text: str  # the text this token adds (may be "" while a stop sequence is possible)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # None, then "stop", "length" or "cancelled"


class StopMatcher:
    """Holds back text that could be the start of a stop sequence; cuts at a full match.

    Stop sequences are matched on text, so one that spans several tokens is still found,
    and it is never emitted.
    """

    def __init__(self, stop: Iterable[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop sequence was hit)."""
        self.pending += text
        if not self.stop:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = self._longest_stop_prefix_suffix()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest tail of `pending` that some stop sequence starts with."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def check_prompt(prompt_ids: list[int], n_ctx: int, n_vocab: int) -> None:
    """Reject an empty prompt, unknown token ids, or a prompt that leaves no room."""
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise EngineError("the prompt is empty: give at least one token")
    if n_prompt >= n_ctx:
        raise ContextOverflowError(
            f"the prompt has {n_prompt} tokens but the context window is {n_ctx}: "
            f"shorten the prompt (at least one position must be left to generate)"
        )
    check_token_ids(prompt_ids, n_vocab, "the prompt")


def prefill(model, cache: KVCache, prompt_ids: list[int]) -> np.ndarray:
    """Run the prompt through the model; return the logits after its last token (n_vocab,)."""
    hidden = model.forward(np.asarray(prompt_ids), cache)  # (n, dim)
    return model.logits(hidden[-1:])[0]


def decode_one(model, cache: KVCache, token: int) -> np.ndarray:
    """One more position through the cache → logits (n_vocab,)."""
    hidden = model.forward(np.asarray([token]), cache)  # (1, dim)
    return model.logits(hidden)[0]


def generate(model, tokenizer, prompt_ids: list[int], *, n_ctx: int, max_tokens: int = 256,
             stop: Iterable[str] = (), should_stop: Callable[[], bool] | None = None,
             params: SamplingParams | None = None,
             grammar: Grammar | None = None) -> Iterator[GeneratedToken]:
    """Sample up to `max_tokens` tokens after `prompt_ids`; see the module docstring.

    With `grammar`, only tokens it allows are sampled, end of turn only once it accepts, and
    generation ends ("stop") as soon as it is complete.
    """
    params = params or SamplingParams()
    params.validate(tokenizer.n_vocab)
    if max_tokens < 1:
        raise EngineError(f"max_tokens must be at least 1, got {max_tokens}")
    check_prompt(prompt_ids, n_ctx, tokenizer.n_vocab)
    max_tokens = min(max_tokens, n_ctx - len(prompt_ids))

    sampler, matcher, decoder = Sampler(params), StopMatcher(stop), tokenizer.decoder()
    constraint = grammar.start(tokenizer) if grammar is not None else None
    history = list(prompt_ids)
    cache = model.new_cache(n_ctx)
    if constraint:
        constraint.fill_mask_async()  # overlaps the prefill
    logits = prefill(model, cache, prompt_ids)
    for n_generated in range(1, max_tokens + 1):
        if should_stop is not None and should_stop():
            yield GeneratedToken(-1, matcher.flush(), finish_reason="cancelled")
            return
        choice = sampler(logits, history, constraint.mask if constraint else None)
        history.append(choice.token)
        step = GeneratedToken(choice.token, "", choice.logprob, choice.top_logprobs)
        if choice.token in tokenizer.eot_ids:
            step.text, step.finish_reason = matcher.flush() + decoder.flush(), "stop"
            yield step
            return
        if constraint:
            constraint.consume(choice.token)
        step.text, hit = matcher.push(decoder.push(choice.token))
        if hit:
            step.finish_reason = "stop"
        elif (constraint and constraint.is_complete) or n_generated == max_tokens:
            step.text += matcher.push(decoder.flush())[0] + matcher.flush()
            step.finish_reason = "stop" if constraint and constraint.is_complete else "length"
        yield step
        if step.finish_reason:
            return
        if constraint:
            constraint.fill_mask_async()  # overlaps the forward pass below
        logits = decode_one(model, cache, choice.token)
