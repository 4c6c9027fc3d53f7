"""What one batched decode step costs, in process: batch 1, 2, 4, 8 at a few context lengths.

    python bench/batch_step.py [--model smollm2-135m-instruct] [--contexts 64 512]
                               [--batches 1 2 4 8] [--steps 30] [--repeats 3]

Two parts, both on the compute thread (engine/compute.py), as the server runs them:

1. **forward**: B sequences that each have `ctx` positions in the KV cache decode one token
   (one `Batch` of B rows, as the scheduler packs it), then the output head for the B rows.
   Prints ms/step, and the same step again with every backend call timed, split into
   matmuls (`linear`, `linear_many`, the output head), attention (`store_kv`, `attention`),
   norms/rope/glue (`rms_norm`, `rope`, the gates, the embedding lookup) and the rest (the
   model's own Python: residual adds, reshapes), plus the ratio of B rows to one.
2. **scheduler**: B real generations (greedy, distinct prompts) through `LLM.submit`, timed
   per step from the scheduler's own counters and split into forward, output head, sampling
   (each sequence's `Decoding.step`) and scheduling/hand-off (the rest of the step).

On a busy machine wall time is noise (OpenMP's workers wait for each other's time slices);
`--clock cpu` times with the process's CPU time instead, which with `NUMBA_NUM_THREADS=1`
is the work itself, a fair guide to ratios (not to tok/s).

3. **http** (`--http`): the same B greedy generations streamed over loopback from an
   in-process `numbalm serve` (waitress), B client threads reading the SSE lines. Prints
   the wall ms/step and the CPU ms/step of each group of threads (the compute thread and
   OpenMP's workers; waitress's loop and worker threads; the clients), so what the server
   adds per step shows beside what the model costs, even on a busy machine.

Batch sizes alternate within each repeat (1, 2, 4, 8, 1, 2, ...) and the median over repeats
is printed, so a noisy neighbour hurts them alike; the ratio column is what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import load_model  # noqa: E402
from engine.batch import Batch  # noqa: E402
from engine.compute import COMPUTE  # noqa: E402
from engine.kv import BLOCK, KVPool  # noqa: E402

CLOCK = time.perf_counter  # --clock cpu: time.process_time

# backend method -> the column it is counted in
CATEGORIES = {
    "linear": "matmul", "linear_many": "matmul",
    "store_kv": "attention", "attention": "attention",
    "rms_norm": "norm/rope/glue", "rope": "norm/rope/glue", "silu_gate": "norm/rope/glue",
    "gelu_gate": "norm/rope/glue", "embed": "norm/rope/glue",
}
COLUMNS = ("matmul", "attention", "norm/rope/glue", "other", "head")


class Timed:
    """Wraps a backend's methods so each call's time goes to its CATEGORIES column."""

    def __init__(self, backend):
        self.backend = backend
        self.totals: dict[str, float] = defaultdict(float)
        self.saved = {}

    def __enter__(self):
        for name, column in CATEGORIES.items():
            fn = getattr(self.backend, name, None)
            if fn is None:
                continue
            self.saved[name] = fn
            setattr(self.backend, name, self._wrap(fn, column))
        return self

    def _wrap(self, fn, column):
        totals, clock = self.totals, CLOCK

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[column] += clock() - t0

        return timed

    def __exit__(self, *exc):
        for name in self.saved:
            delattr(self.backend, name)  # the class's method shows through again


def decode_batch(model, pool: KVPool, b: int, ctx: int) -> Batch:
    """B sequences at position `ctx` (their keys so far: whatever the pool holds) decoding one
    token each, with block tables of their own."""
    per_seq = -(-(ctx + 1) // BLOCK)
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(b)]
    rng = np.random.default_rng(b * 1000 + ctx)
    pieces = [([int(rng.integers(100, 10000))], ctx) for _ in range(b)]
    return Batch.pack(pieces, pool, tables)


def time_forward(model, batch: Batch, steps: int, timer: Timed | None = None) -> float:
    """Seconds per step: forward over `batch`, then the output head for its last rows."""
    net = model.model

    def run():
        t0 = CLOCK()
        for _ in range(steps):
            hidden = net.forward(batch)
            h0 = CLOCK()
            net.logits(hidden[batch.last_rows()])
            if timer is not None:
                timer.totals["head"] += CLOCK() - h0
        return (CLOCK() - t0) / steps

    return COMPUTE.call(run)


def forward_table(model, contexts, batches, steps, repeats) -> None:
    layout = model.model.kv_layout()
    need = max(batches) * -(-(max(contexts) + 1) // BLOCK)
    pool = KVPool(*layout, n_blocks=need)
    pool.k[:] = np.random.default_rng(0).standard_normal(pool.k.shape, np.float32) * 0.5
    pool.v[:] = np.random.default_rng(1).standard_normal(pool.v.shape, np.float32) * 0.5
    print(f"\n## forward + head, one decode step ({model.id}, {model.backend_name})")
    print("| ctx | B | ms/step | ms/row | vs B=1 | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(COLUMNS))
    for ctx in contexts:
        plain = defaultdict(list)
        parts = defaultdict(lambda: defaultdict(list))
        batches_of = {b: decode_batch(model, pool, b, ctx) for b in batches}
        for b in batches:  # compile and warm
            time_forward(model, batches_of[b], 2)
        for _ in range(repeats):
            for b in batches:
                plain[b].append(time_forward(model, batches_of[b], steps))
                with Timed(model.backend) as timer:
                    total = time_forward(model, batches_of[b], steps, timer)
                split = {c: timer.totals[c] / steps for c in COLUMNS if c != "other"}
                # the head's own linear is in its column, not in matmul's
                split["matmul"] = max(0.0, split["matmul"] - split["head"])
                split["other"] = total - sum(split.values())
                for c in COLUMNS:
                    parts[b][c].append(split[c])
        base = statistics.median(plain[batches[0]])
        for b in batches:
            ms = statistics.median(plain[b]) * 1e3
            cols = " | ".join(f"{statistics.median(parts[b][c]) * 1e3:.2f}" for c in COLUMNS)
            print(f"| {ctx} | {b} | {ms:.2f} | {ms / b:.2f} | "
                  f"{statistics.median(plain[b]) / base:.2f}x | {cols} |")


def scheduler_table(model, batches, n_tokens, repeats) -> None:
    """Real generations through the scheduler: per-step time split into its parts."""
    sched = model._scheduler()
    net = model.model
    clock = CLOCK
    totals: dict[str, float] = defaultdict(float)
    forward, logits = net.forward, net.logits

    def timed_forward(batch):
        t0 = clock()
        try:
            return forward(batch)
        finally:
            totals["forward"] += clock() - t0

    def timed_logits(h):
        t0 = clock()
        try:
            return logits(h)
        finally:
            totals["head"] += clock() - t0

    from engine import generate as gen

    step = gen.Decoding.step

    def timed_step(self, row):
        t0 = clock()
        try:
            return step(self, row)
        finally:
            totals["sampling"] += clock() - t0

    sched_step = sched.step
    steps_run = [0]

    def timed_sched_step():
        t0 = clock()
        try:
            return sched_step()
        finally:
            totals["step"] += clock() - t0
            steps_run[0] += 1

    tok = model.tokenizer
    no_end = {t: -100.0 for t in tok.eot_ids}  # every sequence runs all its tokens
    print(f"\n## scheduler steps, {n_tokens} greedy tokens per sequence ({model.id})")
    print("| B | ms/step | vs B=1 | forward | head | sampling | scheduling | tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    results = defaultdict(list)
    net.forward, net.logits, gen.Decoding.step = timed_forward, timed_logits, timed_step
    sched.step = timed_sched_step
    try:
        for r in range(repeats + 1):  # the first round warms up
            for b in batches:
                prompts = [tok.encode(f"Story {r}-{i}: once upon a time, a {i}", add_bos=True)
                           for i in range(b)]
                streams = [model.generate(p, max_tokens=n_tokens, temperature=0.0,
                                          logit_bias=no_end) for p in prompts]
                for s in streams:  # every prompt prefilled: decode steps only from here
                    next(s)
                totals.clear()
                steps_run[0] = 0
                t0 = time.perf_counter()
                n = sum(1 for s in streams for _ in s)
                wall = time.perf_counter() - t0
                per = {k: v / steps_run[0] for k, v in totals.items()}
                per["tok/s"] = n / wall  # wall clock, whatever --clock says
                if r:
                    results[b].append(per)
    finally:
        del net.forward, net.logits, sched.step
        gen.Decoding.step = step
    base = statistics.median(p["step"] for p in results[batches[0]])
    for b in batches:
        med = {k: statistics.median(p.get(k, 0.0) for p in results[b])
               for k in ("step", "forward", "head", "sampling", "tok/s")}
        sched_ms = med["step"] - med["forward"] - med["head"] - med["sampling"]
        print(f"| {b} | {med['step'] * 1e3:.2f} | {med['step'] / base:.2f}x | "
              f"{med['forward'] * 1e3:.2f} | {med['head'] * 1e3:.2f} | "
              f"{med['sampling'] * 1e3:.2f} | {sched_ms * 1e3:.2f} | {med['tok/s']:.0f} |")


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads, by group (from /proc/self/task)."""
    import os
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    groups: dict[str, float] = defaultdict(float)
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread has ended
        name = names.get(int(tid), "")
        group = ("compute" if name in ("numbalm-compute", "") else
                 "waitress" if name.startswith("waitress") else
                 "clients" if name.startswith("client") else "other")
        groups[group] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return groups


