"""The fast backend: the same operations as `reference.py`, on Numba kernels from `kernels/`.

Weights stay quantized: `prepare` repacks each matrix once at load time into 16-row interleaved
groups (`kernels.qpack`) and `linear` runs the int8 kernel (`kernels.qmatmul`; AVX-512 VNNI where
the CPU has it). Activations are rounded to 15 bits per block of 32 inside `linear` (two int8
terms), so each matmul is within ~0.004 % of the float product and greedy decoding follows the
reference backend; `act_terms = 1` gives llama.cpp's 8-bit rounding (~0.5 %).

Traced passes want the reference backend's numbers, not generation's speed: within
`with backend.exact():` (engine/trace.py enters it, on the compute thread, around the traced
forward pass and the logit lens) `linear` and `linear_many` run `qmatmul.matmul_exact`: 22-bit
activations (three int8 terms) and, for K-quant matrices, the float16 rounding of their block
scales added back by a second product (`qmatmul.scale_residual`, built from the GGUF bytes on
first use: a second copy of those matrices' packed bytes). The trace then matches the reference
backend's to float32 rounding (~1e-5 in the attention weights). Every other pass keeps
`act_terms` and the cost of one flag test per matmul.

`prepare_many` + `linear_many` run several matrices that read the same input (q|k|v, gate|up)
as one kernel call (the reference backend runs them one by one); `encoder_workers` is the one
extra beyond the reference backend's methods.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from kernels import attention as attn_kernels
from kernels import jit, norms, qmatmul
from kernels.qpack import GROUP, PackedWeight, repack

from ..compute import COMPUTE
from ..gguf_file import TensorInfo
from .reference import ReferenceBackend


class FusedWeight:
    """Matrices sharing one input (`sizes`: each one's n_out), stacked row-wise into one
    PackedWeight when possible (`stacked`), else kept as `parts`."""

    def __init__(self, sizes: list[int], parts: list[PackedWeight] | None = None,
                 stacked: PackedWeight | None = None):
        self.sizes = sizes
        self.parts = parts
        self.stacked = stacked  # then parts is None: one copy of the weights, not two
        ends = np.cumsum(sizes)
        self.columns = [slice(int(e - n), int(e)) for e, n in zip(ends, sizes)]

    @classmethod
    def fuse(cls, parts: list[PackedWeight]) -> FusedWeight:
        sizes = [p.n_out for p in parts]
        same = len({(p.layout, p.n_in) for p in parts}) == 1
        aligned = all(p.n_out % GROUP == 0 for p in parts[:-1])
        first = parts[0]
        if same and first.data is None:  # dense float: stack the rows
            return cls(sizes, stacked=PackedWeight(
                first.qtype, sum(sizes), first.n_in, first.layout,
                dense=np.concatenate([p.dense for p in parts])))
        if same and aligned:  # group streams simply concatenate
            return cls(sizes, stacked=PackedWeight(
                first.qtype, sum(sizes), first.n_in, first.layout,
                data=np.concatenate([p.data for p in parts])))
        return cls(sizes, parts=parts)

    def weights(self) -> list[PackedWeight]:
        """What the repack cache stores: [stacked], or the parts."""
        return [self.stacked] if self.stacked is not None else self.parts


class FusedLayer:
    """A `LayerSpec` (engine/models/llama.py) as `kernels.decode_layer.decoder_layer`'s
    arguments: the seven weight slots' streams and (layout, block bytes, n_out) each, and the
    norm weights (empty where the model has none)."""

    NO_WEIGHT = np.zeros(0, np.uint8)
    NO_NORM = np.zeros(0, np.float32)

    def __init__(self, spec):
        from kernels import decode_layer as dl

        self.weights = [self.NO_WEIGHT] * 7
        self.meta = np.zeros((7, 3), np.int64)
        for first, prepared in ((dl.Q, spec.qkv), (dl.O, spec.attn_output),
                                (dl.GATE, spec.gate_up), (dl.DOWN, spec.down)):
            parts = _packed_parts(prepared)
            if parts is None:
                raise ValueError("a dense matrix")
            for slot, w in enumerate(parts, first):
                self.weights[slot] = w.data
                self.meta[slot] = (w.layout, w.block_bytes, w.n_out)
        self.weights = tuple(self.weights)

        def norm(v):
            return self.NO_NORM if v is None else np.ascontiguousarray(v, np.float32)

        self.norms = tuple(norm(v) for v in (spec.attn_norm, spec.ffn_norm, spec.q_norm,
                                             spec.k_norm, spec.post_attention_norm,
                                             spec.post_ffw_norm))
        self.shape = np.array(spec.shape, np.int64)  # heads, kv heads, head_dim, ffn_dim
        self.spec = spec


def _packed_parts(prepared) -> list[PackedWeight] | None:
    """The packed matrices of a prepared weight, in order, or None if one is dense."""
    if isinstance(prepared, FusedWeight):
        parts = [prepared.stacked] if prepared.stacked is not None else prepared.parts
    else:
        parts = [prepared]
    return None if any(p.data is None for p in parts) else parts


class FastBackend:
    name = "fast"
    # 8-bit terms per activation block in `linear` (kernels.qmatmul): 2 is float-like, 1 is
    # llama.cpp's rounding
    act_terms = qmatmul.TERMS

    def __init__(self):
        # on the compute thread, the one that runs parallel kernels (engine/compute.py)
        self.threading_layer = COMPUTE.call(jit.check_threading_layer)  # warns when slow
        jit.limit_blas_threads(1)  # BLAS between Numba kernels: one thread, or they fight
        self.exact_mode = False  # inside `exact()`
        # id(packed weight) -> (weight, [its GGUF tensors]): what `exact` builds residuals from
        self._sources: dict[int, tuple[PackedWeight, list[TensorInfo]]] = {}
        self._residuals: dict[int, qmatmul.ScaleResidual | None] = {}

    @contextmanager
    def exact(self):
        """Within this, matmuls are exact to float32 rounding (module docstring), even when
        what it wraps raises. Enter it on the compute thread only, so that no other pass (a
        generation step) runs while it is on."""
        saved, self.exact_mode = self.exact_mode, True
        try:
            yield self
        finally:
            self.exact_mode = saved

    # -- load time -------------------------------------------------------------------------

    # while a model loads, its file's repacked weights on disk (engine/repack_cache.py,
    # set by engine/llm.py): `prepare` maps them from there instead of repacking
    repack_cache = None

    def prepare(self, t: TensorInfo) -> PackedWeight:
        """Repack a weight matrix `(n_out, n_in)` for `linear` (dense float32 if no layout)."""
        cached = self._cached(t.name, [t])
        if cached is not None:
            return self._remember(cached[0], [t])
        w = repack(t.data, t.qtype, t.shape)
        if self.repack_cache is not None:
            self.repack_cache.put(t.name, [w])
        return self._remember(w, [t])

    def _remember(self, w: PackedWeight, ts: list[TensorInfo]) -> PackedWeight:
        """Note the (memory-mapped) tensors `w` was packed from, for its exact residual."""
        self._sources[id(w)] = (w, ts)  # the weight too, so that its id stays its own
        return w

    # The embedding table and the encoders' float32 weights load as in the reference backend.
    prepare_embedding = ReferenceBackend.prepare_embedding
    prepare_affine = ReferenceBackend.prepare_affine

    def prepare_many(self, ts: list[TensorInfo]) -> FusedWeight:
        """Matrices that read the same input (q, k, v or gate, up), for `linear_many`."""
        key = "+".join(t.name for t in ts)
        sizes = [_rows(t) for t in ts]
        cached = self._cached(key, ts)
        if cached is not None:
            fused = FusedWeight(sizes, stacked=cached[0]) if len(cached) == 1 and len(ts) > 1 \
                else FusedWeight(sizes, parts=cached)
        else:
            fused = FusedWeight.fuse([repack(t.data, t.qtype, t.shape) for t in ts])
            if self.repack_cache is not None:
                self.repack_cache.put(key, fused.weights())
        if fused.stacked is not None:
            self._remember(fused.stacked, ts)
        else:
            for p, t in zip(fused.parts, ts, strict=True):
                self._remember(p, [t])
        return fused

    def _cached(self, key: str, ts: list[TensorInfo]) -> list[PackedWeight] | None:
        """The repack cache's weights for `ts`: one per tensor, or one stacking them all;
        None when there are none, or when they are not the shape and type of `ts`."""
        if self.repack_cache is None:
            return None
        ws = self.repack_cache.get(key)
        if ws is None:
            return None
        want = [(t.qtype, _rows(t), _cols(t)) for t in ts]
        if len(ws) == 1 and len(ts) > 1:  # stacked
            want = [(ts[0].qtype, sum(r for _, r, _ in want), want[0][2])]
        return ws if [(w.qtype, w.n_out, w.n_in) for w in ws] == want else None

    # -- the operations --------------------------------------------------------------------

    embed = ReferenceBackend.embed  # a row lookup: dequantizes only the rows asked for

    def linear(self, x: np.ndarray, w: PackedWeight) -> np.ndarray:
        """(n, n_in) float32 -> (n, n_out) = x @ W.T. Where the time goes."""
        if self.exact_mode:
            return self._linear_exact(x, w)
        return qmatmul.matmul(x, w, terms=self.act_terms)

    def linear_many(self, x: np.ndarray, w: FusedWeight) -> list[np.ndarray]:
        """(n, n_in) -> one (n, n_out_i) per matrix of `w`, in one kernel call when stacked."""
        if w.stacked is None:
            return [self.linear(x, p) for p in w.parts]
        y = self.linear(x, w.stacked)  # (n, sum of n_out)
        return [y[:, cols] for cols in w.columns]  # views (np.split costs ~25 us a call)

    def _linear_exact(self, x: np.ndarray, w: PackedWeight) -> np.ndarray:
        """`linear` inside `exact()`: `qmatmul.matmul_exact` with w's scale residual."""
        key = id(w)
        if key not in self._residuals:  # first use: pack it from the GGUF tensors
            _, ts = self._sources.get(key, (None, []))
            parts = [(t.data, t.qtype, t.shape) for t in ts]
            self._residuals[key] = qmatmul.scale_residual(w, parts) if parts else None
        return qmatmul.matmul_exact(x, w, self._residuals[key])

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """x (n, d) or (n, heads, d): normalize the last axis, scale by weight (d,)."""
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        out = np.empty_like(rows)
        norms.rms_norm(rows, np.asarray(weight, np.float32), float(eps), out)
        return out.reshape(x.shape)

    def rope_table(self, positions: np.ndarray, inv_freq: np.ndarray,
                   mscale: float = 1.0) -> np.ndarray:
        """positions (n,), inv_freq (hd/2,) -> (n, 2, hd/2) cos and sin of the rotary angles,
        once per forward pass (see kernels.norms.rope_table_ref)."""
        out = np.empty((len(positions), 2, len(inv_freq)), np.float32)
        norms.rope_table(np.asarray(positions, np.int64), np.asarray(inv_freq, np.float64),
                         float(mscale), out)
        return out

    def rope(self, x: np.ndarray, table: np.ndarray, neox: bool) -> np.ndarray:
        """x (n, heads, head_dim), read in place (q and k are column views of the fused
        q|k|v output) -> rotated copy (see kernels.norms.rope_ref)."""
        out = np.empty(x.shape, np.float32)
        norms.rope(x, table, bool(neox), out)
        return out

    def store_kv(self, batch, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v (n, n_kv_head, hd) into `batch`'s rows' cache slots (NumPy's scattered
        assignment costs ~50 us a layer, the kernel ~1)."""
        kv = batch.kv
        attn_kernels.kv_store(kv.k[layer], kv.v[layer], batch.slots,
                              np.ascontiguousarray(k, np.float32),
                              np.ascontiguousarray(v, np.float32))

    def attention(self, q, batch, layer: int, window: int, scale: float,
                  softcap: float = 0.0) -> np.ndarray:
        """q (n, n_head, hd) of `batch`'s rows over each one's sequence in the KV cache ->
        (n, n_head*hd), causal GQA, all sequences in one kernel call (scores soft-capped
        when `softcap` > 0, gemma2)."""
        n, n_head, hd = q.shape
        out = np.empty((n, n_head * hd), np.float32)
        kv = batch.kv
        q = np.ascontiguousarray(q, np.float32)
        if softcap > 0:
            attn_kernels.paged_attention_softcap(q, kv.k[layer], kv.v[layer], batch.block_tables,
                                                 batch.row_seq, batch.positions, int(window),
                                                 float(scale), float(softcap), out)
            return out
        # many rows (prefill): the same numbers per row, a faster value pass
        kernel = (attn_kernels.paged_attention_prefill if n >= attn_kernels.PREFILL_ROWS
                  else attn_kernels.paged_attention)
        kernel(q, kv.k[layer], kv.v[layer], batch.block_tables, batch.row_seq,
               batch.positions, int(window), float(scale), out)
        return out

    # -- a layer per call (kernels/decode_layer.py, int8-dot CPUs only) ---------------------

    def fuse_layer(self, spec) -> FusedLayer | None:
        """`spec` (engine.models.llama.LayerSpec) ready for `decoder_layer`, or None where
        this CPU or these weights have no fused path (the model then runs op by op)."""
        if not jit.HAS_INT8_DOT:
            return None
        try:
            return FusedLayer(spec)
        except ValueError:  # a dense (float) matrix among them
            return None

    def runs_fused(self, batch) -> bool:
        """Whether an untraced pass runs fused layers: whenever VNNI is the selected path (so
        that no sequence meets both paths, see kernels/decode_layer.py), and never inside
        `exact()`, whose products the fused layer does not run."""
        return jit.ISA == "vnni" and not self.exact_mode

    def decoder_layer(self, fused: FusedLayer, x: np.ndarray, batch, layer: int,
                      tables: dict) -> np.ndarray:
        """Layer `layer` of an untraced pass in one call: x (n, dim) -> (n, dim)."""
        from kernels.decode_layer import decoder_layer

        spec, kv = fused.spec, batch.kv
        return decoder_layer(
            np.ascontiguousarray(x, np.float32), fused.weights, fused.meta, *fused.norms,
            fused.shape, float(spec.eps), bool(spec.gelu), bool(spec.rope.neox),
            tables[spec.rope], kv.k[layer], kv.v[layer], batch.slots, batch.block_tables,
            batch.row_seq, batch.positions, int(spec.window), float(spec.scale),
            int(self.act_terms))

    def silu_gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """SwiGLU: silu(gate) * up, (n, ffn) float32."""
        return _gate(norms.silu_gate, gate, up)

    def gelu_gate(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """GeGLU (tanh GELU, gemma): gelu_tanh(gate) * up, (n, ffn) float32."""
        return _gate(norms.gelu_gate, gate, up)

    # -- encoders (bert): float32 weights (`prepare_affine`) on BLAS, Numba for the rest ----

    def affine(self, x: np.ndarray, wb, gelu: bool = False) -> np.ndarray:
        """(n, n_in) -> (n, n_out) = x @ W.T + b (erf-GELU'd when `gelu`): sgemm, one pass.

        `wb` from `prepare_affine`: W (n_out, n_in) and b (n_out,), C-contiguous float32.
        """
        w, b = wb
        y = np.ascontiguousarray(x, np.float32) @ w.T  # (n, n_out), BLAS reads W.T in place
        out = np.empty_like(y)  # not in place: aliasing keeps LLVM's loop scalar (12x slower)
        norms.add_bias(y, b, bool(gelu), out)
        return out

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   residual: np.ndarray | None = None) -> np.ndarray:
        """LayerNorm of x (n, d) (plus `residual` in the same pass) over the last axis."""
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty_like(x)
        if residual is None:
            norms.layer_norm(x, weight, bias, float(eps), out)
        else:
            norms.add_layer_norm(x, np.ascontiguousarray(residual, np.float32), weight, bias,
                                 float(eps), out)
        return out

    def gelu(self, x: np.ndarray) -> np.ndarray:
        """Exact (erf) GELU of x (n, d) float32."""
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty_like(x)
        norms.gelu(x, out)
        return out

    def encoder_attention(self, qkv: np.ndarray, n_heads: int, starts: np.ndarray,
                          scale: float) -> np.ndarray:
        """qkv (n, 3*dim) fused q|k|v, sequences packed at `starts` -> (n, dim)."""
        n = qkv.shape[0]
        qkv4 = np.ascontiguousarray(qkv, np.float32).reshape(n, 3, n_heads, -1)  # no copy
        out = np.empty((n, qkv.shape[1] // 3), np.float32)
        attn_kernels.encoder_attention(qkv4, np.asarray(starts, np.int64), float(scale), out)
        return out

    def encoder_workers(self) -> int:
        """Threads an encoder may split a batch of sentences over (each runs single-threaded
        kernels and one-thread BLAS, without the GIL): as many as a forward pass uses."""
        return jit.compute_threads()


def _rows(t: TensorInfo) -> int:
    """n_out of a weight as `repack` sees it (a vector is one row)."""
    return 1 if len(t.shape) == 1 else t.shape[0]


def _cols(t: TensorInfo) -> int:
    return t.shape[-1]


def _gate(kernel, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """A gate kernel on contiguous rows: `linear_many` hands out column views of one stacked
    output, and on strided rows the kernel's loop stays scalar (8 rows: 1.3 ms a token's
    worth of layers instead of 0.1)."""
    gate, up = np.ascontiguousarray(gate), np.ascontiguousarray(up)
    out = np.empty_like(gate)
    kernel(gate, up, out)
    return out
