"""Soak test for `numbalm serve`: a mixed load at about twice capacity for a long time.

    python bench/soak.py                         # 20 minutes, SmolLM2, a server it starts
    python bench/soak.py --minutes 2             # a short check
    python bench/soak.py --fake --minutes 1      # the fake model, in-process (no weights, no RSS)

Starts `numbalm serve` on a free loopback port (or uses `--url`, loopback only, with `--pid`
for its memory) with `--slots` generation slots and a queue of `--queue`, and runs
2 x (slots + queue) clients that send requests back to back, each drawn from a mix: chat,
streamed chat, a stream the client drops after its first tokens, completions, embeddings,
malformed JSON, a body just over --max-body-size and one far over it. The excess waits or
gets 429 and waits its Retry-After (at most 5 s), as the OpenAI SDKs do. A probe asks
/readyz every second; the server's resident memory (VmRSS) is read every 5 s. The server's
embedding cache (1 MiB) and KV cache (64 MiB) are small, so both are full after the warm-up.

Reports requests by kind and status, latency p50/p99 per kind, RSS after the warm-up (the
first tenth, at most 2 minutes) and at the end, and /readyz answers that were not 200. Passes
(exit 0) when no answer was a 5xx other than 503, no request failed other than by design,
/readyz answered 200 throughout, and RSS grew at most 5 % after the warm-up.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_BODY = 64 * 1024
# The embedding cache is an LRU bounded by bytes: a small one fills during the warm-up, so RSS
# after it measures leaks, not the cache filling up to its bound (64 MiB by default).
EMBEDDING_CACHE = 1 << 20
# Likewise the KV cache: its pages are touched as blocks are first used, so a pool of the
# default 1 GiB would grow RSS for a long time; 64 MiB (~1,400 SmolLM2 positions, enough for
# the slots) is all in use within the warm-up.
KV_CACHE_MB = 64
# kind: weight in the mix
MIX = {"chat": 20, "stream": 20, "disconnect": 10, "completion": 10, "embedding": 15,
       "malformed": 10, "oversized": 10, "far_oversized": 5}
EXPECTED = {"malformed": {400}, "oversized": {413}, "far_oversized": {413}}


def body_for(kind: str, model: str, embed_model: str, rng: random.Random) -> bytes:
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "soak", "test"])
                     for _ in range(rng.randint(3, 40)))
    if kind in ("chat", "stream", "disconnect"):
        body = {"model": model, "max_tokens": rng.randint(8, 32), "temperature": 0.7,
                "seed": rng.randint(0, 2**31), "stream": kind != "chat",
                "messages": [{"role": "user", "content": words}]}
    elif kind == "completion":
        body = {"model": model, "prompt": words, "max_tokens": rng.randint(8, 32)}
    elif kind == "embedding":
        body = {"model": embed_model, "input": [words] * rng.randint(1, 4)}
    elif kind == "malformed":
        return rng.choice([b"{", b"[]", b'{"model": 5}', b"\xff\xfe", b'{"messages": "x"}'])
    elif kind == "oversized":
        return json.dumps({"model": model, "prompt": "x" * (MAX_BODY + 10)}).encode()
    else:  # far over: waitress refuses it before the app reads it
        return json.dumps({"model": model, "prompt": "x" * (8 * MAX_BODY + 2**20)}).encode()
    return json.dumps(body).encode()


RETRY_CAP = 5.0  # seconds a client waits at most after a 429/503
PATHS = {"completion": "/v1/completions", "embedding": "/v1/embeddings"}


def one_request(host, port, kind, body, timeout) -> tuple[int | str, float, float]:
    """(status or error name, seconds to the end of the answer, Retry-After or 0)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", PATHS.get(kind, "/v1/chat/completions"), body,
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        if kind == "disconnect" and r.status == 200:
            r.readline()  # the first event, then hang up mid-stream
            r.readline()
            if conn.sock is not None:  # (None: the server already closed it)
                conn.sock.close()
            return r.status, time.perf_counter() - t0, 0.0
        data = r.read()
        if r.status == 200 and kind in ("stream",) and b"data: [DONE]" not in data:
            return "unfinished_stream", time.perf_counter() - t0, 0.0
        retry = r.getheader("Retry-After") or "0"
        return r.status, time.perf_counter() - t0, float(retry) if retry.isdigit() else 0.0
    except (ConnectionResetError, BrokenPipeError) as e:
        if kind == "far_oversized":  # refused while sending: the 413 may be lost
            return 413, time.perf_counter() - t0, 0.0
        return type(e).__name__, time.perf_counter() - t0, 0.0
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__, time.perf_counter() - t0, 0.0
    except Exception as e:  # a bug in this client: counted, never a dead client thread
        return f"client_error:{type(e).__name__}", time.perf_counter() - t0, 0.0
    finally:
        conn.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def get_status(host, port, path) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    except OSError:
        return 0
    finally:
        conn.close()


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else 0.0


