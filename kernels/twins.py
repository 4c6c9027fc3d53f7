"""Every Numba kernel with its NumPy twin: the table `TWINS` that tests/kernels/test_twins.py walks.

`TWINS[kernel] = Twin(ref, cases, rtol, atol, ...)`. For each argument tuple of `cases()`, the
kernel's result must agree with the twin's,

    |kernel - ref| < atol + rtol * scale        (scale: |ref|, or the entry's own `scale`)

and be equal (`assert_array_equal`) where rtol = atol = 0. A kernel writes into a last argument
`out` (`into_out`); the few called otherwise say how (`run`, `run_ref`). The test also finds
every public Numba dispatcher in `kernels/` and fails for one missing here, so a new kernel
cannot ship without its twin. Names with a leading underscore are helpers, not kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kernels import attention, decode_layer, jit, mask, norms, qmatmul, strings, vnni
from kernels.qpack import SPLIT, repack, unpack_ref
from kernels.testing import random_tensor

# --- how a kernel and its twin are called --------------------------------------------------------


def into_out(kernel, args: tuple, want):
    """`kernel(*args, out)` into an `out` shaped like the twin's result, NaN-filled so that an
    element the kernel forgets to write shows."""
    out = np.full_like(want, np.nan)
    kernel(*args, out)
    return out


def returned(ref, args: tuple):
    """The twin returns its result."""
    return ref(*args)


@dataclass(frozen=True)
class Twin:
    """How to check one kernel against its NumPy twin (module docstring)."""

    ref: Callable  # the NumPy twin
    cases: Callable[[], dict[str, tuple]]  # case name -> arguments of `ref`
    rtol: float = 0.0
    atol: float = 0.0
    scale: Callable | None = None  # scale(*args): what rtol is relative to (default |ref|)
    run: Callable = into_out  # run(kernel, args, want) -> the kernel's result
    run_ref: Callable = returned  # run_ref(ref, args) -> the twin's result
    available: bool = True  # False where this CPU cannot run the kernel


def _randn(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# --- norms: RMSNorm, RoPE, gates, LayerNorm, GELU, bias ------------------------------------------


def _rms_norm_cases():
    r = np.random.default_rng(1)
    return {"5x576": (_randn(r, 5, 576) * 3, _randn(r, 576), 1e-5)}


ROPE_POSITIONS = np.array([0, 1, 2, 50, 51, 1000, 8191])


def _rope_table_cases():
    cases = {f"base={base}": (ROPE_POSITIONS, norms.rope_inv_freq(base, 64), 1.0)
             for base in (10000.0, 1e6)}
    llama3_like = norms.rope_inv_freq(10000.0, 64) / np.linspace(1, 8, 32)  # scaled frequencies
    cases["scaled, mscale=1.19"] = (ROPE_POSITIONS, llama3_like, 1.19)  # longrope-like factor
    return cases


def _into_table(kernel, args, want):
    """`rope_table(positions, inv_freq, mscale, out)`."""
    out = np.full_like(want, np.nan)
    kernel(*args, out)
    return out


def _rope_cases():
    r = np.random.default_rng(2)
    x = _randn(r, 7, 3, 64)  # (n, heads, hd)
    fused = _randn(r, 7, 5 * 64)  # q|k|v columns of one output: q is a strided view
    table = norms.rope_table_ref(ROPE_POSITIONS, norms.rope_inv_freq(10000.0, 64))  # (n, 2, hd/2)
    cases = {f"neox={neox}": (x, table, neox) for neox in (False, True)}
    cases["strided q"] = (fused[:, : 3 * 64].reshape(7, 3, 64), table, False)
    return cases


def _gate_cases():
    r = np.random.default_rng(3)
    gate, up = _randn(r, 3, 1536) * 4, _randn(r, 3, 1536)
    gate[0, :3] = [-100, 100, 0]  # saturated and zero
    return {"3x1536": (gate, up)}


def _gate_scale(gate, up):
    """tanh is a rational approximation (abs. error ~1e-7): compare relative to |gate * up|."""
    return np.abs(gate * up)


def _layer_norm_cases():
    r = np.random.default_rng(4)
    x, w, b = _randn(r, 7, 383) * 3 + 5, _randn(r, 383), _randn(r, 383)  # odd d, mean far from 0
    return {"7x383": (x, w, b, 1e-12)}


def _add_layer_norm_cases():
    r = np.random.default_rng(5)
    x, y, w, b = _randn(r, 5, 97), _randn(r, 5, 97) * 10, _randn(r, 97), _randn(r, 97)
    return {"5x97": (x, y, w, b, 1e-5)}


def _gelu_cases():
    x = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30]]).astype(np.float32)
    return {"-12..12": (x.reshape(1, -1),)}  # (1, 4004)


def _gelu_scale(x):
    return np.abs(x)


def _add_bias_cases():
    r = np.random.default_rng(6)
    x, b = _randn(r, 3, 1537) * 3, _randn(r, 1537)
    return {f"gelu={gelu}": (x, b, gelu) for gelu in (False, True)}


# --- attention -----------------------------------------------------------------------------------

def _paged_attention_cases():
    """Packed rows of several sequences over a paged cache whose blocks are shuffled: a
    sequence decoding one token beside others prefilling chunks, with and without a window."""
    r, block, cases = np.random.default_rng(7), attention.KV_BLOCK, {}
    # (query heads, kv heads, window, [(first position, rows) per sequence], head size):
    # the score pass has vector code for head sizes 64, 96, 128, 256 and loops for others
    shapes = [(9, 3, 0, [(0, 1)], 64), (9, 3, 0, [(37, 1), (0, 20), (5, 3)], 64),
              (4, 1, 0, [(0, 6), (20, 5)], 64), (4, 1, 8, [(30, 6), (3, 1)], 64),
              (4, 2, 16, [(40, 1), (0, 33)], 64), (4, 1, 0, [(3, 20), (50, 1)], 256),
              (2, 1, 0, [(0, 18)], 128), (3, 1, 5, [(10, 4)], 96), (2, 1, 0, [(7, 9)], 24)]
    for n_head, n_kv, window, seqs, hd in shapes:
        need = [-(-(p0 + rows) // block) for p0, rows in seqs]  # blocks per sequence
        order = r.permutation(sum(need) + 2)  # shuffled block ids, two never used
        tables = np.zeros((len(seqs), max(need)), np.int32)
        at = 0
        for s, n_blocks in enumerate(need):
            tables[s, :n_blocks] = order[at:at + n_blocks]
            at += n_blocks
        slots = (sum(need) + 2) * block
        k, v = _randn(r, n_kv, slots, hd), _randn(r, n_kv, slots, hd)
        row_seq = np.concatenate([np.full(rows, s, np.int32) for s, (_, rows) in enumerate(seqs)])
        positions = np.concatenate([np.arange(p0, p0 + rows) for p0, rows in seqs])
        q = _randn(r, len(positions), n_head, hd)
        cases[f"heads={n_head}/{n_kv},hd={hd},window={window},seqs={seqs}"] = (
            q, k, v, tables, row_seq, positions, window, 0.125)
    return cases


def _paged_attention_softcap_cases():
    """The paged cases with soft-capping at 5 (scores of these random q, k reach ~20)."""
    return {name: (*args, 5.0) for name, args in _paged_attention_cases().items()}


def _kv_store_cases():
    r = np.random.default_rng(10)
    k_cache, v_cache = _randn(r, 3, 64, 16), _randn(r, 3, 64, 16)  # (n_kv, slots, hd)
    slots = np.array([5, 0, 63, 17])
    return {"4 rows": (k_cache, v_cache, slots, _randn(r, 4, 3, 16), _randn(r, 4, 3, 16))}


def _caches_after(store, args, want=None):
    """The store writes the caches in place: run it on copies, return them."""
    k_cache, v_cache, slots, k, v = args
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    store(k_cache, v_cache, slots, k, v)
    return np.stack([k_cache, v_cache])


def _encoder_attention_cases():
    r, cases = np.random.default_rng(8), {}
    for lengths in ([1], [7], [3, 1, 9, 2], [17, 5]):
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (B+1,)
        qkv = _randn(r, sum(lengths), 3, 3, 24)  # (n, q|k|v, n_head, hd)
        cases[f"lengths={lengths}"] = (qkv, starts, 0.2)
    return cases


# --- token masks ---------------------------------------------------------------------------------


def _mask_cases():
    r, cases = np.random.default_rng(9), {}
    for n_vocab in (49152, 1001, 33, 5):
        words = r.integers(-(2**31), 2**31, (n_vocab + 31) // 32).astype(np.int32)
        words[::3], words[1::5] = 0, -1  # the kernel's whole-word paths
        cases[f"vocab={n_vocab}"] = (_randn(r, n_vocab), words)
    cases["vocab=70,2 words"] = (_randn(r, 70), np.full(2, -1, np.int32))  # tokens past the mask
    return cases


def _in_place(f, args, want=None):
    """Both work on the logits in place: run each on a copy."""
    logits, bitmask = args
    logits = logits.copy()
    f(logits, bitmask)
    return logits


# --- quantized matmul ----------------------------------------------------------------------------


def _quantize_cases():
    cases = {}
    for n in (1, 3, 40):  # 40: more than one 16-token task of the parallel kernel
        x = np.random.default_rng(n).standard_normal((n, 96)).astype(np.float32) * 5
        x[0, :32] = 0  # an all-zero block has scale 0
        x[-1, 40] = 1e-30  # a tiny value beside big ones
        for terms in (1, 2):
            cases[f"n={n},terms={terms}"] = (x, terms)
    return cases


def _into_xq_xd_xs(kernel, args, want):
    """The quantizers write xq, xd, xs; the number of terms is xq's rows per token."""
    x, _ = args
    xq, xd, xs = (np.empty_like(a) for a in want)
    kernel(x, xq, xd, xs)
    return xq, xd, xs


