"""Decode speed with and without a JSON-schema constraint: the per-token cost of the mask.

    .venv/bin/python bench/constrain_bench.py [--model smollm2-135m-instruct] [--tokens 128]

Both modes generate the same number of tokens from the same prompt with the same sampling
settings: end of turn is banned (logit bias) and the schema asks for at least 1,000 items, so
neither can finish early. Runs alternate (free, json-sync, json-overlap, then rotated) so that
drift on a busy machine hits every mode alike; each figure is the median over --repeats runs.
Decode time runs from the first generated token to the last (prefill excluded). "json-sync"
computes the next mask in the generating thread, after the forward pass; "json-overlap" computes
it in a worker thread while the model runs its forward pass. The engine overlaps only when the
machine has a core that Numba's threads leave free (engine/constrain.py, OVERLAP_MASK); the
line marked "default" is the one a request gets here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import constrain, load_model  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 1000, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "city": {"type": "string", "maxLength": 40},
                       "member": {"type": "boolean"}},
        "required": ["name", "age", "city", "member"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}
PROMPT = ("List many people as JSON: an object with a key \"people\" holding an array of "
          "objects with name, age, city and member (true/false). Schema: " + json.dumps(SCHEMA))


def decode_seconds_per_token(model, ids, n_tokens: int, grammar, overlap: bool, seed: int) -> float:
    constrain.OVERLAP_MASK = overlap
    bias = {t: -100.0 for t in model.tokenizer.eot_ids}
    stamps, finish = [], None
    for step in model.generate(ids, max_tokens=n_tokens, grammar=grammar, seed=seed,
                               logit_bias=bias):
        stamps.append(time.perf_counter())
        finish = step.finish_reason
    assert len(stamps) == n_tokens and finish == "length", (len(stamps), finish)
    return (stamps[-1] - stamps[0]) / (n_tokens - 1)


def constraint_seconds_per_token(model, ids, n_tokens: int, grammar) -> tuple[float, float]:
    """The constraint's own work per token, without the model: replay one constrained
    generation's tokens and logits, timing (mask + masked sampling + consume) against plain
    sampling. Robust on a busy machine, where decode times swing."""
    from engine.sampling import Sampler, SamplingParams

    bias = {t: -100.0 for t in model.tokenizer.eot_ids}
    steps = list(model.generate(ids, max_tokens=n_tokens, grammar=grammar, seed=0,
                                logit_bias=bias))
    tokens = [s.id for s in steps]
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal(model.n_vocab).astype(np.float32) * 3 for _ in tokens]
    params = SamplingParams(seed=0, logit_bias=bias)
    plain, masked = Sampler(params), Sampler(params)
    started = time.perf_counter()
    for row in logits:
        plain(row, [])
    t_plain = time.perf_counter() - started
    constraint = grammar.start(model.tokenizer)
    started = time.perf_counter()
    for token, row in zip(tokens, logits):
        constraint.fill_mask()
        masked(row, [], constraint.mask)
        constraint.consume(token)
    t_masked = time.perf_counter() - started
    return t_plain / len(tokens), t_masked / len(tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="fast")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per mode (median)")
    args = ap.parse_args()
    model = load_model(args.model, backend=args.backend)
    ids = model.chat_prompt_ids([{"role": "user", "content": PROMPT}])
    grammar = model.compile_grammar(constrain.Grammar.json_schema(SCHEMA))
    modes = {"free": (None, False), "json-sync": (grammar, False),
             "json-overlap": (grammar, True)}
    default = "json-overlap" if constrain._spare_core() else "json-sync"
    for grammar_, overlap in modes.values():  # compile, warm caches
        decode_seconds_per_token(model, ids, 8, grammar_, overlap, seed=0)
    times: dict[str, list[float]] = {m: [] for m in modes}
    names = list(modes)
    for r in range(args.repeats):
        for mode in names[r % 3:] + names[: r % 3]:  # rotate: no mode always runs first
            grammar_, overlap = modes[mode]
            times[mode].append(decode_seconds_per_token(model, ids, args.tokens, grammar_,
                                                        overlap, seed=r))
    free = statistics.median(times["free"])
    print(f"{model.id} ({args.backend}), {len(ids)}-token prompt, {args.tokens} tokens/run, "
          f"median of {args.repeats}, llama.cpp sampling defaults, end of turn banned")
    print("overhead: the median over rounds of (mode / free in the same round) - 1, which a "
          "drifting machine moves less than a ratio of medians; range: its lowest and highest")
    print(f"{'mode':>12} {'ms/token':>9} {'tok/s':>7} {'overhead':>9} {'range':>15}")
    for mode in modes:
        t = statistics.median(times[mode])
        paired = [100 * (m / f - 1) for m, f in zip(times[mode], times["free"], strict=True)]
        print(f"{mode:>12} {1e3 * t:>9.3f} {1 / t:>7.1f} {statistics.median(paired):>8.1f}% "
              f"{min(paired):>6.1f}..{max(paired):>5.1f}%"
              + ("  default" if mode == default else ""))
    plain, masked = constraint_seconds_per_token(model, ids, args.tokens, grammar)
    print(f"without the model (same tokens, random logits): sampling {1e3 * plain:.3f} ms/token, "
          f"mask + masked sampling + consume {1e3 * masked:.3f} ms/token "
          f"(+{1e3 * (masked - plain):.3f} ms = {100 * (masked - plain) / free:.1f}% of a free "
          f"decode step)")


if __name__ == "__main__":
    main()
