"""Load test for `numbalm serve`: more concurrent streams than slots + queue, loopback only.

    python bench/load_test.py                      # in-process server, fake model (no weights)
    python bench/load_test.py --model smollm2-135m-instruct
    python bench/load_test.py --url http://127.0.0.1:8080 --model-name smollm2-135m-instruct

Fires `--concurrency` streamed chat requests at once, in waves, until `--requests` have been
sent or `--time-limit` passes. Expected: the excess gets 429 with Retry-After, everything
else completes with `[DONE]`, no 5xx, and /readyz still says ready. Prints requests/s, time to
first token p50/p99 and the 429 count; exits 1 if an expectation fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Result:
    status: int = 0
    ttft: float | None = None      # seconds to the first content delta
    seconds: float = 0.0
    done: bool = False             # the stream ended with [DONE]
    retry_after: str | None = None
    error: str = ""


def one_request(host: str, port: int, model: str, max_tokens: int, timeout: float) -> Result:
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]})
    result, t0 = Result(), time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json", "Authorization": "Bearer load-test"})
        response = conn.getresponse()
        result.status = response.status
        result.retry_after = response.getheader("Retry-After")
        if response.status != 200:
            response.read()
            return result
        for raw in response:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                result.done = True
            elif line.startswith("data: ") and result.ttft is None and '"content"' in line:
                result.ttft = time.perf_counter() - t0
    except (OSError, http.client.HTTPException) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.seconds = time.perf_counter() - t0
        conn.close()
    return result


def run_waves(host, port, args) -> tuple[list[Result], float]:
    results: list[Result] = []
    lock = threading.Lock()
    start, deadline = time.perf_counter(), time.perf_counter() + args.time_limit
    sent = 0
    while sent < args.requests and time.perf_counter() < deadline:
        wave = min(args.concurrency, args.requests - sent)
        barrier = threading.Barrier(wave)

        def fire(barrier=barrier):
            barrier.wait()
            r = one_request(host, port, args.model_name, args.max_tokens,
                            max(1.0, deadline - time.perf_counter()))
            with lock:
                results.append(r)

        threads = [threading.Thread(target=fire) for _ in range(wave)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sent += wave
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def report(results: list[Result], wall: float, ready: int) -> dict:
    ok = [r for r in results if r.status == 200 and r.done]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    summary = {
        "requests": len(results),
        "completed": len(ok),
        "rejected_429": sum(r.status == 429 for r in results),
        "429_without_retry_after": sum(r.status == 429 and not r.retry_after for r in results),
        "status_503": sum(r.status == 503 for r in results),
        "status_5xx_other": sum(r.status >= 500 and r.status != 503 for r in results),
        "other_failures": sum(r.status not in (200, 429, 503) or (r.status == 200 and not r.done)
                              for r in results),
        "requests_per_s": round(len(ok) / wall, 2) if wall else 0.0,
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 1),
        "readyz_after": ready,
    }
    summary["passed"] = (summary["status_5xx_other"] == 0 and summary["other_failures"] == 0
                         and summary["429_without_retry_after"] == 0 and ready == 200
                         and summary["completed"] + summary["rejected_429"]
                         + summary["status_503"] == len(results))
    return summary


def readyz(host: str, port: int) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def in_process_app(args):
    """An app with the fake model (or a real one) and a small admission queue."""
    from server import ModelPool, create_app

    if args.model:
        import engine

        pool = ModelPool.from_models([engine.load_model(args.model)], warmup=True)
    else:
        from tests.server.fake_engine import FakeModel

        pool = ModelPool.from_models([FakeModel(delay=args.fake_delay)])
    args.model_name = pool.list()[0].id
    config = {"max_concurrent": args.slots, "queue_size": args.queue, "queue_timeout": 60,
              "threads": args.concurrency + 4}
    return create_app(config, pool=pool)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server on loopback (default: start one in-process)")
    p.add_argument("--model", help="in-process: serve this real model instead of the fake one")
    p.add_argument("--model-name", default="fake-model", help="with --url: the model to ask for")
    p.add_argument("--requests", type=int, default=60, help="total requests (default 60)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="requests fired at once (default: slots + queue + 6)")
    p.add_argument("--slots", type=int, default=1, help="in-process max concurrent (default 1)")
    p.add_argument("--queue", type=int, default=4, help="in-process queue size (default 4)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--fake-delay", type=float, default=0.002, help="fake model s/token")
    p.add_argument("--time-limit", type=float, default=60.0, help="stop sending after (s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    args.concurrency = args.concurrency or args.slots + args.queue + 6
    args.requests = min(args.requests, 10_000)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    server = None
    if args.url:
        parts = urlsplit(args.url)
        if parts.hostname not in LOOPBACK:
            raise SystemExit("load_test: only loopback servers (127.0.0.1, localhost, ::1)")
        host, port = parts.hostname, parts.port or 80
    else:
        from server.http.wsgi import ServerThread

        server = ServerThread(in_process_app(args)).__enter__()
        parts = urlsplit(server.url)
        host, port = parts.hostname, parts.port
    try:
        results, wall = run_waves(host, port, args)
        summary = report(results, wall, readyz(host, port))
    finally:
        if server:
            server.stop()
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>24}: {value}")
    return summary


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(0 if main()["passed"] else 1)
