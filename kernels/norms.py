"""Element-wise and per-row kernels: RMSNorm, RoPE, the gated activations (SiLU, GELU-tanh),
and bert's LayerNorm, erf GELU and bias add.

Each `name(…, out)` (Numba) sits beside `name_ref` (NumPy). They are memory-bound and cheap; the
Numba versions exist to avoid NumPy's temporaries and per-op dispatch in the decode loop.
`out` may be the input array itself (all of them work in place), but a separate `out` is much
faster for the element-wise ones: LLVM vectorizes a loop only when it can rule out overlap.
"""

from __future__ import annotations

import math

import numpy as np

from kernels.jit import njit

# --- RMSNorm -------------------------------------------------------------------------------------


def rms_norm_ref(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (..., d) float32, weight (d,) -> x / sqrt(mean(x^2) + eps) * weight, same shape."""
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(mean_square + eps)) * weight


@njit
def rms_norm(x, weight, eps, out):
    """Numba twin of `rms_norm_ref` on rows: x, out (n, d) float32; weight (d,)."""
    n, d = x.shape
    for i in range(n):
        ss = 0.0  # float64 sum, like NumPy's pairwise float32 mean within rounding
        for j in range(d):
            ss += np.float64(x[i, j]) * x[i, j]
        inv = np.float32(1.0 / math.sqrt(ss / d + eps))
        for j in range(d):
            out[i, j] = x[i, j] * inv * weight[j]


# --- RoPE ----------------------------------------------------------------------------------------


def rope_inv_freq(freq_base: float, head_dim: int) -> np.ndarray:
    """Plain RoPE's frequencies: pair i turns at base^(-2i/head_dim) -> (head_dim/2,) float64.
    Scaled RoPEs (engine/models/rope.py) divide these, pair by pair."""
    return freq_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_table_ref(positions: np.ndarray, inv_freq: np.ndarray, mscale: float = 1.0) -> np.ndarray:
    """The rotary angles of each row: positions (n,) int, inv_freq (hd/2,) float64 ->
    (n, 2, hd/2) float32, mscale * cos in [:, 0] and mscale * sin in [:, 1]. Pair i turns by
    angle pos * inv_freq[i]; `mscale` scales the rotation (longrope's attention factor, else 1).

    Every layer (and q and k) of a forward pass rotates by the same angles, so the model
    computes this once per pass and per RoPE (`rope_ref` applies it).
    """
    angles = positions.astype(np.float64)[:, None] * np.asarray(inv_freq, np.float64)
    return (np.stack([np.cos(angles), np.sin(angles)], axis=1) * mscale).astype(np.float32)


def rope_ref(x: np.ndarray, table: np.ndarray, neox: bool) -> np.ndarray:
    """Rotary embedding. x (n, heads, hd) float32, table (n, 2, hd/2) from `rope_table_ref`
    -> (n, heads, hd).

    `neox=False` pairs elements (2i, 2i+1) (llama as converted to GGUF); `neox=True` pairs
    (i, i + hd/2) (gemma3).
    """
    hd = x.shape[-1]
    cos, sin = table[:, None, 0], table[:, None, 1]  # (n, 1, hd/2)
    a, b = (x[..., : hd // 2], x[..., hd // 2 :]) if neox else (x[..., 0::2], x[..., 1::2])
    out = np.empty_like(x)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if neox:
        out[..., : hd // 2], out[..., hd // 2 :] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out


@njit
def rope_table(positions, inv_freq, mscale, out):
    """Numba twin of `rope_table_ref`: positions (n,) int, inv_freq (hd/2,) float64,
    out (n, 2, hd/2) float32."""
    n, _, half = out.shape
    for t in range(n):
        for i in range(half):
            angle = np.float64(positions[t]) * inv_freq[i]
            out[t, 0, i] = math.cos(angle) * mscale
            out[t, 1, i] = math.sin(angle) * mscale


@njit
def rope(x, table, neox, out):
    """Numba twin of `rope_ref`: x, out (n, heads, hd) float32 (x may be a strided view, such
    as q's columns of the fused q|k|v output); table (n, 2, hd/2)."""
    n, heads, hd = x.shape
    half = hd // 2
    for t in range(n):
        cos, sin = table[t, 0], table[t, 1]
        for h in range(heads):
            for i in range(half):
                ia, ib = (i, i + half) if neox else (2 * i, 2 * i + 1)
                a, b = x[t, h, ia], x[t, h, ib]
                out[t, h, ia] = a * cos[i] - b * sin[i]
                out[t, h, ib] = a * sin[i] + b * cos[i]


# --- gated activations ---------------------------------------------------------------------------

# GELU's tanh approximation: gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
GELU_TANH_C = np.float32(math.sqrt(2.0 / math.pi))
GELU_TANH_A = np.float32(0.044715)


def silu_gate_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SwiGLU: silu(gate) * up, element-wise, any shape."""
    return gate * (0.5 * (1.0 + np.tanh(0.5 * gate))) * up  # sigmoid without overflow


def gelu_gate_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """GeGLU with GELU's tanh approximation (gemma): gelu_tanh(gate) * up."""
    return 0.5 * gate * (1.0 + np.tanh(GELU_TANH_C * (gate + GELU_TANH_A * gate**3))) * up


@njit(inline="always")
def _tanh(x):
    """float32 tanh as a clamped rational polynomial (Eigen's), branch-free so loops vectorize.

    math.tanh is a scalar libm call per element; this is ~10x faster, max error ~1e-7 absolute.
    """
    x = min(max(x, np.float32(-7.9053111)), np.float32(7.9053111))
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


@njit(error_model="numpy")  # no divide-by-zero branch: the loop vectorizes (see gelu)
def silu_gate(gate, up, out):
    """Numba twin of `silu_gate_ref` on (n, d) float32 arrays."""
    half = np.float32(0.5)
    n, d = gate.shape
    for i in range(n):
        for j in range(d):
            g = gate[i, j]
            out[i, j] = g * (half + half * _tanh(half * g)) * up[i, j]


@njit(error_model="numpy")  # no divide-by-zero branch: the loop vectorizes (see gelu)
def gelu_gate(gate, up, out):
    """Numba twin of `gelu_gate_ref` on (n, d) float32 arrays."""
    half = np.float32(0.5)
    n, d = gate.shape
    for i in range(n):
        for j in range(d):
            g = gate[i, j]
            inner = GELU_TANH_C * (g + GELU_TANH_A * g * g * g)
            out[i, j] = half * g * (np.float32(1) + _tanh(inner)) * up[i, j]


# --- LayerNorm (bert) ----------------------------------------------------------------------------


def layer_norm_ref(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """x (..., d) float32; weight, bias (d,) -> (x - mean) / sqrt(var + eps) * weight + bias."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def add_layer_norm_ref(x, y, weight, bias, eps: float) -> np.ndarray:
    """LayerNorm of the residual sum x + y (bert's post-norm): x, y (n, d); weight, bias (d,)."""
    return layer_norm_ref(x + y, weight, bias, eps)


@njit(inline="always")
def _layer_norm_row(row, weight, bias, eps, out_row):
    """Normalize one row (d,) float32 in float64 sums (two passes: mean, then variance)."""
    d = row.shape[0]
    s = 0.0
    for j in range(d):
        s += row[j]
    mean = s / d
    ss = 0.0
    for j in range(d):
        c = row[j] - mean
        ss += c * c
    inv = 1.0 / math.sqrt(ss / d + eps)
    m32, inv32 = np.float32(mean), np.float32(inv)
    for j in range(d):
        out_row[j] = (row[j] - m32) * inv32 * weight[j] + bias[j]


@njit
def layer_norm(x, weight, bias, eps, out):
    """Numba twin of `layer_norm_ref` on rows: x, out (n, d) float32; weight, bias (d,)."""
    for i in range(x.shape[0]):
        _layer_norm_row(x[i], weight, bias, eps, out[i])


@njit
def add_layer_norm(x, y, weight, bias, eps, out):
    """Numba twin of `add_layer_norm_ref`: the residual add and the norm in one pass.

    x, y, out (n, d) float32 (out may be x); weight, bias (d,).
    """
    n, d = x.shape
    row = np.empty(d, np.float32)
    for i in range(n):
        for j in range(d):
            row[j] = x[i, j] + y[i, j]
        _layer_norm_row(row, weight, bias, eps, out[i])


# --- GELU (erf, bert) ----------------------------------------------------------------------------

_erf_vec = np.frompyfunc(math.erf, 1, 1)


def gelu_ref(x: np.ndarray) -> np.ndarray:
    """Exact GELU: x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))), element-wise, float32."""
    xd = x.astype(np.float64)
    erf = _erf_vec(xd / math.sqrt(2.0)).astype(np.float64)
    return (0.5 * xd * (1.0 + erf)).astype(np.float32)


def add_bias_ref(x: np.ndarray, bias: np.ndarray, gelu: bool) -> np.ndarray:
    """x (n, d) + bias (d,), then `gelu_ref` when `gelu`: a linear's bias (and activation)."""
    y = (x + bias).astype(np.float32)
    return gelu_ref(y) if gelu else y


@njit(inline="always")
def _erf(x):
    """float32 erf as a clamped rational polynomial (Eigen's), branch-free so loops vectorize.

    math.erf is a scalar libm call per element; this is what makes GELU cheap. Max error
    ~1e-7 absolute; |x| >= 4 gives +-1 exactly as float32 would.
    """
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = np.float32(-2.72614225801306e-10)
    p = p * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = np.float32(-1.45660718464996e-05)
    q = q * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    return x * p / q


@njit(inline="always")
def _gelu(x):
    return np.float32(0.5) * x * (np.float32(1) + _erf(x * np.float32(1 / math.sqrt(2.0))))


# error_model="numpy": float division by zero gives inf instead of raising, which drops the
# zero check Numba otherwise puts in front of every `/` -- that branch alone kept these loops
# scalar (measured: GELU over 1536 x 1536 floats 10.5 ms -> 0.45 ms).
@njit(error_model="numpy")
def gelu(x, out):
    """Numba twin of `gelu_ref` on (n, d) float32 arrays (out may be x)."""
    n, d = x.shape
    for i in range(n):
        for j in range(d):
            out[i, j] = _gelu(x[i, j])


@njit(error_model="numpy")
def add_bias(x, bias, gelu, out):
    """Numba twin of `add_bias_ref`: x, out (n, d) float32 (out may be x); bias (d,)."""
    n, d = x.shape
    for i in range(n):
        if gelu:
            for j in range(d):
                out[i, j] = _gelu(x[i, j] + bias[j])
        else:
            for j in range(d):
                out[i, j] = x[i, j] + bias[j]
