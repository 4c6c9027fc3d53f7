"""Logits → next token: penalties, bias, grammar mask, truncation, temperature, a seeded draw.

The order follows llama.cpp's default chain, with a grammar's mask (engine/constrain.py) after
the bias, so that truncation and argmax only ever see tokens the grammar allows:

    raw logits ─ repetition/presence/frequency penalties ─ logit bias ─ grammar mask
               ─→ (log-probs reported) ─ top-k ─ top-p ─ min-p ─ temperature
               ─ draw (or argmax when temperature = 0)

Each request gets its own `numpy.random.Generator`, so a seed reproduces a request whatever
else the process is doing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .errors import EngineError
from .tokenizer import check_token_ids


@dataclass
class SamplingParams:
    """What a request asks for; the defaults are llama.cpp's (its server uses them too).

    A 135M model sampled at temperature 1 with no truncation soon drifts into noise, so a
    request that sets only `temperature` still gets top-k 40, top-p 0.95 and min-p 0.05.
    """

    temperature: float = 0.8  # 0 → greedy
    top_k: int = 40  # 0 → off
    top_p: float = 0.95  # 1 → off
    min_p: float = 0.05  # 0 → off
    repetition_penalty: float = 1.0  # 1 → off (llama.cpp / CTRL style: divide positive logits)
    repeat_last_n: int = -1  # the penalties look at the last N tokens; -1: all, 0: none
    penalize_prompt: bool = True  # the penalties count the prompt's tokens too (llama.cpp)
    presence_penalty: float = 0.0  # OpenAI: minus this once a token has appeared
    frequency_penalty: float = 0.0  # OpenAI: minus this × the token's count so far
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None  # report the chosen token's log-prob and this many top ones

    def __post_init__(self):
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def validate(self, n_vocab: int) -> None:
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise EngineError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise EngineError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repeat_last_n < -1:
            raise EngineError(f"repeat_last_n must be >= -1 (-1: all tokens), got "
                              f"{self.repeat_last_n}")
        check_token_ids(self.logit_bias, n_vocab, "logit_bias")


# What `numbalm chat`, `numbalm run`, `numbalm generate` and Ollama's API use when a setting is
# not given: the engine's defaults (llama.cpp's) plus a mild repetition penalty, Ollama's 1.1
# over the last 64 tokens, but of the reply only: counting the prompt's tokens too (llama.cpp
# and Ollama do) penalizes the words of the question itself, and SmolLM2 asked "What is 2+2?"
# then talks about probability theory instead of saying 4. bench/chat_loops.py measures it;
# docs/cli.md quotes the counts.
CHAT_DEFAULTS = {"repetition_penalty": 1.1, "repeat_last_n": 64, "penalize_prompt": False}


@dataclass
class Choice:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64: (..., n_vocab) → (..., n_vocab)."""
    shifted = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def prompt_logprobs(logits: np.ndarray, ids: list[int],
                    k: int) -> list[tuple[float | None, list[tuple[int, float]]]]:
    """Each prompt token's log-prob given the ones before it, and the top `k` alternatives.

    logits (len(ids), n_vocab) are a model's logits at every position of `ids`
    (`LLM.logits`); the first token has no prediction, so it gets (None, []).
    """
    logp = log_softmax(logits)  # (n, n_vocab)
    out: list[tuple[float | None, list]] = [(None, [])]
    for i in range(1, len(ids)):
        row = logp[i - 1]
        top = np.argsort(-row)[:k] if k else []
        out.append((float(row[ids[i]]), [(int(t), float(row[t])) for t in top]))
    return out


