"""Quantized linear kernels against `gguf.quants.dequantize(W) @ x` (the oracle).

Weights are random GGUF blocks (random bytes with sane float16 scales), so every format's layout
is exercised without a model file; odd row counts test the padded last group, 1, 6 and 37 tokens
test the single-token path, the 4-token tile and its remainder, and the parallel quantizer.
Every activation mode is held to its bound: one 8-bit term (llama.cpp's rounding, error
xd / 2 per element), two (15 bits, xd / 256) and three (22 bits, xd / 32768, traced passes);
`matmul_exact` (three terms and the K-quant scale residual) to float32 rounding of the oracle.
"""

import logging
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kernels import jit, qmatmul
from kernels.qpack import (
    BYTE32_M,
    LAYOUT_BLK,
    LAYOUT_BYTE16,
    LAYOUT_BYTE32,
    LAYOUT_NIBBLE32,
    LAYOUT_NIBBLE32_HI,
    SPLIT,
    PackedWeight,
    pack,
    repack,
    unpack_ref,
)
from kernels.testing import random_tensor

PACKED = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q2_K, Q.Q3_K]
DENSE = [Q.F32, Q.F16]
K_QUANTS = (Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q2_K, Q.Q3_K)  # scales d * sc rounded to float16
ISAS = ["generic"] + (["vnni", "vnni-serial"] if jit.HAS_INT8_DOT else [])


def oracle(raw, qtype, shape):
    return dequantize(raw, qtype).reshape(shape).astype(np.float32)


def act_bound(x, W, terms=1):
    """Max error from quantized activations: sum_e |W[r, e]| * xd[e // 32] * step / 2, with
    step 1 for one term, 1/128 for two and 1/128^2 for three; shape (n, n_out)."""
    _, xd, _ = qmatmul.quantize_activations_ref(x, terms)
    step = 1 / qmatmul.FINE ** (terms - 1)
    return (np.repeat(xd, 32, axis=1) * (step / 2)) @ np.abs(W).T


@pytest.mark.parametrize("qtype", PACKED + DENSE, ids=lambda q: q.name)
def test_unpack_matches_oracle(qtype):
    shape = (37, 512)
    raw = random_tensor(qtype, shape)
    W = oracle(raw, qtype, shape)
    got = unpack_ref(repack(raw, qtype, shape))
    # K-quant scales d*sc are rounded to float16 at repack; the rest is exact
    tol = 2.0**-10 * np.abs(W).max() if qtype in K_QUANTS else 0
    np.testing.assert_allclose(got, W, rtol=0, atol=tol)
    assert (qtype in SPLIT) == (repack(raw, qtype, shape).data is not None)


