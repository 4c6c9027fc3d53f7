"""N streaming clients against `numbalm serve` and llama-server, side by side, loopback only.

    python bench/concurrency.py --llama-server /path/to/llama-server          # both, SmolLM2
    python bench/concurrency.py --model gemma3-270m --chat-template gemma --clients 1 8 ...
    python bench/concurrency.py --numbalm-only                                 # no peer

Each server is started on a free 127.0.0.1 port with the same GGUF file and 2 threads
(numbalm: `--max-concurrent 8`; llama-server: `-np 8`, continuous batching), warmed up, then
given, for each client count N, N clients at once, each streaming `--requests` chat
completions one after another (distinct prompts, greedy, `--max-tokens` tokens). Reported per
server and N: aggregate completion tokens/s over the wave (tokens from the stream's `usage`,
so early end-of-turn is counted honestly), tokens/s per request, and time to first token
p50/p99. Both servers are up at once but serve one wave at a time, so they never share the
2 cores; every wave is bounded by `--time-limit`. `--rounds` repeats every wave on every
server, interleaved (round 1: 1 client on numbalm, on llama-server, 2 clients on each, ...),
and the table gives medians: this machine's speed drifts by tens of percent over minutes
(seen here: the same 1-client wave at 160 and 212 tok/s), so a figure and its peer's are
measured close in time, and each ratio ("x peer"; "x own 1", to the same server's 1-client
figure) is the median of the rounds' own ratios.

A base model (gemma3-270m has no chat template) needs `--chat-template NAME|FILE`; both servers
get the same one (numbalm's built-ins chatml and gemma are llama-server's names too).

llama-server is built from the llama-cpp-python sdist (docs/internals.md, "Benchmarks"); pass
its path. This script starts it with a loopback host and no web UI; nothing else is read.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["a lighthouse keeper", "the first winter on Mars", "a clockmaker's apprentice",
          "a river that flows uphill", "the last bookshop in town", "a dragon who hates gold",
          "a chess game between rivals", "an old violin", "a city under the sea",
          "a garden on a rooftop", "a train that never stops", "the quietest village",
          "a robot learning to paint", "a storm over the prairie", "a forgotten recipe",
          "two friends lost in a forest", "a map drawn in invisible ink", "the moon's twin",
          "a tea shop at midnight", "a kite that carried a letter"]


def prompt(i: int) -> list[dict]:
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"Write a long, detailed story about {topic}. "
                                        f"(story {i})"}]


@dataclass
class Result:
    ttft: float | None = None
    seconds: float = 0.0
    tokens: int = 0
    ok: bool = False
    error: str = ""


@dataclass
class Wave:
    clients: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.results if r.ok and r.ttft is not None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(port: int, model: str, i: int, max_tokens: int, timeout: float) -> Result:
    body = json.dumps({"model": model, "messages": prompt(i), "stream": True,
                       "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
                       "temperature": 0, "seed": 1})
    r, t0 = Result(), time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return r
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                r.ok = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                r.tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if r.ttft is None and (choice.get("delta") or {}).get("content"):
                    r.ttft = time.perf_counter() - t0
    except (OSError, http.client.HTTPException, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        r.seconds = time.perf_counter() - t0
        conn.close()
    return r


def run_wave(port: int, model: str, clients: int, requests: int, max_tokens: int,
             time_limit: float, first_prompt: int) -> Wave:
    wave, lock = Wave(clients), threading.Lock()
    deadline = time.perf_counter() + time_limit
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for k in range(requests):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            r = stream_one(port, model, first_prompt + c * requests + k, max_tokens, left)
            with lock:
                wave.results.append(r)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wave.wall = time.perf_counter() - t0
    return wave


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summary(wave: Wave) -> dict:
    ok = [r for r in wave.results if r.ok]
    ttfts = wave.ttfts()
    tokens = sum(r.tokens for r in ok)
    per_request = [r.tokens / (r.seconds - r.ttft) for r in ok if r.ttft and r.seconds > r.ttft]
    return {"clients": wave.clients, "requests": len(wave.results), "failed": len(wave.results)
            - len(ok), "tokens": tokens, "agg_tok_s": tokens / wave.wall if wave.wall else 0.0,
            "stream_tok_s": statistics.median(per_request) if per_request else float("nan"),
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "errors": sorted({r.error for r in wave.results if r.error})[:3]}


# -- the servers -------------------------------------------------------------------------------

def wait_ready(port: int, proc: subprocess.Popen, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited early (code {proc.returncode})")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server on port {port} was not ready within {timeout:g} s")


def start_numbalm(model_path: str, args) -> tuple[subprocess.Popen, int, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "-m", f"bench={model_path}",
           "--port", str(port), "--max-concurrent", str(args.slots),
           "--queue-size", "64", "--log-level", "warning"]
    if args.chat_template:
        cmd += ["--chat-template", args.chat_template]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, cwd=args.numbalm_src or ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, proc, "/readyz", 300)
    return proc, port, "bench"


def start_llama_server(model_path: str, args) -> tuple[subprocess.Popen, int, str]:
    port = free_port()
    binary = Path(args.llama_server)
    cmd = [str(binary), "-m", model_path, "--host", "127.0.0.1", "--port", str(port),
           "-np", str(args.slots), "-c", str(args.slots * 2048), "-t", str(args.threads),
           "-tb", str(args.threads), "--no-webui"]
    if args.chat_template:
        builtin = args.chat_template in ("chatml", "gemma")
        cmd += ["--chat-template" if builtin else "--chat-template-file", args.chat_template]
    env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, proc, "/health", 120)
    return proc, port, "bench"


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    model: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(servers: list[Server], args) -> list[dict]:
    """Every round runs each client count on each server in turn, so that a server's waves and
    its peer's lie close in time (this machine's speed drifts by tens of percent over minutes):
    one row per (round, server, clients)."""
    for s in servers:
        run_wave(s.port, s.model, 1, 1, 16, 60, 10_000)  # warm up (JIT, caches)
    rows = []
    for rnd in range(args.rounds):
        for n in args.clients:
            for s in servers:  # distinct prompts in every wave: no prefix cache across them
                wave = run_wave(s.port, s.model, n, args.requests, args.max_tokens,
                                args.time_limit, first_prompt=1000 * rnd + 100 * n)
                row = {"server": s.name, "round": rnd, **summary(wave), "ttfts": wave.ttfts()}
                print(json.dumps({k: v for k, v in row.items() if k != "ttfts"}),
                      file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def combine(rows: list[dict]) -> list[dict]:
    """Per (server, clients) over the rounds: the median aggregate tok/s and per-stream tok/s,
    the median of each round's ratios (to the peer's wave of that round; to the same server's
    1-client wave of that round), TTFT percentiles over every request of every round."""
    def nan_median(values):
        values = [v for v in values if v == v]
        return statistics.median(values) if values else float("nan")

    at = {(r["round"], r["server"], r["clients"]): r for r in rows}
    out = []
    for server, n in dict.fromkeys((r["server"], r["clients"]) for r in rows):
        mine = [r for r in rows if r["server"] == server and r["clients"] == n]
        peer = [r["agg_tok_s"] / at[k]["agg_tok_s"] for r in mine
                if (k := (r["round"], "llama-server", n)) in at and at[k]["agg_tok_s"]]
        own = [r["agg_tok_s"] / at[k]["agg_tok_s"] for r in mine
               if (k := (r["round"], server, 1)) in at and at[k]["agg_tok_s"]]
        ttfts = [t for r in mine for t in r["ttfts"]]
        out.append({"server": server, "clients": n, "rounds": len(mine),
                    "agg_tok_s": nan_median([r["agg_tok_s"] for r in mine]),
                    "agg_range": (min(r["agg_tok_s"] for r in mine),
                                  max(r["agg_tok_s"] for r in mine)),
                    "x_peer": nan_median(peer), "x_own_1": nan_median(own),
                    "stream_tok_s": nan_median([r["stream_tok_s"] for r in mine]),
                    "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
                    "requests": sum(r["requests"] for r in mine),
                    "failed": sum(r["failed"] for r in mine)})
    return out


def print_table(model: str, rows: list[dict]) -> None:
    rounds = max((r["rounds"] for r in rows), default=0)
    print(f"\n{model}: streaming chat, greedy, loopback; medians of {rounds} interleaved "
          f"round(s)")
    head = (f"{'clients':>7} {'server':14} {'agg tok/s':>10} {'(min-max)':>13} {'x peer':>7} "
            f"{'x own 1':>7} {'per-stream':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'reqs':>5} "
            f"{'failed':>6}")
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (r["clients"], r["server"] != "numbalm")):
        lo, hi = r["agg_range"]
        print(f"{r['clients']:7d} {r['server']:14} {r['agg_tok_s']:10.1f} "
              f"{f'({lo:.0f}-{hi:.0f})':>13} {r['x_peer']:7.2f} {r['x_own_1']:7.2f} "
              f"{r['stream_tok_s']:10.1f} {r['ttft_p50']:9.2f} {r['ttft_p99']:9.2f} "
              f"{r['requests']:5d} {r['failed']:6d}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry id or .gguf path")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=2, help="per client, one after another")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved repetitions of every wave on every server")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=8, help="sequences batched (both servers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per wave at most")
    ap.add_argument("--llama-server", help="path to a llama-server binary (the peer)")
    ap.add_argument("--numbalm-only", action="store_true")
    ap.add_argument("--chat-template", metavar="NAME|FILE",
                    help="for a base model without a chat template: chatml, gemma or a file")
    ap.add_argument("--numbalm-src", help="run numbalm from this source tree (default: here)")
    args = ap.parse_args(argv)
    from engine.registry import resolve_model_path

    model_path = resolve_model_path(args.model)
    starts = [("numbalm", start_numbalm)]
    if not args.numbalm_only:
        if not args.llama_server:
            print("llama-server not measured: pass --llama-server PATH (or --numbalm-only)",
                  file=sys.stderr)
        else:
            starts.append(("llama-server", start_llama_server))
    servers = []
    try:
        for name, start in starts:  # both up at once; an idle server waits without spinning
            servers.append(Server(name, *start(model_path, args)))
        rows = measure(servers, args)
    finally:
        for s in servers:
            s.stop()
    print_table(args.model, combine(rows))


if __name__ == "__main__":
    main()
