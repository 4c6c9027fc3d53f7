"""How often does a small model loop in chat? Counts replies that repeat one word three times
in a row ("double double double"), over 10 short chat prompts, greedy and sampled with fixed
seeds, for each set of sampling settings: the evidence for `engine.sampling.CHAT_DEFAULTS`.

    python bench/chat_loops.py                        # SmolLM2, the settings compared below
    python bench/chat_loops.py -m MODEL --max-tokens 256

Not a timing benchmark: any machine gives the same counts (greedy is deterministic; sampling
is seeded).
"""

from __future__ import annotations

import argparse
import re

PROMPTS = [
    "Hi! How are you today?",
    "What is the capital of France?",
    "Tell me a joke.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me three tips for better sleep.",
    "Explain what a black hole is in one paragraph.",
    "What should I cook for dinner tonight?",
    "Describe your favourite colour.",
    "Write a short poem about double rainbows.",
]
SEEDS = (0,)  # sampled runs per prompt (more: --seeds N)
REPEAT = re.compile(r"\b(\w+)(?:\W+\1\b){2}", re.IGNORECASE)  # a word three times running

SETTINGS = {  # name → sampling options (beside temperature and seed)
    "engine defaults (no penalty)": {},
    "repeat_penalty 1.1, last 64 (Ollama)": {"repetition_penalty": 1.1, "repeat_last_n": 64},
    "repeat_penalty 1.1, last 64 of the reply": {"repetition_penalty": 1.1, "repeat_last_n": 64,
                                                 "penalize_prompt": False},
}


def loops(text: str) -> str | None:
    m = REPEAT.search(text)
    return m.group(0) if m else None


def start(model, options: dict, temperature: float, seeds, max_tokens: int) -> list:
    """Every prompt's generations for these settings, started at once (they run batched)."""
    prompts = [model.chat_prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    return [model.generate(ids, max_tokens=max_tokens, temperature=temperature, seed=seed,
                           **options) for ids in prompts for seed in seeds]


ANSWERS = {"What is the capital of France?": "Paris", "What is 12 times 7?": "84"}


def count(streams, per_prompt: int) -> tuple[int, int, int, int, list[str]]:
    """(replies that loop, replies, cut at max_tokens, factual replies that are right, the
    loops seen): the cost of a penalty shows in the last but one."""
    looped, cut, right, examples = 0, 0, 0, []
    for i, stream in enumerate(streams):
        tokens = list(stream)
        text = "".join(t.text for t in tokens)
        cut += tokens[-1].finish_reason == "length"
        right += ANSWERS.get(PROMPTS[i // per_prompt], "\0") in text
        hit = loops(text)
        if hit:
            looped += 1
            examples.append(hit[:40])
    return looped, len(streams), cut, right, examples


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="the sampled runs'")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="sampled runs per prompt")
    args = ap.parse_args(argv)
    import engine

    model = engine.load_model(args.model)
    print(f"{args.model}: {len(PROMPTS)} chat prompts, max_tokens {args.max_tokens}; "
          f"replies repeating one word three times in a row")
    seeds = range(args.seeds)
    runs = [(name, label, len(s), start(model, options, temp, s, args.max_tokens))
            for name, options in SETTINGS.items()
            for label, temp, s in (("greedy", 0.0, [0]),
                                   (f"T={args.temperature} seeds 0-{args.seeds - 1}",
                                    args.temperature, seeds))]
    for name, label, per_prompt, streams in runs:  # all of them run batched together
        looped, n, cut, right, examples = count(streams, per_prompt)
        print(f"{name:42} {label:16} {looped:2d}/{n:<2d} loop  {cut:2d} cut  "
              f"{right}/{2 * per_prompt} right  {'; '.join(examples[:3])}", flush=True)

if __name__ == "__main__":
    main()