class Soak:
    def __init__(self, host, port, pid, args):
        self.host, self.port, self.pid, self.args = host, port, pid, args
        self.lock = threading.Lock()
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.readyz = Counter()
        self.rss: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        kinds, weights = zip(*MIX.items())
        while not self.stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            body = body_for(kind, self.args.model_name, self.args.embed_name, rng)
            status, seconds, retry_after = one_request(self.host, self.port, kind, body, 120)
            with self.lock:
                self.statuses[kind][status] += 1
                if status == 200:
                    self.latencies[kind].append(seconds)
            if status in (429, 503):  # as the OpenAI SDKs do: wait Retry-After (capped), jittered
                self.stop.wait(min(retry_after or 0.5, RETRY_CAP) * rng.uniform(0.5, 1.0))

    def probe(self, start: float) -> None:
        while not self.stop.wait(1.0):
            self.readyz[get_status(self.host, self.port, "/readyz")] += 1
            if self.pid and int(time.monotonic() - start) % 5 == 0:
                self.rss.append((time.monotonic() - start, rss_bytes(self.pid)))

    def run(self, seconds: float) -> dict:
        start = time.monotonic()
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True)
                   for i in range(self.args.clients)]
        threads.append(threading.Thread(target=self.probe, args=(start,), daemon=True))
        for t in threads:
            t.start()
        self.stop.wait(seconds)
        self.stop.set()
        for t in threads:
            t.join(timeout=150)
        return self.report(seconds)

    def report(self, seconds: float) -> dict:
        warm = min(seconds / 10, 120)
        after = [r for t, r in self.rss if t >= warm]
        rss_start, rss_end = (after[0], after[-1]) if after else (0, 0)
        growth = (rss_end - rss_start) / rss_start * 100 if rss_start else 0.0
        statuses = {k: {str(s): n for s, n in sorted(c.items(), key=str)}
                    for k, c in sorted(self.statuses.items())}
        bad = {k: {s: n for s, n in c.items()
                   if not (s in (200, 429, 503) or s in EXPECTED.get(k, ()))}
               for k, c in self.statuses.items()}
        bad = {k: v for k, v in bad.items() if v}
        summary = {
            "minutes": round(seconds / 60, 2), "clients": self.args.clients,
            "slots": self.args.slots, "queue": self.args.queue,
            "requests": sum(sum(c.values()) for c in self.statuses.values()),
            "by_kind_and_status": statuses,
            "latency_ms": {k: {"p50": round(percentile(v, 50) * 1000, 1),
                               "p99": round(percentile(v, 99) * 1000, 1), "n": len(v)}
                           for k, v in sorted(self.latencies.items())},
            "rss_mb_after_warmup": round(rss_start / 2**20, 1),
            "rss_mb_end": round(rss_end / 2**20, 1),
            "rss_growth_pct": round(growth, 2),
            "readyz": {str(k): v for k, v in self.readyz.items()},
            "unexpected": {k: {str(s): n for s, n in v.items()} for k, v in bad.items()},
        }
        summary["passed"] = (not bad and set(self.readyz) <= {200}
                             and (not self.pid or growth <= 5.0))
        return summary


def start_server(args) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = [args.model] + ([args.embed_model] if args.embed_model else [])
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
           "--max-concurrent", str(args.slots), "--queue-size", str(args.queue),
           "--queue-timeout", "60", "--max-body-size", str(MAX_BODY), "--log-level", "warning",
           "--embeddings-cache-bytes", str(EMBEDDING_CACHE), "--kv-cache-mb", str(KV_CACHE_MB)]
    for m in models:
        cmd += ["-m", m]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while get_status("127.0.0.1", port, "/readyz") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("soak: the server did not become ready")
        time.sleep(0.5)
    return proc, port


def fake_server(args):
    from server import ModelPool, create_app
    from server.http.wsgi import ServerThread
    from tests.server.fake_engine import FakeModel

    pool = ModelPool.from_models([FakeModel(delay=0.005)])
    args.model_name = args.embed_name = pool.list()[0].id
    app = create_app({"max_concurrent": args.slots, "queue_size": args.queue,
                      "queue_timeout": 60, "max_body_size": MAX_BODY,
                      "embeddings_cache_bytes": EMBEDDING_CACHE,
                      "threads": args.clients + 4}, pool=pool)
    return ServerThread(app).__enter__()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="how long (default 20)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the chat model")
    p.add_argument("--embed-model", default="", help="a second model for /v1/embeddings "
                   "(default: the chat model embeds)")
    p.add_argument("--slots", type=int, default=4, help="--max-concurrent of the server (4)")
    p.add_argument("--queue", type=int, default=4, help="--queue-size of the server (4)")
    p.add_argument("--clients", type=int, default=0, help="default 2 x (slots + queue)")
    p.add_argument("--url", help="a running server on loopback instead of starting one")
    p.add_argument("--pid", type=int, default=0, help="with --url: its pid, for RSS")
    p.add_argument("--fake", action="store_true", help="the fake model, in-process")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    args.clients = args.clients or 2 * (args.slots + args.queue)
    args.model_name = args.model
    args.embed_name = args.embed_model or args.model
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    proc = server = None
    if args.url:
        parts = urlsplit(args.url)
        if parts.hostname not in LOOPBACK:
            raise SystemExit("soak: only loopback servers (127.0.0.1, localhost, ::1)")
        host, port, pid = parts.hostname, parts.port or 80, args.pid
    elif args.fake:  # no RSS: the clients share the process, and the fake records its calls
        server = fake_server(args)
        host, port, pid = "127.0.0.1", int(server.url.rsplit(":", 1)[1]), 0
    else:
        proc, port = start_server(args)
        host, pid = "127.0.0.1", proc.pid
    try:
        summary = Soak(host, port, pid, args).run(args.minutes * 60)
    finally:
        if server:
            server.stop()
        if proc:
            proc.terminate()
            proc.wait(timeout=60)
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(0 if main()["passed"] else 1)