@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n_tok", [1, 6, 37])
@pytest.mark.parametrize("shape", [(37, 256), (64, 512)])
@pytest.mark.parametrize("qtype", PACKED + DENSE[:2], ids=lambda q: q.name)
def test_matmul_against_oracle(qtype, shape, n_tok, isa, terms):
    raw = random_tensor(qtype, shape, seed=shape[0] + n_tok)
    w = repack(raw, qtype, shape)
    x = np.random.default_rng(n_tok).standard_normal((n_tok, shape[1])).astype(np.float32)
    got = qmatmul.matmul(x, w, isa=isa, terms=terms)
    assert got.shape == (n_tok, shape[0]) and got.dtype == np.float32

    # 1. same maths as the NumPy twin (only float summation order differs)
    scale = np.abs(x) @ np.abs(unpack_ref(w)).T  # (n, n_out)
    ref = qmatmul.matmul_ref(x, w, terms)
    np.testing.assert_array_less(np.abs(got - ref), 1e-5 * scale + 1e-6)

    # 2. against the float product of the oracle weights: within the activation-rounding bound
    # (plus the float16 rounding of the K-quant scales d * sc at repack)
    W = oracle(raw, qtype, shape)
    exact = x.astype(np.float64) @ W.T.astype(np.float64)
    bound = act_bound(x, W, terms) * 1.01 + 1e-5 * scale
    if qtype in K_QUANTS:
        bound += 2.0**-10 * scale
    if w.data is None:
        bound = 1e-5 * scale + 1e-6
    np.testing.assert_array_less(np.abs(got - exact), bound)
    rel = np.abs(got - exact).max() / np.abs(exact).max()
    # typical activation-quantization error: ~0.5 % with one term, float-like with two and
    # three (where the float16 K-quant scales, relative error <= 2^-11, are what is left)
    assert rel < (0.02 if terms == 1 else 5e-4 if qtype in K_QUANTS else 1e-4 if terms == 2
                  else 2e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n_tok", [1, 6])
@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
def test_matmul_exact_is_the_float_product(qtype, n_tok, isa):
    """Three terms plus the scale residual: the oracle's float product to float32 rounding,
    K-quants included; formats whose scales are float16 already have no residual."""
    shape = (37, 512)
    raw = random_tensor(qtype, shape, seed=n_tok)
    w = repack(raw, qtype, shape)
    residual = qmatmul.scale_residual(w, [(raw, qtype, shape)])
    assert (residual is not None) == (qtype in K_QUANTS)
    x = np.random.default_rng(n_tok).standard_normal((n_tok, shape[1])).astype(np.float32)
    W = oracle(raw, qtype, shape)
    exact = x.astype(np.float64) @ W.T.astype(np.float64)
    scale = np.abs(x) @ np.abs(W).T
    got = qmatmul.matmul_exact(x, w, residual, isa=isa)
    np.testing.assert_array_less(np.abs(got - exact), 1e-6 * scale)
    if residual is not None:  # without the residual the float16 scales show (~2^-12)
        assert (np.abs(qmatmul.matmul_exact(x, w, None, isa=isa) - exact) / scale).max() > 1e-5


def test_scale_residual_of_stacked_parts():
    """A fused q|k|v weight: the residual stacks as the weight's groups do."""
    shapes = [(32, 256), (16, 256), (20, 256)]
    raws = [random_tensor(Q.Q4_K, s, seed=i) for i, s in enumerate(shapes)]
    ws = [repack(r, Q.Q4_K, s) for r, s in zip(raws, shapes)]
    stacked = repack(raws[0], Q.Q4_K, shapes[0])
    stacked.data = np.concatenate([w.data for w in ws])
    stacked.n_out = sum(s[0] for s in shapes)
    residual = qmatmul.scale_residual(stacked, [(r, Q.Q4_K, s) for r, s in zip(raws, shapes)])
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    W = np.concatenate([oracle(r, Q.Q4_K, s) for r, s in zip(raws, shapes)])
    got = qmatmul.matmul_exact(x, stacked, residual)
    np.testing.assert_array_less(np.abs(got - x @ W.T), 1e-6 * (np.abs(x) @ np.abs(W).T))


@pytest.mark.skipif(not jit.HAS_INT8_DOT, reason="needs AVX-512 VNNI or AVX2")
@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
def test_vnni_equals_generic(qtype, terms):
    """Both paths do the same integer maths; only the float accumulation order may differ."""
    shape = (50, 768)
    w = repack(random_tensor(qtype, shape, seed=3), qtype, shape)
    x = np.random.default_rng(1).standard_normal((9, shape[1])).astype(np.float32)
    scale = np.abs(x) @ np.abs(unpack_ref(w)).T  # (n, n_out)
    vnni = qmatmul.matmul(x, w, isa="vnni", terms=terms)
    diff = vnni - qmatmul.matmul(x, w, isa="generic", terms=terms)
    np.testing.assert_array_less(np.abs(diff), 1e-5 * scale)


def test_matvec_writes_into_out():
    shape = (40, 256)
    w = repack(random_tensor(Q.Q4_1, shape), Q.Q4_1, shape)
    x = np.random.default_rng(0).standard_normal(shape[1]).astype(np.float32)
    out = np.full(shape[0], np.nan, np.float32)
    res = qmatmul.matvec(x, w, out)
    assert np.shares_memory(res, out) and np.isfinite(out).all()
    np.testing.assert_allclose(out, qmatmul.matmul_ref(x[None], w)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 3, 40])
