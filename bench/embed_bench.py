"""Embeddings per second through `model.embed` for batches of 1, 8, 32 and 128 short texts.

    .venv/bin/python bench/embed_bench.py [--model smollm2-135m-instruct] [--backend fast]

An encoder (`--model all-minilm-l6-v2`) runs each batch as packed forward passes; see
bench/minilm_bench.py for it against sentence-transformers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import load_model  # noqa: E402

TEXTS = [
    "The cat sat on the mat.", "A feline rested on the rug.", "Quarterly revenue grew by 12%.",
    "How do I reset my password?", "Paris is the capital of France.", "Rain is expected today.",
    "The quick brown fox jumps.", "Embeddings map text to vectors.",
]


def texts(n: int) -> list[str]:
    return [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="fast")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per batch size")
    args = ap.parse_args()
    model = load_model(args.model, backend=args.backend)
    model.embed(texts(2))  # compile / warm up
    pooling = getattr(model.args, "pooling", "mean")
    print(f"{model.id} ({args.backend}), {pooling} pooling, normalized")
    print(f"{'batch':>5} {'tokens/text':>11} {'ms/batch':>9} {'embeddings/s':>12}")
    for batch in (1, 8, 32, 128):
        inputs = texts(batch)
        n_tok = sum(len(model.tokenizer.encode(t)) for t in inputs) / batch
        runs, start = 0, time.perf_counter()
        while True:
            model.embed(inputs)
            runs += 1
            elapsed = time.perf_counter() - start
            if elapsed >= args.seconds and runs >= 2:
                break
        print(f"{batch:>5} {n_tok:>11.1f} {1000 * elapsed / runs:>9.1f} "
              f"{batch * runs / elapsed:>12.1f}")


if __name__ == "__main__":
    main()
