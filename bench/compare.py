"""numbalm vs llama.cpp vs transformers on the same prompts, in one table.

    python bench/compare.py [--runs 3] [--models smollm2-135m-instruct gemma3-270m]
    python bench/compare.py --llama-bench /path/to/llama-bench   # llama.cpp's own benchmark

Each measurement runs in its own process (so one engine's threads, caches and allocator do
not colour another's), and the engines alternate run by run so that a noisy neighbour on a
shared machine hurts them all alike. Every engine gets the same token ids: a 256-token
prompt for prefill, then 128 greedy tokens for decode, 2 threads. A peer that is not
installed (`pip install '.[bench]'`) is left out of the table with a note. `--llama-bench`
adds llama.cpp's `llama-bench` binary (built from the llama-cpp-python sdist, see
docs/internals.md) as a peer: `-p 256 -n 128 -t 2`, its own timing of the same sizes (its
prompt is its own random tokens); the ratios are against llama-cpp-python when installed,
else against llama-bench.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

ENGINES = ("numbalm", "llama.cpp", "llama-bench", "transformers")
PEER_MODULES = {"llama.cpp": "llama_cpp", "transformers": "transformers"}
THREADS = 2
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based inks and a wooden screw press. "
)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(model_id: str, n: int) -> list[int]:
    import engine

    tok = engine.load_model(model_id, backend="reference").tokenizer
    ids = tok.encode(PROMPT_TEXT * 40, add_bos=True)
    return ids[:n]


# -- one measurement per engine, each in its own process -------------------------------------


def run_numbalm(path, ids, n_new):
    import engine

    t0 = time.perf_counter()
    model = engine.load_model(path, backend="fast")
    load = time.perf_counter() - t0
    # compile / warm caches, on other tokens than the prompt's (no prefix-cache hit below)
    list(model.generate(ids[16:32], max_tokens=2, temperature=0.0))
    t0 = time.perf_counter()
    steps = model.generate(ids, max_tokens=n_new + 1, temperature=0.0)
    next(steps)  # prefill + the first token
    t1 = time.perf_counter()
    n = sum(1 for _ in steps)
    t2 = time.perf_counter()
    return load, len(ids) / (t1 - t0), n / (t2 - t1)


def run_llamacpp(path, ids, n_new):
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=THREADS,
                n_threads_batch=THREADS, verbose=False)
    load = time.perf_counter() - t0
    llm.eval(ids[:16])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(n_new):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    return load, len(ids) / (t1 - t0), n_new / (t2 - t1)


def run_transformers(path, ids, n_new):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
    model.eval()
    load = time.perf_counter() - t0
    with torch.no_grad():
        model(torch.tensor([ids[:16]]))
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        t1 = time.perf_counter()
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        for _ in range(n_new):
            out = model(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
        t2 = time.perf_counter()
    return load, len(ids) / (t1 - t0), n_new / (t2 - t1)


RUNNERS = {"numbalm": run_numbalm, "llama.cpp": run_llamacpp, "transformers": run_transformers}


def worker(args) -> None:
    with open(args.ids_file) as f:
        ids = json.load(f)
    load, prefill, decode = RUNNERS[args.worker](args.path, ids, args.new_tokens)
    print(json.dumps({"load_s": load, "prefill": prefill, "decode": decode, "rss_mb": rss_mb()}))


# -- the driver --------------------------------------------------------------------------------


def available_engines(llama_bench: str | None = None) -> list[str]:
    return [e for e in ENGINES if (e == "llama-bench" and llama_bench)
            or (e != "llama-bench" and (e not in PEER_MODULES
                                       or importlib.util.find_spec(PEER_MODULES[e]))) ]


def run_llama_bench(binary: str, path: str, n_prompt: int, n_new: int) -> dict | None:
    """One llama-bench run of pp<n_prompt> and tg<n_new> (its own process, 2 threads)."""
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(binary))
    cmd = [binary, "-m", path, "-t", str(THREADS), "-p", str(n_prompt), "-n", str(n_new),
           "-r", "1", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        print(f"  llama-bench failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    rows = json.loads(proc.stdout)
    speed = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}
    return {"load_s": float("nan"), "rss_mb": float("nan"), **speed}


def measure(engine_name, path, ids_file, n_new, args=None) -> dict | None:
    if engine_name == "llama-bench":
        return run_llama_bench(args.llama_bench, path, args.prompt_tokens, n_new)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), NUMBA_NUM_THREADS=str(THREADS))
    cmd = [sys.executable, __file__, "--worker", engine_name, "--path", path,
           "--ids-file", ids_file, "--new-tokens", str(n_new)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        print(f"  {engine_name} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--engines", nargs="+", default=None)
    ap.add_argument("--worker", choices=ENGINES)
    ap.add_argument("--path")
    ap.add_argument("--ids-file")
    ap.add_argument("--llama-bench", help="path to llama.cpp's llama-bench binary (a peer)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from engine.registry import resolve_model_path

    installed = available_engines(args.llama_bench)
    engines = args.engines or installed
    missing = [e for e in ENGINES if e not in installed and e != "llama-bench"]
    if missing:
        print(f"not measured (not installed; pip install '.[bench]'): {', '.join(missing)}")
    if args.engines:  # a peer left out on purpose is not reported missing
        engines = [e for e in engines if e in installed]
    rows = []
    for model_id in args.models:
        path = resolve_model_path(model_id)
        ids_file = f"/tmp/numbalm-compare-{model_id}.json"
        with open(ids_file, "w") as f:
            json.dump(prompt_ids(model_id, args.prompt_tokens), f)
        results = {e: [] for e in engines}
        for run in range(args.runs):
            for e in engines:  # alternate engines within each run
                r = measure(e, path, ids_file, args.new_tokens, args)
                print(f"  {model_id} run {run + 1} {e}: {r}", file=sys.stderr)
                if r:
                    results[e].append(r)
        rows += summarize(model_id, results)
    print_table(rows)


def summarize(model_id, results) -> list[dict]:
    med = {e: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
           for e, runs in results.items() if runs}
    base = med.get("llama.cpp") or med.get("llama-bench")
    rows = []
    for e, m in med.items():
        ratio = {k: (m[k] / base[k] if base else float("nan")) for k in ("prefill", "decode")}
        rows.append({"model": model_id, "engine": e, **m, "n": len(results[e]),
                     "prefill_x": ratio["prefill"], "decode_x": ratio["decode"]})
    return rows


def print_table(rows) -> None:
    head = (f"{'model':24} {'engine':13} {'prefill tok/s':>13} {'x llama.cpp':>11} "
            f"{'decode tok/s':>12} {'x llama.cpp':>11} {'load s':>7} {'RSS MB':>7} {'runs':>4}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:24} {r['engine']:13} {r['prefill']:13.1f} {r['prefill_x']:11.2f} "
              f"{r['decode']:12.1f} {r['decode_x']:11.2f} {r['load_s']:7.2f} "
              f"{r['rss_mb']:7.0f} {r['n']:4d}")


if __name__ == "__main__":
    main()
