"""An embedding-only model behind the server: capabilities in /v1/models, 400 for chat and
completions, /v1/embeddings with the real all-MiniLM-L6-v2 through the official openai client."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import openai
import pytest

from server import ModelPool, create_app
from tests.server.fake_engine import FakeModel
from tests.server.test_real_model import load_model

MINILM = "all-minilm-l6-v2"
DATA = Path(__file__).resolve().parents[1] / "data"
CASES = json.loads((DATA / "minilm.embeddings.json").read_text(encoding="utf-8"))["embeddings"]

pytestmark = pytest.mark.skipif(load_model is None, reason="engine not available yet")


def embedder(id: str = "fake-embedder") -> FakeModel:
    model = FakeModel(id=id)
    model.capabilities = frozenset({"embeddings"})
    return model


# --- routing by capability, with fakes ----------------------------------------------------------

@pytest.fixture
def mixed(make_app):
    """The fake decoder and a fake embedding-only model side by side."""
    return make_app(models=[embedder(), FakeModel()]).test_client()


def test_models_list_capabilities(mixed):
    data = {m["id"]: m for m in mixed.get("/v1/models").get_json()["data"]}
    assert data["fake-embedder"]["capabilities"] == ["embeddings"]
    assert data["fake-model"]["capabilities"] == ["chat", "completion", "embeddings"]
    assert data["fake-model"]["architecture"] == "fake"
    assert data["fake-model"]["context_length"] == 512
    one = mixed.get("/v1/models/fake-embedder").get_json()
    assert one["capabilities"] == ["embeddings"] and one["object"] == "model"


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/completions", {"prompt": "Hi"}),
])
def test_generation_with_an_embedding_model_is_a_400(mixed, route, body):
    r = mixed.post(route, json={"model": "fake-embedder", **body})
    assert r.status_code == 400
    error = r.get_json()["error"]
    assert error["param"] == "model" and error["type"] == "invalid_request_error"
    assert error["code"] == "model_not_supported"
    assert "fake-embedder" in error["message"] and "/v1/embeddings" in error["message"]
    # without a model named, the first model that can generate answers
    r = mixed.post(route, json=body)
    assert r.status_code == 200 and r.get_json()["model"] == "fake-model"


def test_embeddings_from_the_embedding_model(mixed):
    r = mixed.post("/v1/embeddings", json={"model": "fake-embedder", "input": "hi"})
    assert r.status_code == 200 and r.get_json()["model"] == "fake-embedder"
    assert mixed.post("/v1/embeddings", json={"input": "hi"}).get_json()["model"] == \
        "fake-embedder"  # the first model that embeds: every model here does


# --- the real model over waitress ---------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    return load_model(MINILM)


@pytest.fixture(scope="module")
def served(minilm):
    """(app, openai client) with MiniLM served (warmed up) by waitress on loopback."""
    from server.http.wsgi import ServerThread

    pool = ModelPool.from_models([minilm], aliases={"text-embedding-3-small": MINILM},
                                 warmup=True)
    app = create_app({"max_concurrent": 1, "queue_size": 4}, pool=pool)
    with ServerThread(app) as server:
        yield app, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                 timeout=60)


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_real_models_list(served):
    _, oai = served
    [model] = oai.models.list().data
    assert model.id == MINILM and model.model_extra["capabilities"] == ["embeddings"]


def test_real_embeddings_match_sentence_transformers(served, minilm):
    _, oai = served
    cases = [c for c in CASES if c["text"]]  # the API refuses an empty string
    texts = [c["text"] for c in cases]
    r = oai.embeddings.create(model="text-embedding-3-small", input=texts)  # base64 on the wire
    assert r.model == MINILM and [d.index for d in r.data] == list(range(len(texts)))
    for item, case in zip(r.data, cases):
        assert len(item.embedding) == 384
        assert cosine(item.embedding, case["vector"]) >= 0.9999, case["text"]
    assert r.usage.prompt_tokens == sum(len(c["ids"]) for c in cases)


def test_real_embeddings_token_ids_floats_and_dimensions(served):
    _, oai = served
    case = CASES[0]
    ids = [c["ids"] for c in CASES]  # the empty text's [CLS] [SEP] too
    by_ids = oai.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    for item, c in zip(by_ids.data, CASES):
        assert cosine(item.embedding, c["vector"]) >= 0.9999, c["text"]
    short = oai.embeddings.create(model=MINILM, input=case["text"], dimensions=64)
    vec = np.asarray(short.data[0].embedding)
    assert vec.shape == (64,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    assert cosine(vec, case["vector"][:64]) >= 0.9999


def test_real_raw_base64_and_cache(served):
    app, _ = served
    client = app.test_client()
    body = {"model": MINILM, "input": "cache me please", "encoding_format": "base64"}
    first = client.post("/v1/embeddings", json=body).get_json()
    second = client.post("/v1/embeddings", json=body).get_json()
    assert first["data"] == second["data"]
    vec = np.frombuffer(base64.b64decode(first["data"][0]["embedding"]), "<f4")
    assert vec.shape == (384,)
    hits = app.extensions["numbalm"].metrics.registry.get_sample_value(
        "numbalm_embedding_cache_hits_total", {"model": MINILM})
    assert hits and hits >= 1


def test_real_chat_and_completion_are_400(served):
    _, oai = served
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MINILM, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_supported"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MINILM, prompt="Hi")
    assert e.value.body["param"] == "model"


def test_real_over_long_input_is_a_400(served, minilm):
    _, oai = served
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model=MINILM, input="word " * (minilm.n_ctx + 5))
    assert e.value.body["code"] == "context_length_exceeded"
