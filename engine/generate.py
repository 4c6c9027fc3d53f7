"""Generation, one sequence's side of it: logits in, tokens and text out.

    the scheduler: logits = forward(prompt), then forward(token) ...   # engine/scheduler.py
    each time:     token = sample(logits)       # engine/sampling.py
                   text  = detokenize(token)    # UTF-8 safe, stop sequences held back
                   → GeneratedToken             # the last one carries finish_reason

`Decoding` is that per-sequence state (sampler, stop matcher, detokenizer, grammar); the
scheduler batches the forward passes of many sequences and calls each one's `Decoding`.

With a grammar (engine/constrain.py) each step also asks it which tokens may come next. That
mask is computed in a worker thread during the forward pass only when a core is free beyond
Numba's threads (`constrain.OVERLAP_MASK`); otherwise right after it, in this thread.

A grammar's reply also lands within max_tokens (engine/landing.py): every token leaves a way
to finish the grammar in the tokens still left, so a structured reply cut by the budget still
parses; it then ends with finish_reason "length", as any reply the budget shaped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .constrain import Grammar, clear_token
from .errors import ContextOverflowError, EngineError
from .sampling import Choice, Sampler, SamplingParams
from .tokenizer import check_token_ids

REDRAWS = 3  # draws that may overshoot the budget before only the ending's tokens are allowed


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


class Decoding:
    """Logits → tokens for one sequence: sample, detokenize, hold back stop sequences, follow
    the grammar. The scheduler (engine/scheduler.py) runs the forward passes and hands each
    sequence's next-token logits to its own Decoding, so a sequence samples exactly as it
    would alone, whatever else shares the batch."""

    def __init__(self, tokenizer, prompt_ids: list[int], *, n_ctx: int, max_tokens: int = 256,
                 stop: Iterable[str] = (), params: SamplingParams | None = None,
                 grammar: Grammar | None = None):
        params = params or SamplingParams()
        params.validate(tokenizer.n_vocab)
        if max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {max_tokens}")
        check_prompt(prompt_ids, n_ctx, tokenizer.n_vocab)
        self.tokenizer = tokenizer
        self.max_tokens = min(max_tokens, n_ctx - len(prompt_ids))
        self.sampler, self.matcher = Sampler(params), StopMatcher(stop)
        self.decoder = tokenizer.decoder()
        self.constraint = grammar.start(tokenizer) if grammar is not None else None
        # what the penalties look at: the prompt and the reply, or the reply alone
        self.history = list(prompt_ids) if params.penalize_prompt else []
        self.n_generated = 0
        self.landed = False  # has the budget narrowed a choice (the grammar's landing)
        if self.constraint:
            self.constraint.fill_mask_async()  # overlaps the prefill

    def step(self, logits: np.ndarray) -> GeneratedToken:
        """The next token from its logits (n_vocab,); `finish_reason` is set on the last."""
        constraint = self.constraint
        choice = self._choose(logits)
        self.history.append(choice.token)
        self.n_generated += 1
        step = GeneratedToken(choice.token, "", choice.logprob, choice.top_logprobs)
        ended = "length" if self.landed else "stop"  # a landed reply was shaped by the budget
        if choice.token in self.tokenizer.eot_ids:
            step.text, step.finish_reason = self.matcher.flush() + self.decoder.flush(), ended
            return step
        if constraint:
            constraint.consume(choice.token)
        step.text, hit = self.matcher.push(self.decoder.push(choice.token))
        if hit:
            step.finish_reason = "stop"
        elif (constraint and constraint.is_complete) or self.n_generated == self.max_tokens:
            step.text += self.matcher.push(self.decoder.flush())[0] + self.matcher.flush()
            step.finish_reason = ended if constraint and constraint.is_complete else "length"
        elif constraint:
            constraint.fill_mask_async()  # overlaps the next forward pass
        return step

    def _choose(self, logits: np.ndarray) -> Choice:
        """Sample the next token; under a grammar, one after which it can still be finished
        in the tokens left (its ending's length, engine/landing.py), when that is possible.

        With room to spare the whole mask is open, and a token that would need more than the
        budget to close (an opened key or array, say) is drawn again without it; with no
        room, or after REDRAWS such draws, only the tokens that begin the ending remain."""
        constraint = self.constraint
        if constraint is None:
            return self.sampler(logits, self.history)
        mask = constraint.mask
        left = self.max_tokens - self.n_generated  # this token included
        ending = constraint.ending
        if ending is None or ending.length > left:  # no ending known that fits: no landing
            return self.sampler(logits, self.history, mask)
        if ending.length < left:
            for _ in range(REDRAWS):
                choice = self.sampler(logits, self.history, mask)
                after = constraint.ending_after(choice.token)
                if after is not None and after.length <= left - 1:
                    return choice
                mask = mask.copy()
                clear_token(mask, choice.token)
                self.landed = True
        self.landed = True
        return self.sampler(logits, self.history, constraint.landing_mask(left))

    def cancelled(self) -> GeneratedToken:
        """The marker a stopped generation ends with: what text was held back, no token."""
        return GeneratedToken(-1, self.matcher.flush(), finish_reason="cancelled")
