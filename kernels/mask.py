"""Token masks for constrained decoding: forbid the tokens a grammar rules out.

The mask is llguidance's bitmask: int32 words, token `i` allowed when bit `i % 32` of word
`i // 32` is set (`(n_vocab + 31) // 32` words; the unused high bits of the last word are 0).
Applying it sets every forbidden logit to -inf in place, so softmax gives it probability 0,
argmax never picks it and a truncation sampler never keeps it.
"""

from __future__ import annotations

import numpy as np

from .jit import njit


def apply_token_bitmask_ref(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """logits (n_vocab,) float32, bitmask (n_words,) int32 → forbidden logits = -inf, in place.

    Tokens past the mask's last word (a model head wider than the tokenizer) are forbidden.
    """
    ids = np.arange(logits.shape[0])  # (n_vocab,)
    covered = ids < 32 * bitmask.shape[0]
    allowed = np.zeros(logits.shape[0], dtype=bool)
    words = bitmask[ids[covered] >> 5].astype(np.int64)
    allowed[covered] = ((words >> (ids[covered] & 31)) & 1).astype(bool)
    logits[~allowed] = -np.inf


@njit
def apply_token_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> int:
    """Same as `apply_token_bitmask_ref`; returns how many tokens stay allowed.

    Whole words are the fast path: a JSON grammar forbids most of the vocabulary, so most
    words are 0 (32 logits to -inf) and the rest are often -1 (nothing to do).
    """
    n = logits.shape[0]
    n_words = min(bitmask.shape[0], (n + 31) // 32)
    neg_inf = np.float32(-np.inf)
    n_allowed = 0
    for w in range(n_words):
        word = np.int64(bitmask[w])
        base = w * 32
        end = min(base + 32, n)
        if word == 0:
            for i in range(base, end):
                logits[i] = neg_inf
        elif word == -1:
            n_allowed += end - base
        else:
            for i in range(base, end):
                if (word >> (i - base)) & 1:
                    n_allowed += 1
                else:
                    logits[i] = neg_inf
    for i in range(n_words * 32, n):
        logits[i] = neg_inf
    return n_allowed