def apply_penalties(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    """Penalize tokens already in `history` (prompt and output so far; its last
    `repeat_last_n` tokens when set)."""
    if p.repeat_last_n >= 0:
        history = history[-p.repeat_last_n:] if p.repeat_last_n else []
    if not history or (p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                       and p.frequency_penalty == 0.0):
        return logits
    logits = logits.copy()
    counts = Counter(history)
    ids = np.fromiter(counts.keys(), dtype=np.int64)
    n = np.fromiter(counts.values(), dtype=np.float32)
    seen = logits[ids]
    if p.repetition_penalty != 1.0:
        seen = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
    seen = seen - p.presence_penalty - p.frequency_penalty * n
    logits[ids] = seen
    return logits


def apply_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    if not bias:
        return logits
    logits = logits.copy()
    for token, value in bias.items():
        logits[int(token)] += value
    return logits


def truncate(probs: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Zero the probabilities top-k, top-p and min-p rule out; probs sorted descending in."""
    keep = len(probs)
    if p.top_k > 0:
        keep = min(keep, p.top_k)
    if p.top_p < 1.0:
        cumulative = np.cumsum(probs[:keep])
        keep = min(keep, int(np.searchsorted(cumulative, p.top_p * cumulative[-1])) + 1)
    if p.min_p > 0.0:
        keep = min(keep, max(1, int(np.sum(probs[:keep] >= p.min_p * probs[0]))))
    return probs[:keep]


def ranked(logits: np.ndarray, candidates: np.ndarray | None, k: int) -> np.ndarray:
    """Token ids by descending logit (ties: lower id first), only the first `k` when k > 0.

    Restricted to `candidates` (ascending ids) when given. With top-k, a partition finds the
    k-th largest logit first, so only the few ids at or above it are sorted (a full sort of a
    49k vocabulary costs milliseconds, ~as much as a decode step); the order is the same.
    """
    values = logits if candidates is None else logits[candidates]
    n = len(values)
    if 0 < k < n:
        kth = np.partition(values, n - k)[n - k]  # the k-th largest logit
        top = np.flatnonzero(values >= kth)  # ascending ids, ties at the k-th included
        order = top[np.argsort(-values[top], kind="stable")[:k]]
    else:
        order = np.argsort(-values, kind="stable")
    return order if candidates is None else candidates[order]


class Sampler:
    """Draws tokens for one request; holds that request's random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int],
                 mask: np.ndarray | None = None) -> Choice:
        """logits (n_vocab,) float32 → the next token, with log-probs when asked.

        `mask` (n_words,) int32, llguidance's bitmask (kernels/mask.py), limits the choice to
        the tokens it allows; log-probs are then those of the masked distribution (forbidden
        tokens have probability 0 and never appear among the top ones).
        """
        p = self.params
        raw = logits
        logits = apply_bias(apply_penalties(logits, history, p), p.logit_bias)
        candidates = None
        if mask is not None:
            from kernels.mask import apply_token_bitmask  # Numba: loaded only when constrained

            logits = logits.copy() if logits is raw else logits
            apply_token_bitmask(logits, mask)
            candidates = np.flatnonzero(logits > -np.inf)  # allowed, ascending ids
            if len(candidates) == 0:
                raise EngineError("the grammar allows no token here (every allowed token has "
                                  "logit -inf)")
        token = self.draw(logits, candidates)
        if p.logprobs is None:
            return Choice(token)
        logprobs = log_softmax(logits)
        if candidates is None:
            top = np.argsort(-logprobs)[: p.logprobs] if p.logprobs > 0 else []
        else:
            top = candidates[np.argsort(-logprobs[candidates])[: p.logprobs]]
        return Choice(token, float(logprobs[token]),
                      [(int(i), float(logprobs[i])) for i in top])

    def draw(self, logits: np.ndarray, candidates: np.ndarray | None = None) -> int:
        """The next token among `candidates` (ascending ids; None: the whole vocabulary)."""
        p = self.params
        if p.temperature == 0.0:
            if candidates is None:
                return int(np.argmax(logits))
            return int(candidates[np.argmax(logits[candidates])])
        if p.top_k == 0 and p.top_p >= 1.0 and p.min_p == 0.0:
            # No truncation: the whole distribution, drawn in id order (no sort needed).
            order = candidates if candidates is not None else np.arange(len(logits))
            scaled = (logits[order] - logits[order].max()).astype(np.float64) / p.temperature
            weights = np.exp(scaled)
            return int(order[self.rng.choice(len(weights), p=weights / weights.sum())])
        # Truncation rules look at the distribution before temperature, as llama.cpp does.
        order = ranked(logits, candidates, p.top_k)
        probs = np.exp((logits[order] - logits[order[0]]).astype(np.float64))
        probs /= probs.sum()
        kept = truncate(probs, p)
        scaled = np.log(kept) / p.temperature
        weights = np.exp(scaled - scaled.max())
        return int(order[self.rng.choice(len(weights), p=weights / weights.sum())])
