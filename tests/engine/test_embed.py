"""model.embed: pooled, normalized sentence vectors, matched to llama.cpp's."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import EngineError
from tests.helpers import load_data


@pytest.mark.parametrize("backend", ["ref", "fast"])
def test_mean_pooled_embeddings_match_llamacpp(backend, request):
    model = request.getfixturevalue(f"smollm2_{backend}")
    cases = load_data("smollm2.embeddings.json")["embeddings"]
    vecs = model.embed([c["text"] for c in cases])
    assert vecs.shape == (len(cases), 576) and vecs.dtype == np.float32
    for vec, case in zip(vecs, cases):
        cosine = float(vec @ np.asarray(case["vector"], np.float32))
        assert cosine >= 0.99, (case["text"], cosine)


def test_embed_normalizes_pools_and_takes_token_ids(smollm2_ref):
    ids = smollm2_ref.tokenizer.encode("hello world")
    by_text = smollm2_ref.embed("hello world")
    by_ids = smollm2_ref.embed([ids])
    np.testing.assert_allclose(by_text, by_ids, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(by_text, axis=1), 1.0, rtol=1e-5)
    raw_last = smollm2_ref.embed("hello world", pooling="last", normalize=False)
    assert abs(np.linalg.norm(raw_last) - 1.0) > 1e-3
    assert not np.allclose(raw_last / np.linalg.norm(raw_last), by_text)


def test_embed_long_input_is_an_error_unless_truncated(smollm2_ref):
    too_long = [[1] * (smollm2_ref.n_ctx + 10)]
    with pytest.raises(EngineError):
        smollm2_ref.embed(too_long)
    with pytest.raises(EngineError, match="pooling"):
        smollm2_ref.embed("x", pooling="max")