def test_quantize_activations_ref(n, terms):
    """The rounding the twin quantizer does (test_twins holds the kernels to it bit for bit)."""
    x = np.random.default_rng(n).standard_normal((n, 96)).astype(np.float32) * 5
    x[0, :32] = 0  # an all-zero block has scale 0
    x[-1, 40] = 1e-30  # a tiny value beside big ones
    xq, xd, xs = qmatmul.quantize_activations_ref(x, terms)
    assert xq.shape == (terms * n, 96) and xd.shape == (n, 3) and xs.shape == (n, 6)
    assert np.abs(xq).max() <= 127 and xd[0, 0] == 0
    # the activations the kernels see, and how far they are from x
    used = qmatmul.dequantize_activations_ref(xq, xd)
    step = np.repeat(xd, 32, axis=1) / qmatmul.FINE ** (terms - 1)
    # with three terms x is ~2^21 steps: float32's 2^-24 in x / xd and in xd * units adds up
    # to 2^-3 of a step each (measured 0.69 steps at most)
    assert (np.abs(used - x) <= step * (0.5 + (0.25 if terms == 3 else 1e-5))).all()
    np.testing.assert_allclose(xs, used.reshape(n, 6, 16).sum(axis=2), rtol=1e-5, atol=1e-5)
    if terms >= 2:  # the last term in [-64, 63]; a middle one (three terms) up to 64
        assert xq[(terms - 1) * n:].min() >= -qmatmul.FINE // 2
        assert xq[(terms - 1) * n:].max() < qmatmul.FINE // 2
        assert np.abs(xq[n:]).max() <= qmatmul.FINE // 2


@pytest.mark.parametrize("n", [3, 40])  # 40: the parallel quantizer
def test_three_term_quantizer_is_its_twin(n):
    """Bit for bit, as tests/kernels/test_batch_rows.py holds the one- and two-term ones."""
    x = np.random.default_rng(n).standard_normal((n, 576)).astype(np.float32) * 5
    x[1, :64] = 0  # an all-zero block
    xq = np.empty((3 * n, 576), np.int8)
    xd, xs = np.empty((n, 18), np.float32), np.empty((n, 36), np.float32)
    (qmatmul.quantize_activations_parallel if n >= 32 else
     qmatmul.quantize_activations)(x, xq, xd, xs)
    for got, want in zip((xq, xd, xs), qmatmul.quantize_activations_ref(x, 3), strict=True):
        np.testing.assert_array_equal(got, want)


def test_terms_is_checked():
    w = repack(random_tensor(Q.Q4_0, (16, 64)), Q.Q4_0, (16, 64))
    with pytest.raises(ValueError):
        qmatmul.matmul(np.ones((1, 64), np.float32), w, terms=4)


def test_isa_override(monkeypatch):
    monkeypatch.setenv("NUMBALM_ISA", "generic")
    assert jit._pick_isa() == "generic"
    for bad in ("bogus", "avx2"):  # avx2 was an alias of generic; it is gone
        monkeypatch.setenv("NUMBALM_ISA", bad)
        with pytest.raises(ValueError, match="vnni or generic"):
            jit._pick_isa()
    w = repack(random_tensor(Q.Q4_0, (16, 64)), Q.Q4_0, (16, 64))
    with pytest.raises(ValueError, match="unknown isa"):
        qmatmul.matmul(np.ones((1, 64), np.float32), w, isa="avx2")


