"""Where a prompt's prefill goes, op by op: one prompt of N tokens in chunks, as the scheduler
runs it (STEP_TOKENS rows a step), then the output head for the last row.

    python bench/prefill_profile.py [--model gemma3-270m] [--tokens 256] [--chunk 128]
                                    [--repeats 5] [--clock cpu|wall]

Every backend method is wrapped with a timer; the matmuls are split by matrix (q|k|v,
attn_output, gate|up, down, head) and each into its activation quantization and its kernel
(`kernels.qmatmul`'s module functions are wrapped as well). "python glue" is the rest of the
forward pass: the model's own Python (residual adds, reshapes), `Batch.pack`, the timers' own
cost. The minimum over repeats of each row is printed (so the rows need not add up exactly).

On a shared machine, `--clock cpu` (process CPU time) with `NUMBA_NUM_THREADS=1` measures the
work itself; with 2 threads CPU time also counts OpenMP's workers spinning at barriers, and
wall time counts the neighbours. Use it for ratios between rows and between trees, not tok/s.
It imports the tree it sits in: to compare two trees, run each one's own copy, alternating.
"""

from __future__ import annotations

import argparse
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
from kernels import jit, qmatmul  # noqa: E402

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
OPS = ("rms_norm", "rope", "rope_table", "store_kv", "attention", "silu_gate", "gelu_gate",
       "embed")


class Profiler:
    """Wraps the backend's methods and qmatmul's quantizer and kernels with timers."""

    def __init__(self, model, clock):
        self.net = model.model
        self.backend = model.backend
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        self.names = self._matrix_names()
        self.current = "?"  # the matrix whose matmul runs now
        self.saved_backend: list[str] = []
        self.saved_module: dict[str, object] = {}
        self.saved_kernels: dict[str, object] = {}

    def _matrix_names(self) -> dict[int, str]:
        names = {id(self.net.output): "head (last row)"}
        for layer in self.net.layers:
            for name, w in vars(layer).items():
                if not isinstance(w, np.ndarray):
                    names[id(w)] = name
                    for part in getattr(w, "parts", None) or ():
                        names[id(part)] = name
                    if getattr(w, "stacked", None) is not None:
                        names[id(w.stacked)] = name
        return names

    def _timed(self, fn, key):
        totals, clock = self.totals, self.clock

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key() if callable(key) else key] += clock() - t0

        return timed

    def __enter__(self):
        b = self.backend
        for op in OPS:
            fn = getattr(b, op, None)
            if fn is not None:
                self.saved_backend.append(op)
                setattr(b, op, self._timed(fn, op))
        for op in ("linear", "linear_many"):
            fn = getattr(b, op)

            def entry(x, w, _fn=fn):
                self.current = self.names.get(id(w), "?")
                return _fn(x, w)

            self.saved_backend.append(op)
            setattr(b, op, self._timed(entry, lambda: f"matmul {self.current}"))
        for fn_name in ("quantize_activations", "quantize_activations_parallel"):
            fn = getattr(qmatmul, fn_name)
            self.saved_module[fn_name] = fn
            setattr(qmatmul, fn_name, self._timed(fn, lambda: f"  quantize x: {self.current}"))
        if jit.ISA == "vnni":
            qmatmul._load_kernel("vnni")  # so its kernels are in _KERNELS to be wrapped
        for isa, fn in list(qmatmul._KERNELS.items()):
            self.saved_kernels[isa] = fn
            qmatmul._KERNELS[isa] = self._timed(fn, lambda: f"  kernel: {self.current}")
        return self

    def __exit__(self, *exc):
        for op in self.saved_backend:
            delattr(self.backend, op)
        for name, fn in self.saved_module.items():
            setattr(qmatmul, name, fn)
        qmatmul._KERNELS.update(self.saved_kernels)


def prefill(model, ids: list[int], chunk: int, clock, prof: Profiler | None = None) -> float:
    """Seconds for one prefill of `ids` in chunks of `chunk` rows, plus the head's last row."""
    net = model.model
    n = len(ids)
    pool = KVPool(*net.kv_layout(), n_blocks=-(-n // BLOCK))
    table = list(range(pool.n_blocks))

    def run():
        t0 = clock()
        for a in range(0, n, chunk):
            batch = Batch.pack([(ids[a:a + chunk], a)], pool, [table])
            hidden = net.forward(batch)
        net.logits(hidden[batch.last_rows()])
        return clock() - t0

    return COMPUTE.call(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=128, help="rows per forward pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    args = ap.parse_args()
    clock = CLOCKS[args.clock]
    model = load_model(args.model, backend="fast")
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(100, 20000, args.tokens)]
    prefill(model, ids, args.chunk, clock)  # compile and warm
    plain, rows = [], defaultdict(list)
    for _ in range(args.repeats):
        plain.append(prefill(model, ids, args.chunk, clock))
        with Profiler(model, clock) as prof:
            total = prefill(model, ids, args.chunk, clock, prof)
        t = prof.totals
        top = sum(v for k, v in t.items() if not k.startswith("  "))
        t["python glue"] = total - top
        for k, v in t.items():
            rows[k].append(v)
    best = min(plain)
    print(f"## prefill {model.id}, {args.tokens} tokens in chunks of {args.chunk}, "
          f"clock {args.clock}: {best * 1e3:.1f} ms ({args.tokens / best:.0f} tok/s), "
          f"min of {args.repeats}")
    print("| op | ms | % |\n|---|---|---|")
    order = sorted(rows, key=lambda k: (k.startswith("  "), -min(rows[k])))
    tops = [k for k in order if not k.startswith("  ")]
    for k in tops:
        ms = min(rows[k]) * 1e3
        print(f"| {k} | {ms:.1f} | {100 * min(rows[k]) / best:.0f} |")
        if k.startswith("matmul "):
            name = k[len("matmul "):]
            for sub in (f"  quantize x: {name}", f"  kernel: {name}"):
                if sub in rows:
                    print(f"| {sub.strip()} | {min(rows[sub]) * 1e3:.1f} | "
                          f"{100 * min(rows[sub]) / best:.0f} |")


if __name__ == "__main__":
    main()
