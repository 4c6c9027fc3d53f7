"""POST /v1/embeddings: validation, shape, base64, dimensions, usage, cache and admission with
the fake model; the real SmolLM2 through the official openai client over waitress."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from server.serving.embedding_cache import EmbeddingCache
from tests.server.fake_engine import FakeModel
from tests.server.test_real_model import MODEL, load_model, real, smollm2  # noqa: F401 - fixtures

DATA = Path(__file__).resolve().parents[1] / "data"


def post(client, **body):
    return client.post("/v1/embeddings", json=body)


def vec(item) -> np.ndarray:
    return np.asarray(item["embedding"], dtype=np.float32)


def counter(app, name: str) -> float:
    value = app.extensions["numbalm"].metrics.registry.get_sample_value(
        name + "_total", {"model": "fake-model"})
    return value or 0.0


# --- shape and formats ----------------------------------------------------------------------

def test_single_string_shape_and_usage(client, model):
    r = post(client, model="fake-model", input="hello")
    assert r.status_code == 200
    body = r.get_json()
    assert list(body) == ["object", "data", "model", "usage"]
    assert body["object"] == "list" and body["model"] == "fake-model"
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    [item] = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == model.dim
    assert abs(np.linalg.norm(vec(item)) - 1) < 1e-5


def test_alias_and_default_model(client):
    assert post(client, model="gpt-4o-mini", input="x").get_json()["model"] == "fake-model"
    assert post(client, input="x").get_json()["model"] == "fake-model"
    r = post(client, model="nope", input="x")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "model_not_found"


def test_lists_of_strings_and_token_ids_in_order(client, model):
    ids = model.tokenizer.encode("hey")
    by_text = post(client, input=["hey", "you there"]).get_json()
    by_ids = post(client, input=[ids, model.tokenizer.encode("you there")]).get_json()
    one_ids = post(client, input=ids).get_json()
    assert [d["index"] for d in by_text["data"]] == [0, 1]
    assert by_text["usage"]["prompt_tokens"] == 3 + 9
    np.testing.assert_array_equal(vec(by_text["data"][0]), vec(by_ids["data"][0]))
    np.testing.assert_array_equal(vec(by_text["data"][1]), vec(by_ids["data"][1]))
    np.testing.assert_array_equal(vec(one_ids["data"][0]), vec(by_text["data"][0]))
    assert not np.allclose(vec(by_text["data"][0]), vec(by_text["data"][1]))


def test_base64_is_little_endian_float32_of_the_float_vector(client):
    f = post(client, input=["abc", "de"]).get_json()
    b = post(client, input=["abc", "de"], encoding_format="base64").get_json()
    for fi, bi in zip(f["data"], b["data"]):
        decoded = np.frombuffer(base64.b64decode(bi["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, vec(fi))
    assert b["usage"] == f["usage"]


def test_dimensions_truncates_and_renormalizes(client, model):
    full = vec(post(client, input="hello").get_json()["data"][0])
    short = vec(post(client, input="hello", dimensions=3).get_json()["data"][0])
    assert short.shape == (3,)
    np.testing.assert_allclose(short, full[:3] / np.linalg.norm(full[:3]), rtol=1e-6)
    same = vec(post(client, input="hello", dimensions=model.dim).get_json()["data"][0])
    np.testing.assert_array_equal(same, full)


# --- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("body, param, code", [
    ({}, "input", "missing_required_parameter"),
    ({"input": None}, "input", "missing_required_parameter"),
    ({"input": ""}, "input", "invalid_value"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": ["ok", ""]}, "input", "invalid_value"),
    ({"input": [[]]}, "input", "invalid_value"),
    ({"input": [[1, 2], []]}, "input", "invalid_value"),
    ({"input": 5}, "input", "invalid_type"),
    ({"input": {"text": "x"}}, "input", "invalid_type"),
    ({"input": [1, "a"]}, "input[0]", "invalid_type"),
    ({"input": ["a", 1]}, "input[1]", "invalid_type"),
    ({"input": [[1, "a"]]}, "input[0]", "invalid_type"),
    ({"input": [True]}, "input[0]", "invalid_type"),
    ({"input": [1.5]}, "input[0]", "invalid_type"),
    ({"input": [[1, 2], [3, [4]]]}, "input[1]", "invalid_type"),
    ({"input": [9999]}, "input", "invalid_value"),
    ({"input": [-1]}, "input", "invalid_value"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"input": "x", "encoding_format": 1}, "encoding_format", "invalid_type"),
    ({"input": "x", "dimensions": 0}, "dimensions", "invalid_value"),
    ({"input": "x", "dimensions": 9}, "dimensions", "invalid_value"),
    ({"input": "x", "dimensions": "4"}, "dimensions", "invalid_type"),
    ({"input": "x", "dimensions": 2.5}, "dimensions", "invalid_type"),
    ({"input": "x", "model": 3}, "model", "invalid_type"),
])
def test_bad_requests_are_openai_shaped_400s(client, body, param, code):
    r = post(client, **body)
    assert r.status_code == 400, r.get_json()
    err = r.get_json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert (err["param"], err["code"]) == (param, code)


def test_invalid_json_body(client):
    r = client.post("/v1/embeddings", data="{nope", content_type="application/json")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_json"


def test_input_longer_than_the_context_is_a_400(make_app):
    model = FakeModel(n_ctx=16)
    client = make_app(models=[model]).test_client()
    assert post(client, input="x" * 16).status_code == 200
    for body in ({"input": "x" * 17}, {"input": ["ok", "y" * 40]}, {"input": [1] * 17}):
        r = post(client, **body)
        assert r.status_code == 400
        assert r.get_json()["error"]["code"] == "context_length_exceeded"
    assert all(len(i) <= 16 for call in model.embed_calls for i in call)


def test_batch_size_limit(app, client, model):
    app.extensions["numbalm"].config.embeddings_max_batch = 3
    assert post(client, input=["a", "b", "c"]).status_code == 200
    r = post(client, input=["a", "b", "c", "d"])
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "input"
    assert "at most 3" in r.get_json()["error"]["message"]


def test_default_batch_limit_is_256(client):
    assert post(client, input=[[65]] * 256).status_code == 200
    assert post(client, input=[[65]] * 257).status_code == 400


# --- cache ----------------------------------------------------------------------------------

def test_cache_hits_skip_the_model_and_count(app, client, model):
    first = post(client, input=["alpha", "beta"]).get_json()
    assert (counter(app, "numbalm_embedding_cache_hits"),
            counter(app, "numbalm_embedding_cache_misses")) == (0, 2)
    again = post(client, input=["beta", "alpha", "gamma"]).get_json()
    assert (counter(app, "numbalm_embedding_cache_hits"),
            counter(app, "numbalm_embedding_cache_misses")) == (2, 3)
    assert model.embed_calls[-1] == [list(b"gamma")]  # only the miss reached the model
    np.testing.assert_array_equal(vec(again["data"][0]), vec(first["data"][1]))
    np.testing.assert_array_equal(vec(again["data"][1]), vec(first["data"][0]))
    assert again["usage"]["prompt_tokens"] == 4 + 5 + 5  # usage counts cached inputs too
    text = client.get("/metrics").get_data(as_text=True)
    assert 'numbalm_embedding_cache_hits_total{model="fake-model"} 2.0' in text
    assert 'numbalm_embedding_cache_misses_total{model="fake-model"} 3.0' in text


def test_cache_is_keyed_by_tokens_not_format_or_dimensions(app, client, model):
    post(client, input="same")
    post(client, input=list(b"same"), encoding_format="base64", dimensions=2)
    assert len(model.embed_calls) == 1
    assert counter(app, "numbalm_embedding_cache_hits") == 1


def test_duplicates_in_one_request_are_computed_once(client, model):
    body = post(client, input=["dup", "dup", "other"]).get_json()
    assert model.embed_calls == [[list(b"dup"), list(b"other")]]
    np.testing.assert_array_equal(vec(body["data"][0]), vec(body["data"][1]))


def test_cache_keyed_by_model(make_app):
    a, b = FakeModel(id="a"), FakeModel(id="b")
    client = make_app(models=[a, b]).test_client()
    post(client, model="a", input="x")
    post(client, model="b", input="x")
    assert len(a.embed_calls) == len(b.embed_calls) == 1


def test_lru_cache_is_bounded_in_bytes():
    one = np.ones(100, dtype=np.float32)
    size = EmbeddingCache._size(("m", (1,), "mean"), one)
    cache = EmbeddingCache(max_bytes=size * 3)
    for i in range(3):
        cache.put(("m", (i,), "mean"), one * i)
    assert cache.get(("m", (0,), "mean")) is not None  # 0 is now the most recent
    cache.put(("m", (3,), "mean"), one * 3)             # evicts 1, the least recent
    assert cache.get(("m", (1,), "mean")) is None
    assert all(cache.get(("m", (i,), "mean")) is not None for i in (0, 2, 3))
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    cache.put(("m", tuple(range(10**6)), "mean"), one)  # bigger than the whole cache: skipped
    assert len(cache) == 3


def test_cache_can_be_turned_off(model):
    from server import ModelPool, ServerConfig, create_app

    cfg = ServerConfig()
    cfg.embeddings_cache_bytes = 0
    app = create_app(cfg, pool=ModelPool.from_models([model]))
    client = app.test_client()
    post(client, input="x")
    post(client, input="x")
    assert len(model.embed_calls) == 2 and len(app.extensions["numbalm"].embedding_cache) == 0


# --- admission ------------------------------------------------------------------------------

def test_embeddings_wait_for_a_slot_and_are_refused_when_the_queue_is_full(make_app, model):
    app = make_app(max_concurrent=1, queue_size=1)
    adm = app.extensions["numbalm"].admission
    adm.acquire()  # a generation holds the only slot
    result = {}

    def embed():
        result["r"] = post(app.test_client(), input="waiting")

    waiter = threading.Thread(target=embed)
    waiter.start()
    deadline = time.monotonic() + 5
    while adm.waiting != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert adm.waiting == 1 and not model.embed_calls
    r = post(app.test_client(), input="refused")
    assert r.status_code == 429 and r.get_json()["error"]["code"] == "queue_full"
    assert r.headers["Retry-After"]
    adm.release()
    waiter.join(5)
    assert result["r"].status_code == 200 and model.embed_calls == [[list(b"waiting")]]
    assert adm.active == 0


def test_fully_cached_requests_do_not_take_a_slot(make_app):
    app = make_app(max_concurrent=1, queue_size=0)
    client = app.test_client()
    assert post(client, input="warm").status_code == 200
    adm = app.extensions["numbalm"].admission
    adm.acquire()
    try:
        assert post(client, input="warm").status_code == 200
        assert post(client, input="cold").status_code == 429
    finally:
        adm.release()


def test_queue_timeout_is_a_503(make_app):
    app = make_app(max_concurrent=1, queue_size=1, queue_timeout=0.05)
    adm = app.extensions["numbalm"].admission
    adm.acquire()
    try:
        r = post(app.test_client(), input="late")
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "queue_timeout"
    finally:
        adm.release()


def test_openai_client_against_the_fake(make_app, serve, model):
    url = serve(make_app())
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = oai.embeddings.create(model="fake-model", input=["a", "bc"], encoding_format="float")
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == model.dim
    assert r.usage.prompt_tokens == r.usage.total_tokens == 3
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model="fake-model", input="")


# --- the real SmolLM2 -----------------------------------------------------------------------

real_only = pytest.mark.skipif(load_model is None, reason="engine not available")


@real_only
def test_real_string_list_and_base64(real, smollm2):  # noqa: F811
    _, oai = real
    text = "The cat sat on the mat."
    one = oai.embeddings.create(model=MODEL, input=text, encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == smollm2.dim
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(
        smollm2.tokenizer.encode(text))
    many = oai.embeddings.create(model=MODEL, input=[text, "Hello world"],
                                 encoding_format="float")
    assert [d.index for d in many.data] == [0, 1]
    np.testing.assert_allclose(many.data[0].embedding, one.data[0].embedding, rtol=1e-6)
    b64 = oai.embeddings.create(model=MODEL, input=[text, "Hello world"],
                                encoding_format="base64")
    for fd, bd in zip(many.data, b64.data):
        decoded = np.frombuffer(base64.b64decode(bd.embedding), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(fd.embedding, dtype=np.float32))
    # the client's default (base64 on the wire, decoded by the client) gives the same vector
    default = oai.embeddings.create(model=MODEL, input=text)
    np.testing.assert_allclose(default.data[0].embedding, one.data[0].embedding, rtol=1e-7)


@real_only
def test_real_vectors_match_llamacpp(real):  # noqa: F811
    _, oai = real
    cases = json.loads((DATA / "smollm2.embeddings.json").read_text())["embeddings"]
    r = oai.embeddings.create(model=MODEL, input=[c["text"] for c in cases],
                              encoding_format="float")
    for item, case in zip(r.data, cases):
        got = np.asarray(item.embedding, np.float32)
        cosine = float(got @ np.asarray(case["vector"], np.float32))
        cosine /= float(np.linalg.norm(got) * np.linalg.norm(case["vector"]))
        assert cosine >= 0.99, (case["text"], cosine)


@real_only
def test_real_dimensions_and_context_limit(real, smollm2):  # noqa: F811
    _, oai = real
    r = oai.embeddings.create(model=MODEL, input="hi", dimensions=64, encoding_format="float")
    assert len(r.data[0].embedding) == 64
    assert abs(np.linalg.norm(r.data[0].embedding) - 1) < 1e-5
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model=MODEL, input="hi", dimensions=smollm2.dim + 1)
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model=MODEL, input=[[1] * (smollm2.n_ctx + 1)])
    assert e.value.code == "context_length_exceeded"