def test_int8_dot_override(monkeypatch):
    monkeypatch.setenv("NUMBALM_INT8_DOT", "bogus")
    with pytest.raises(ValueError, match="vpdpbusd or avx2"):
        jit._pick_int8_dot()
    monkeypatch.setenv("NUMBALM_INT8_DOT", "vpdpbusd")
    if jit.HAS_AVX512_VNNI:
        assert jit._pick_int8_dot() == "vpdpbusd"
    else:  # a faster path than the CPU has is refused, not faked
        with pytest.raises(ValueError, match="lacks its instructions"):
            jit._pick_int8_dot()
    monkeypatch.setenv("NUMBALM_INT8_DOT", "avx2")
    if jit.HAS_AVX2_INT8:
        assert jit._pick_int8_dot() == "avx2"


@pytest.mark.skipif(not (jit.INT8_DOT == "vpdpbusd" and jit.HAS_AVX2_INT8),
                    reason="an AVX-512 VNNI CPU runs the AVX2 path here; an AVX2 one runs it "
                           "in the whole suite")
def test_the_avx2_path_on_an_avx512_cpu():
    """The int8 kernels' AVX2 dot product (kernels.vnni._Int8Dot) against the same references,
    on a CPU whose default is vpdpbusd: the matmul, linear and fused-layer twins, the batched
    rows, the peaks and the oracle, in a child process (INT8_DOT is fixed when kernels.jit is
    imported)."""
    env = dict(os.environ, NUMBALM_INT8_DOT="avx2")
    tests = ["tests/kernels/test_twins.py", "tests/kernels/test_qmatmul.py",
             "tests/kernels/test_batch_rows.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-k", "vnni or decode_layer or peaks or oracle", *tests],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_threading_layer_reported(monkeypatch, caplog):
    assert jit.check_threading_layer() == numba.threading_layer()  # the layer Numba chose
    for layer, warns in [("omp", False), ("tbb", False), ("workqueue", True)]:
        monkeypatch.setattr(numba, "threading_layer", lambda layer=layer: layer)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=jit.log.name):
            assert jit.check_threading_layer() == layer
        assert ("4x slower" in caplog.text) == warns, layer


# Every weight byte at its layout's peak, every activation at +-127 (and Q8_0's q = -128): where
# the AVX2 dot product's int16 sums (kernels.vnni._Int8Dot) are nearest to overflowing.
PEAKS = [(Q.Q4_1, LAYOUT_NIBBLE32, 15), (Q.Q5_1, LAYOUT_NIBBLE32_HI, 31),
         (Q.Q6_K, LAYOUT_BYTE16, 63), (Q.Q8_0, LAYOUT_BYTE32, 255), (Q.Q8_0, LAYOUT_BYTE32, 0)]


@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("qtype, layout, u_peak", PEAKS, ids=lambda v: str(v))
@pytest.mark.parametrize("isa", ISAS)
def test_matmul_at_the_peaks_does_not_overflow(isa, qtype, layout, u_peak, sign, terms):
    n_out, n_in, n_tok = 32, 256, 5  # a tile of 4 and a single token
    nb = n_in // LAYOUT_BLK[layout]
    u = np.full((n_out, n_in), u_peak, np.uint8)
    d = np.ones((n_out, nb), np.float32)
    m = BYTE32_M * d if layout == LAYOUT_BYTE32 else np.zeros_like(d)
    w = PackedWeight(qtype, n_out, n_in, layout, data=pack(u, d, m, layout))
    x = np.full((n_tok, n_in), sign * 0.5, np.float32)  # every q1 at sign * 127
    x[:, 1::2] *= 1 - 2 ** -9  # and finer terms that are not all 0
    got = qmatmul.matmul(x, w, isa=isa, terms=terms)
    want = qmatmul.matmul_ref(x, w, terms=terms)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(want[0, 0]) > 0.4 * n_in * abs(unpack_ref(w)[0, 0])  # the sums are at their peak