def http_table(model, batches, n_tokens, repeats) -> None:
    """B streaming clients against an in-process server: wall and CPU per step, by thread."""
    import http.client
    import json
    import threading

    from server import ModelPool, create_app
    from server.http.wsgi import ServerThread

    pool = ModelPool.from_models([model], warmup=True)
    app = create_app({"max_concurrent": max(batches), "queue_size": max(batches)}, pool=pool)
    no_end = {str(t): -100 for t in model.tokenizer.eot_ids}
    sched = model._scheduler()

    def client(port, i, r, counts):
        body = json.dumps({"model": model.id, "stream": True, "max_tokens": n_tokens,
                           "temperature": 0, "logit_bias": no_end,
                           "messages": [{"role": "user", "content": f"Story {r}-{i} of a {i}"}]})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        n = 0
        for line in resp:
            if line.startswith(b"data: {") and b'"content":"' in line:
                n += 1
        counts[i] = n
        conn.close()

    print(f"\n## http: B streaming clients, {n_tokens} greedy tokens each ({model.id})")
    print("| B | steps | wall ms/step | tok/s | CPU ms/step: compute | waitress | clients |")
    print("|---|---|---|---|---|---|---|")
    with ServerThread(app) as server:
        port = server.server.effective_port
        rows = defaultdict(list)
        for r in range(repeats + 1):
            for b in batches:
                counts = [0] * b
                threads = [threading.Thread(target=client, args=(port, i, r, counts),
                                            name=f"client-{i}") for i in range(b)]
                cpu0, steps0, t0 = thread_cpu(), sched.stats.steps, time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                cpu1, steps = thread_cpu(), sched.stats.steps - steps0
                if r:
                    rows[b].append({"wall": wall / steps, "tok/s": sum(counts) / wall,
                                    "steps": steps,
                                    **{g: (cpu1[g] - cpu0.get(g, 0)) / steps
                                       for g in ("compute", "waitress", "clients")}})
        for b in batches:
            med = {k: statistics.median(x[k] for x in rows[b]) for k in rows[b][0]}
            print(f"| {b} | {med['steps']:.0f} | {med['wall'] * 1e3:.2f} | {med['tok/s']:.0f} "
                  f"| {med['compute'] * 1e3:.2f} | {med['waitress'] * 1e3:.2f} "
                  f"| {med['clients'] * 1e3:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["smollm2-135m-instruct"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=30, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per generation (scheduler)")
    ap.add_argument("--no-scheduler", action="store_true")
    ap.add_argument("--no-forward", action="store_true")
    ap.add_argument("--http", action="store_true", help="also stream over loopback HTTP")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (use with NUMBA_NUM_THREADS=1 when busy)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    for name in args.model:
        model = load_model(name, backend="fast")
        if not args.no_forward:
            forward_table(model, args.contexts, args.batches, args.steps, args.repeats)
        if not args.no_scheduler:
            scheduler_table(model, args.batches, args.tokens, args.repeats)
        if args.http:
            http_table(model, args.batches, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