def _matmul_cases():
    """Every packed layout; odd row counts pad the last group; 1, 6 and 37 tokens take the
    single-token path, the 4-token tile and its remainder."""
    cases = {}
    for qtype in SPLIT:
        for shape in ((37, 256), (64, 512)):
            for n_tok in (1, 6, 37):
                w = repack(random_tensor(qtype, shape, seed=shape[0] + n_tok), qtype, shape)
                x = np.random.default_rng(n_tok).standard_normal((n_tok, shape[1]))
                for terms in (1, 2):
                    name = f"{qtype.name},{shape[0]}x{shape[1]},n={n_tok},terms={terms}"
                    cases[name] = (x.astype(np.float32), w, terms)
    return cases


def _on_quantized(kernel, args, want):
    """The matmul kernels read activations quantized by the (bit-exact) twin quantizer."""
    x, w, terms = args
    xq, xd, xs = qmatmul.quantize_activations_ref(x, terms)
    out = np.full_like(want, np.nan)
    kernel(w.data, w.layout, w.block_bytes, xq, xd, xs, w.n_out, out)
    return out


def _matmul_scale(x, w, terms):
    """Only the float summation order differs: relative to |x| @ |W|.T, (n, n_out)."""
    return np.abs(x) @ np.abs(unpack_ref(w)).T


