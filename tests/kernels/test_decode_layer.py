"""A pass a layer per call (kernels/decode_layer.py) against the model's own op-by-op code:
the same kernels in the same order, so they agree to float32 rounding (Numba compiles the
kernels into the fused function's own code, where LLVM may contract them differently)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q

import engine
from engine.batch import Batch
from engine.kv import BLOCK, KVPool
from engine.models import llama
from kernels import jit
from tests.tiny_models import write_tiny

pytestmark = pytest.mark.skipif(not jit.HAS_INT8_DOT,
                                reason="the fused layer needs AVX-512 VNNI or AVX2")


def steps(net, prompts, n_steps, fused: bool):
    """Prefill the prompts together, each in its own cache region, then `n_steps` decode steps
    of all of them in one batch: the logits (n_steps + 1, n_seqs, n_vocab), prefill first."""
    saved = net.fused
    blocks = 128 // BLOCK  # 128 positions per sequence
    kv = KVPool(*net.kv_layout(), n_blocks=blocks * len(prompts))
    tables = [list(range(s * blocks, (s + 1) * blocks)) for s in range(len(prompts))]
    try:
        net.fused = saved if fused else None
        batch = Batch.pack([(p, 0) for p in prompts], kv, tables)
        out = [net.logits(net.forward(batch))[batch.last_rows()]]
        for step in range(n_steps):
            batch = Batch.pack([([7 + step], len(p) + step) for p in prompts], kv, tables)
            out.append(net.logits(net.forward(batch)))
    finally:
        net.fused = saved
    return np.stack(out)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_models_fused_equals_op_by_op(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    # 3 kv heads of 2 query heads each; gemma3's sliding window (8) is crossed by the steps
    write_tiny(path, arch=arch, n_layers=6 if arch == "gemma3" else 2, n_heads=6, n_kv_heads=3,
               head_dim=32, dim=96, ffn=128, qtype=Q.Q8_0)
    net = engine.load_model(str(path), backend="fast").model
    assert net.fused is not None and len(net.fused) == len(net.layers)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 250, n)) for n in (5, 13, 9)]
    fused, op = steps(net, prompts, 6, True), steps(net, prompts, 6, False)
    # a float32 ulp here and there moves an activation across a 15-bit rounding step in the
    # next matmul: ~1e-4 of the logits' scale after a few random layers
    assert np.abs(fused - op).max() <= 1e-3 * np.abs(op).max()
    assert np.array_equal(fused.argmax(-1), op.argmax(-1))


@pytest.mark.parametrize("key", ["smollm2", "gemma3"])
def test_real_models_fused_equals_op_by_op(key, request):
    net = request.getfixturevalue(f"{key}_fast").model
    assert net.fused is not None
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(100, 5000, n)) for n in (20, 37)]
    fused, op = steps(net, prompts, 2, True), steps(net, prompts, 2, False)
    assert np.abs(fused - op).max() <= 1e-3 * np.abs(op).max()
    assert np.array_equal(fused.argmax(-1), op.argmax(-1))


def test_every_untraced_pass_runs_fused_and_traced_ones_op_by_op(smollm2_fast, monkeypatch):
    net = smollm2_fast.model
    calls = []
    real = net.backend.decoder_layer
    monkeypatch.setattr(net.backend, "decoder_layer",
                        lambda *a: calls.append(1) or real(*a))
    smollm2_fast.logits([1, 2, 3])  # a short pass
    smollm2_fast.logits(list(range(10, 80)))  # a prefill
    assert len(calls) == 2 * len(net.layers)
    calls.clear()
    smollm2_fast.trace([1, 2, 3], attention=False)  # traced: op by op, through the recorder
    assert calls == []


def test_reference_backend_and_changed_maths_never_fuse(smollm2_ref):
    assert smollm2_ref.model.fused is None

    class ChangedQKV(llama.Model):
        def qkv(self, layer, h):
            return super().qkv(layer, h)

    model = ChangedQKV.__new__(ChangedQKV)
    assert not llama.runs_own(model, llama.Model, ("attention_block", "ffn_block", "qkv"))
    assert model.layer_spec(0, None) is None


def test_an_unpacked_matrix_means_no_fused_layers(tmp_path):
    path = tmp_path / "f32.gguf"
    write_tiny(path, qtype=Q.F32)  # float weights: BLAS, no packed stream
    assert engine.load_model(str(path), backend="fast").model.fused is None



def test_the_fused_layers_cache_is_stamped_with_every_kernel_file():
    """decoder_layer compiles kernels of other files into its own code: an edit of any of
    them must recompile it (Numba alone checks only kernels/decode_layer.py)."""
    import os

    from kernels import decode_layer
    from kernels.jit import _DependentSourceLocator

    locator = _DependentSourceLocator.from_function(decode_layer.decoder_layer.py_func,
                                                    decode_layer.__file__)
    assert locator is not None
    assert isinstance(decode_layer.decoder_layer._cache._impl.locator, _DependentSourceLocator)
    before = locator.get_source_stamp()
    other = os.path.join(os.path.dirname(decode_layer.__file__), "qpack.py")
    st = os.stat(other)
    try:
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert locator.get_source_stamp() != before
    finally:
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert locator.get_source_stamp() == before
    from kernels import norms  # other modules keep Numba's own stamp

    assert _DependentSourceLocator.from_function(norms.rms_norm.py_func, norms.__file__) is None
