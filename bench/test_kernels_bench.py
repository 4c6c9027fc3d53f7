"""Kernel benchmarks on the real tensor shapes of SmolLM2-135M (Q4_1) and Gemma-3-270M (Q4_K_M).

    pytest bench/test_kernels_bench.py --benchmark-only [-s to see the summary lines]

Weights are random but valid GGUF blocks of the models' real types and shapes (no model file
needed). Each quantized matmul reports GB/s (packed weight bytes / time) and GFLOP/s
(2 * n_tok * n_out * n_in / time) in `extra_info`, next to NumPy's float32 `x @ W.T` (BLAS) on
the same shape. `test_model_linear_tok_s` runs every linear layer of a model plus its output head
as a decode (1 token) or prefill (256 tokens; head on the last one) step, and reports tokens/s
for the matmuls alone (an upper bound for the whole model).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q

from kernels import attention, norms, qmatmul
from kernels.qpack import GROUP, PackedWeight, repack
from kernels.testing import random_tensor

# (name, qtype, (n_out, n_in), count per model)
SMOLLM2 = [
    ("attn_q", Q.Q4_1, (576, 576), 30),
    ("attn_k", Q.Q4_1, (192, 576), 30),
    ("attn_v", Q.Q4_1, (192, 576), 30),
    ("attn_output", Q.Q4_1, (576, 576), 30),
    ("ffn_gate", Q.Q4_1, (1536, 576), 30),
    ("ffn_up", Q.Q4_1, (1536, 576), 30),
    ("ffn_down", Q.Q4_1, (576, 1536), 30),
    ("output", Q.Q8_0, (49152, 576), 1),
]
GEMMA3 = [
    ("attn_q", Q.Q5_0, (1024, 640), 18),
    ("attn_k", Q.Q5_0, (256, 640), 18),
    ("attn_v", Q.Q8_0, (256, 640), 18),
    ("attn_output", Q.Q4_K, (640, 1024), 18),
    ("ffn_gate", Q.Q5_0, (2048, 640), 18),
    ("ffn_up", Q.Q5_0, (2048, 640), 18),
    ("ffn_down", Q.Q6_K, (640, 2048), 9),
    ("ffn_down", Q.Q4_K, (640, 2048), 9),
    ("output", Q.Q8_0, (262144, 640), 1),
]
MODELS = {"smollm2": SMOLLM2, "gemma3": GEMMA3}
CASES = [(m, *row[:3]) for m, rows in MODELS.items() for row in rows]
PREFILL = 128  # tokens per prefill call in the per-kernel benchmarks
# activation terms (kernels.qmatmul): 2 (15 bits, the default) and llama.cpp's 8-bit rounding
TERMS, TERM_IDS = [2, 1], ["x15bit", "x8bit"]


def _weight(qtype, shape, seed=0) -> PackedWeight:
    return repack(random_tensor(qtype, shape, seed), qtype, shape)


def _report(benchmark, n_bytes, flops):
    t = benchmark.stats.stats.min
    benchmark.extra_info["GB/s"] = round(n_bytes / t / 1e9, 1)
    benchmark.extra_info["GFLOP/s"] = round(flops / t / 1e9, 1)


@pytest.mark.parametrize("terms", TERMS, ids=TERM_IDS)
@pytest.mark.parametrize("n_tok", [1, PREFILL], ids=["decode", "prefill"])
@pytest.mark.parametrize("model, name, qtype, shape", CASES, ids=lambda v: getattr(v, "name", v))
def test_qmatmul(benchmark, model, name, qtype, shape, n_tok, terms):
    benchmark.group = f"{model}-{name}-{qtype.name}-{'decode' if n_tok == 1 else 'prefill'}"
    w = _weight(qtype, shape)
    x = np.random.default_rng(0).standard_normal((n_tok, shape[1])).astype(np.float32)
    out = np.empty((n_tok, shape[0]), np.float32)
    benchmark(qmatmul.matmul, x, w, out, terms=terms)
    _report(benchmark, w.nbytes, 2 * n_tok * shape[0] * shape[1])


@pytest.mark.parametrize("n_tok", [1, PREFILL], ids=["decode", "prefill"])
@pytest.mark.parametrize("model, name, qtype, shape", CASES, ids=lambda v: getattr(v, "name", v))
def test_numpy_float32_baseline(benchmark, model, name, qtype, shape, n_tok):
    benchmark.group = f"{model}-{name}-{qtype.name}-{'decode' if n_tok == 1 else 'prefill'}"
    W = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((n_tok, shape[1])).astype(np.float32)
    out = np.empty((n_tok, shape[0]), np.float32)
    benchmark(np.matmul, x, W.T, out=out)
    _report(benchmark, W.nbytes, 2 * n_tok * shape[0] * shape[1])


def _fuse(ws: list[PackedWeight]) -> PackedWeight:
    """Stack matrices reading the same input (q|k|v, gate|up) as FastBackend.prepare_many does."""
    assert len({w.layout for w in ws}) == 1 and all(w.n_out % GROUP == 0 for w in ws[:-1])
    data = np.concatenate([w.data for w in ws])
    return PackedWeight(ws[0].qtype, sum(w.n_out for w in ws), ws[0].n_in, ws[0].layout, data=data)


def _layer_rows(model: str, i: int) -> dict:
    """name -> (qtype, shape) of layer i (Gemma3 alternates Q6_K and Q4_K for ffn_down)."""
    rows = {}
    for name, qtype, shape, _ in MODELS[model]:
        if name != "output" and (name not in rows or i % 2 == 1):
            rows[name] = (qtype, shape)
    return rows


def _model_weights(model: str, fused: bool) -> list[PackedWeight]:
    """All linear weights of one model in forward order (one call each), output head last."""
    n_layers = max(count for *_, count in MODELS[model])
    calls = [["attn_q", "attn_k", "attn_v"], ["attn_output"], ["ffn_gate", "ffn_up"], ["ffn_down"]]
    weights = []
    for i in range(n_layers):
        rows = _layer_rows(model, i)
        for names in calls:
            ws = [_weight(*rows[n], seed=i) for n in names]
            if fused and len(ws) > 1 and len({w.layout for w in ws}) == 1:
                weights.append(_fuse(ws))
            else:
                weights.extend(ws)
    _, qtype, shape, _ = MODELS[model][-1]
    return weights + [_weight(qtype, shape)]


@pytest.mark.parametrize("terms", TERMS, ids=TERM_IDS)
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("n_tok", [1, 256], ids=["decode", "prefill256"])
@pytest.mark.parametrize("model", list(MODELS))
def test_model_linear_tok_s(benchmark, model, n_tok, fused, terms):
    """Every matmul of one forward step: tokens/s = n_tok / time (matmuls only)."""
    benchmark.group = f"model-{model}"
    ws = _model_weights(model, fused)
    # prefill needs logits for the last token only: the head runs on one row
    rows = [n_tok] * (len(ws) - 1) + [1]
    rng = np.random.default_rng(0)
    xs = {
        n_in: rng.standard_normal((n_tok, n_in)).astype(np.float32) for n_in in {w.n_in for w in ws}
    }
    outs = [np.empty((n, w.n_out), np.float32) for w, n in zip(ws, rows, strict=True)]

    def step():
        for w, out in zip(ws, outs, strict=True):
            qmatmul.matmul(xs[w.n_in][: out.shape[0]], w, out, terms=terms)

    benchmark.pedantic(step, rounds=5 if n_tok == 1 else 2, warmup_rounds=1)
    n_bytes = sum(w.nbytes for w in ws)
    flops = sum(2 * n * w.n_out * w.n_in for w, n in zip(ws, rows, strict=True))
    _report(benchmark, n_bytes, flops)
    tok_s = n_tok / benchmark.stats.stats.min
    benchmark.extra_info["tok/s"] = round(tok_s, 1)
    print(
        f"\n{model} {'decode' if n_tok == 1 else 'prefill'} {'fused' if fused else ''} "
        f"{terms} term(s): "
        f"{tok_s:.0f} tok/s (matmuls only), {n_bytes / benchmark.stats.stats.min / 1e9:.1f} "
        f"GB/s, {flops / benchmark.stats.stats.min / 1e9:.0f} GFLOP/s"
    )


# --- the small kernels ---------------------------------------------------------------------------


def _paged(rng, n_head, n_kv, hd, n_keys, rows):
    """Arguments of `paged_attention` for one sequence whose last `rows` positions are queried:
    its keys in blocks 0, 1, 2, ... of a cache just big enough."""
    n_blocks = -(-n_keys // attention.KV_BLOCK)
    slots = n_blocks * attention.KV_BLOCK
    k, v = (rng.standard_normal((n_kv, slots, hd)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((rows, n_head, hd)).astype(np.float32)
    tables = np.arange(n_blocks, dtype=np.int32)[None, :]  # (1, n_blocks)
    positions = np.arange(n_keys - rows, n_keys)
    out = np.empty((rows, n_head * hd), np.float32)
    return (q, k, v, tables, np.zeros(rows, np.int32), positions, 0, 0.125, out), k.nbytes * 2


@pytest.mark.parametrize("n_keys", [256, 2048])
@pytest.mark.parametrize("model, n_head, n_kv, hd", [("smollm2", 9, 3, 64), ("gemma3", 4, 1, 256)])
def test_attention_decode(benchmark, model, n_head, n_kv, hd, n_keys):
    benchmark.group = f"attention-{model}"
    args, nbytes = _paged(np.random.default_rng(0), n_head, n_kv, hd, n_keys, 1)
    benchmark(attention.paged_attention, *args)
    _report(benchmark, nbytes, 4 * n_head * n_keys * hd)


def test_attention_prefill(benchmark):
    benchmark.group = "attention-smollm2"
    args, nbytes = _paged(np.random.default_rng(0), 9, 3, 64, 256, 256)
    benchmark(attention.paged_attention, *args)
    _report(benchmark, nbytes, 4 * 9 * 64 * 256 * 257 / 2)


@pytest.mark.parametrize("kernel", ["rms_norm", "rope", "silu_gate", "gelu_gate"])
def test_small_kernels_decode(benchmark, kernel):
    benchmark.group = "small-kernels"
    rng = np.random.default_rng(0)
    if kernel == "rms_norm":
        x, w = rng.standard_normal((1, 576)).astype(np.float32), np.ones(576, np.float32)
        benchmark(norms.rms_norm, x, w, 1e-5, np.empty_like(x))
    elif kernel == "rope":
        x = rng.standard_normal((1, 9, 64)).astype(np.float32)
        benchmark(norms.rope, x, np.array([100]), 10000.0, False, np.empty_like(x))
    else:
        g, u = rng.standard_normal((2, 1, 1536)).astype(np.float32)
        benchmark(getattr(norms, kernel), g, u, np.empty_like(g))