def _linear_cases():
    return {name: args for name, args in _matmul_cases().items() if "n=37" not in name}


def _linear_run(kernel, args, want):
    """`vnni.linear` quantizes x itself."""
    x, w, terms = args
    out = np.full_like(want, np.nan)
    kernel(x, w.data, w.layout, w.block_bytes, w.n_out, terms, out)
    return out


def _decoder_layer_cases():
    """A llama layer (SiLU, no extra norms) and a gemma3 one (GELU, per-head and post norms,
    NeoX RoPE, a window of 4): 3 sequences of 1, 2 and 5 rows over their cached positions.

    Three activation terms (22 bits), not the passes' two: the two sides differ by float
    rounding (the order of attention's sums; AVX2 computes Q8_0 as d·q, the reference as
    d·u + m), and an activation that lands on the other side of a rounding step of the next
    matmul moves its outputs by that step times a weight. At 15 bits that is ~1e-3 here, the
    tolerance itself (seen on AVX2: one flipped low byte in row 7 moved O by 1e-3 and the
    layer by 7e-3); at 22 bits it is 256 times smaller. tests/kernels/test_decode_layer.py
    checks two terms on the real models."""
    from gguf.constants import GGMLQuantizationType as Q

    rng = np.random.default_rng(5)
    dim, n_heads, n_kv, hd, ffn = 64, 4, 2, 16, 96
    qd, kvd = n_heads * hd, n_kv * hd
    shapes = {decode_layer.Q: (qd + 2 * kvd, dim), decode_layer.O: (dim, qd),
              decode_layer.GATE: (2 * ffn, dim), decode_layer.DOWN: (dim, ffn)}
    weights, meta = [np.zeros(0, np.uint8)] * 7, np.zeros((7, 3), np.int64)
    for slot, shape in shapes.items():
        w = repack(random_tensor(Q.Q8_0, shape, seed=slot), Q.Q8_0, shape)
        weights[slot], meta[slot] = w.data, (w.layout, w.block_bytes, w.n_out)
    starts, lengths = np.array([3, 0, 6]), np.array([1, 2, 5])  # positions already cached
    positions = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, lengths)])
    row_seq = np.repeat(np.arange(3, dtype=np.int32), lengths)
    tables = np.arange(6, dtype=np.int32).reshape(3, 2)  # 2 blocks of 16 per sequence
    slots = (tables[row_seq, positions // 16] * 16 + positions % 16).astype(np.int64)
    table = norms.rope_table_ref(positions, norms.rope_inv_freq(10000.0, hd)).astype(np.float32)
    none = np.zeros(0, np.float32)
    cases = {}
    for name, gelu, extra, neox, window in (("llama", False, False, False, 0),
                                            ("gemma3", True, True, True, 4)):
        hd_norm, dim_norm = (_randn(rng, hd), _randn(rng, dim)) if extra else (none, none)
        caches = _randn(rng, n_kv, 6 * 16, hd), _randn(rng, n_kv, 6 * 16, hd)
        cases[name] = (_randn(rng, len(positions), dim), tuple(weights), meta,
                       _randn(rng, dim), _randn(rng, dim), hd_norm, hd_norm * 0.5, dim_norm,
                       dim_norm * 2, np.array([n_heads, n_kv, hd, ffn], np.int64), 1e-6, gelu,
                       neox, table, *caches, slots, tables, row_seq, positions.astype(np.int64),
                       window, 0.25, 3)
    return cases


def _layer_after(fn, args, want=None):
    """The layer's output and the caches it wrote, run on copies of the caches."""
    args = list(args)
    args[14], args[15] = args[14].copy(), args[15].copy()
    return fn(*args), args[14], args[15]
# --- GGUF string arrays ------------------------------------------------------------------------


def _string_records(texts: list[bytes], lie: dict | None = None) -> np.ndarray:
    """`u64 length | bytes` records (a length replaced where `lie` says) -> uint8 buffer."""
    lie = lie or {}
    return np.frombuffer(b"".join(lie.get(i, len(t)).to_bytes(8, "little") + t
                                  for i, t in enumerate(texts)), np.uint8)


def _string_starts_cases():
    words = [b"", b"a", b"\xe2\x96\x81the", b"x" * 300, b"\0\0", b""]
    good = _string_records(words)
    return {"vocabulary": (good, 0, len(words), 1000),
            "at an offset": (np.concatenate([np.zeros(5, np.uint8), good]), 5, 4, 1000),
            "none": (good, 0, 0, 1000),
            "one too many": (good, 0, len(words) + 1, 1000),
            "over max_len": (good, 0, len(words), 299),
            "length past the end": (_string_records(words, {2: 10**6}), 0, len(words), 10**7),
            "length of 2**64 - 1": (_string_records(words, {1: 2**64 - 1}), 0, len(words), 10),
            "cut in a length": (good[:20], 0, len(words), 1000)}


def _walk(f, args, want=None):
    """Both write the starts and return where they stopped: compare the two."""
    buf, pos, count, max_len = args
    starts = np.full(count + 1, -1, np.int64)
    return starts, np.array([f(buf, pos, count, max_len, starts)])


# --- the table -----------------------------------------------------------------------------------

_GATE = {"cases": _gate_cases, "rtol": 1e-6, "atol": 1e-6, "scale": _gate_scale}
_QUANTIZE = {"cases": _quantize_cases, "run": _into_xq_xd_xs}  # bit for bit: no fastmath
_MATMUL = {"cases": _matmul_cases, "rtol": 1e-5, "atol": 1e-6, "scale": _matmul_scale,
           "run": _on_quantized}

TWINS: dict[Callable, Twin] = {
    norms.rms_norm: Twin(norms.rms_norm_ref, _rms_norm_cases, rtol=1e-5, atol=1e-5),
    norms.rope_table: Twin(norms.rope_table_ref, _rope_table_cases, rtol=1e-6, atol=1e-6,
                           run=_into_table),
    norms.rope: Twin(norms.rope_ref, _rope_cases, rtol=1e-5, atol=1e-5),
    norms.silu_gate: Twin(norms.silu_gate_ref, **_GATE),
    norms.gelu_gate: Twin(norms.gelu_gate_ref, **_GATE),
    norms.layer_norm: Twin(norms.layer_norm_ref, _layer_norm_cases, rtol=1e-4, atol=1e-5),
    norms.add_layer_norm: Twin(norms.add_layer_norm_ref, _add_layer_norm_cases, rtol=1e-4,
                               atol=1e-5),
    norms.gelu: Twin(norms.gelu_ref, _gelu_cases, rtol=2e-7, atol=2e-7, scale=_gelu_scale),
    norms.add_bias: Twin(norms.add_bias_ref, _add_bias_cases, rtol=1e-5, atol=1e-6),
    attention.paged_attention: Twin(attention.paged_attention_ref, _paged_attention_cases,
                                    rtol=1e-4, atol=1e-5),
    attention.paged_attention_prefill: Twin(attention.paged_attention_ref,
                                            _paged_attention_cases, rtol=1e-4, atol=1e-5),
    attention.paged_attention_softcap: Twin(attention.paged_attention_ref,
                                            _paged_attention_softcap_cases, rtol=1e-4,
                                            atol=1e-5),
    attention.kv_store: Twin(attention.kv_store_ref, _kv_store_cases, run=_caches_after,
                             run_ref=_caches_after),
    attention.encoder_attention: Twin(attention.encoder_attention_ref, _encoder_attention_cases,
                                      rtol=1e-4, atol=1e-5),
    mask.apply_token_bitmask: Twin(mask.apply_token_bitmask_ref, _mask_cases, run=_in_place,
                                   run_ref=_in_place),
    qmatmul.quantize_activations: Twin(qmatmul.quantize_activations_ref, **_QUANTIZE),
    qmatmul.quantize_activations_parallel: Twin(qmatmul.quantize_activations_ref, **_QUANTIZE),
    qmatmul.qmatmul_generic: Twin(qmatmul.matmul_ref, **_MATMUL),
    strings.string_starts: Twin(strings.string_starts_ref, _string_starts_cases, run=_walk,
                                run_ref=_walk),
    vnni.qmatmul_vnni: Twin(qmatmul.matmul_ref, **_MATMUL, available=jit.HAS_INT8_DOT),
    vnni.qmatmul_vnni_serial: Twin(qmatmul.matmul_ref, **_MATMUL,
                                   available=jit.HAS_INT8_DOT),
    qmatmul.quantize_activations_auto: Twin(qmatmul.quantize_activations_ref, **_QUANTIZE),
    vnni.linear: Twin(qmatmul.matmul_ref, _linear_cases, rtol=1e-5, atol=1e-6,
                      scale=_matmul_scale, run=_linear_run, available=jit.HAS_INT8_DOT),
    decode_layer.decoder_layer: Twin(decode_layer.decoder_layer_ref, _decoder_layer_cases,
                                     rtol=1e-3, atol=1e-3, run=_layer_after,
                                     run_ref=_layer_after, available=jit.HAS_INT8_DOT),
}
