"""Time to first token of a second chat turn whose ~1,000-token history the prefix cache has.

    python bench/prefix_cache.py [--model smollm2-135m-instruct] [--rounds 5]

Loopback only: one in-process `numbalm serve` (waitress). Each round has a history of its own:
turn 1 is sent (which leaves its blocks in the prefix cache), then turn 2 (history + reply +
a short question) is streamed and its time to first token measured: *warm*. The same turn 2
is then streamed to a second served model that has not seen this history: *cold*. Prints
the medians, their ratio, and `cached_tokens` as the server reported it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def history(r: int) -> list[dict]:
    facts = " ".join(f"Entry {i} of ledger {r}: {i * 7 % 97} crates of apples shipped north."
                     for i in range(60))
    return [{"role": "user", "content": facts + " Which entry shipped the most crates?"}]


def stream_ttft(url: str, model: str, messages: list[dict]) -> tuple[float, dict, str]:
    """(seconds to the first content delta, usage, reply text) of one streamed chat."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    body = json.dumps({"model": model, "messages": messages, "stream": True, "temperature": 0,
                       "max_tokens": 16, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    ttft, usage, text = None, {}, ""
    for raw in conn.getresponse():
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                ttft = ttft or time.perf_counter() - t0
                text += content
    conn.close()
    return ttft, usage, text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import engine
    from server import ModelPool, create_app
    from server.http.wsgi import ServerThread

    warm_llm, cold_llm = engine.load_model(args.model), engine.load_model(args.model)
    pool = ModelPool.from_models([warm_llm], warmup=True)
    cold_llm.id = "cold"
    cold_pool = ModelPool.from_models([cold_llm], warmup=True)
    warm, cold, cached, prompt = [], [], [], []
    with ServerThread(create_app({}, pool=pool)) as ws, \
            ServerThread(create_app({}, pool=cold_pool)) as cs:
        for r in range(args.rounds):
            turn1 = history(r)
            _, _, reply = stream_ttft(ws.url, warm_llm.id, turn1)
            turn2 = turn1 + [{"role": "assistant", "content": reply},
                             {"role": "user", "content": "And the least?"}]
            t_warm, usage, _ = stream_ttft(ws.url, warm_llm.id, turn2)
            t_cold, cold_usage, _ = stream_ttft(cs.url, "cold", turn2)
            warm.append(t_warm)
            cold.append(t_cold)
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
            prompt.append(usage["prompt_tokens"])
            # the cold server saw other rounds only: at most the shared system-prompt block
            assert cold_usage["prompt_tokens_details"]["cached_tokens"] <= 32
            print(f"round {r + 1}: prompt {usage['prompt_tokens']} tokens, cached "
                  f"{cached[-1]}, TTFT warm {t_warm * 1000:.0f} ms, cold {t_cold * 1000:.0f} ms",
                  file=sys.stderr)
    w, c = statistics.median(warm), statistics.median(cold)
    print(f"{args.model}: second turn, {statistics.median(prompt):.0f}-token prompt, "
          f"{statistics.median(cached):.0f} cached: TTFT cold {c * 1000:.0f} ms, warm "
          f"{w * 1000:.0f} ms, {c / w:.1f}x lower (median of {args.rounds})")


if __name__ == "__main__":
    main()
