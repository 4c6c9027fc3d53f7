"""bert (encoder) models: a tiny random one through every path, the real all-MiniLM-L6-v2
against sentence-transformers' vectors, on both backends."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import CapabilityError, ContextOverflowError, EngineError
from tests.helpers import load_data, model_path
from tests.tiny_models import write_tiny_bert

BACKENDS = ["reference", "fast"]
SENTENCES = [[1, 5, 6, 7, 2], [1, 9, 2], [1, 3, 4, 5, 6, 7, 8, 9, 10, 2], [1, 2]]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert.gguf"))


@pytest.fixture(scope="module", params=BACKENDS)
def tiny(request, tiny_path):
    return engine.load_model(tiny_path, backend=request.param)


def test_backends_agree(tiny_path):
    ref = engine.load_model(tiny_path, backend="reference").embed(SENTENCES, normalize=False)
    fast = engine.load_model(tiny_path, backend="fast").embed(SENTENCES, normalize=False)
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5)


def test_batch_equals_one_at_a_time(tiny):
    """Packed sentences attend only within themselves and pool over their own tokens."""
    batch = tiny.embed(SENTENCES)
    alone = np.concatenate([tiny.embed([s]) for s in SENTENCES])
    np.testing.assert_allclose(batch, alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiny.embed(SENTENCES[::-1]), batch[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, rtol=1e-5)


def test_attention_is_bidirectional(tiny):
    """Changing the last token changes the first token's state (a causal model's would not)."""
    a = tiny.embed([[1, 5, 6, 2]], pooling="cls", normalize=False)
    b = tiny.embed([[1, 5, 7, 2]], pooling="cls", normalize=False)
    assert not np.allclose(a, b)


def test_pooling_from_metadata(tmp_path):
    cls_model = engine.load_model(str(write_tiny_bert(tmp_path / "cls.gguf", pooling=2)),
                                  backend="reference")
    assert cls_model.args.pooling == "cls"
    np.testing.assert_allclose(cls_model.embed(SENTENCES),
                               cls_model.embed(SENTENCES, pooling="cls"), rtol=1e-6)
    assert not np.allclose(cls_model.embed(SENTENCES), cls_model.embed(SENTENCES, pooling="mean"))


def test_many_inputs_span_several_forward_passes(tiny, monkeypatch):
    import engine.llm

    inputs = [SENTENCES[i % 4] for i in range(9)]
    whole = tiny.embed(inputs)
    monkeypatch.setattr(engine.llm, "MAX_BATCH_TOKENS", 12)
    np.testing.assert_allclose(tiny.embed(inputs), whole, rtol=1e-5, atol=1e-6)


def test_big_batches_split_over_threads(tiny, monkeypatch):
    import engine.llm

    inputs = [SENTENCES[i % 4] for i in range(11)]
    whole = tiny.embed(inputs)
    monkeypatch.setattr(engine.llm, "MIN_SHARD_TOKENS", 1)
    monkeypatch.setattr(tiny.backend, "encoder_workers", lambda: 3, raising=False)
    assert len(engine.llm.split_tokens(0, len(inputs), inputs, 3)) == 3
    np.testing.assert_allclose(tiny.embed(inputs), whole, rtol=1e-5, atol=1e-6)


def test_too_long_is_an_error_unless_truncated(tiny):
    long = [1] + [5] * (tiny.n_ctx + 3) + [2]
    with pytest.raises(ContextOverflowError, match="truncate=True"):
        tiny.embed([long])
    cut = tiny.embed([long], truncate=True)
    kept = [1] + [5] * (tiny.n_ctx - 2) + [2]  # the final [SEP] (here eos) survives
    np.testing.assert_allclose(cut, tiny.embed([kept]), rtol=1e-5, atol=1e-6)
    with pytest.raises(EngineError, match="vocabulary"):
        tiny.embed([[1, tiny.n_vocab, 2]])
    with pytest.raises(EngineError, match="no tokens"):
        tiny.embed([[]])


def test_embedding_only_model_refuses_to_generate(tiny):
    assert tiny.capabilities == {"embeddings"}
    with pytest.raises(CapabilityError, match="cannot generate text"):
        tiny.generate([1, 5], max_tokens=2)
    with pytest.raises(CapabilityError):
        tiny.logits([1, 5])
    with pytest.raises(CapabilityError, match="cannot chat"):
        tiny.apply_chat_template([{"role": "user", "content": "hi"}])


def test_max_seq_length_from_metadata_limits_inputs(tmp_path):
    model = engine.load_model(str(write_tiny_bert(tmp_path / "m.gguf", max_seq_length=8)),
                              backend="reference")
    assert model.n_ctx == 8 and model.args.n_positions == 64
    with pytest.raises(ContextOverflowError):
        model.embed([[1] + [5] * 8 + [2]])
    np.testing.assert_allclose(model.embed([[1] + [5] * 8 + [2]], truncate=True),
                               model.embed([[1] + [5] * 6 + [2]]), rtol=1e-6)


# --- the real model ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=BACKENDS)
def minilm(request):
    return engine.load_model(model_path("minilm"), backend=request.param)


@pytest.mark.parametrize("from_text", [False, True])
def test_minilm_matches_sentence_transformers(minilm, from_text):
    cases = load_data("minilm.embeddings.json")["embeddings"]
    vecs = minilm.embed([c["text"] if from_text else c["ids"] for c in cases])
    assert vecs.shape == (len(cases), 384) and vecs.dtype == np.float32
    for vec, case in zip(vecs, cases):
        cosine = float(vec @ np.asarray(case["vector"], np.float32))
        assert cosine >= 0.9999, (case["text"], cosine)


def test_minilm_is_an_embedding_model(minilm):
    assert minilm.capabilities == {"embeddings"} and minilm.args.pooling == "mean"
    assert minilm.tokenizer.encode("hello") == [101, 7592, 102]  # [CLS] hello [SEP]
    with pytest.raises(CapabilityError):
        next(iter(minilm.generate([101, 7592, 102], max_tokens=1)))


def test_minilm_truncates_at_its_sentence_length(minilm):
    """sentence-transformers cuts MiniLM inputs at 256 tokens (of 512 positions); so do we."""
    assert minilm.n_ctx == 256
    ids = minilm.tokenizer.encode("word " * 400)  # 402 tokens with [CLS] and [SEP]
    with pytest.raises(ContextOverflowError):
        minilm.embed([ids])
    cut = ids[:255] + ids[-1:]  # like HF's tokenizer, truncation keeps the final [SEP]
    np.testing.assert_allclose(minilm.embed([ids], truncate=True), minilm.embed([cut]),
                               rtol=1e-5, atol=1e-6)
