"""The Flask app through its test client: routing, errors, auth, CORS, ids, readiness, metrics."""

from __future__ import annotations

import json

import pytest

from server import ModelPool, create_app
from tests.helpers import chat_body
from tests.server.fake_engine import FakeModel


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    err = response.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, param, code", [
    (b"", None, "invalid_json"),
    (b"{oops", None, "invalid_json"),
    (b"\xff\xfe", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (b'{"messages": "hi"}', "messages", "invalid_type"),
    (b'{"messages": []}', "messages", "invalid_value"),
    (b'{"model": 3, "messages": [{"role": "user", "content": "x"}]}', "model", "invalid_type"),
])
def test_malformed_bodies_are_400(client, body, param, code):
    err = error_of(client.post("/v1/chat/completions", data=body), 400)
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_completion_tokens": "10"}, "max_completion_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
])
def test_invalid_chat_parameters_are_named(client, extra, param):
    err = error_of(client.post("/v1/chat/completions", json=chat_body(**extra)), 400)
    assert err["param"] == param


@pytest.mark.parametrize("extra, param", [
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1, 2], [999]]}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "echo": 1}, "echo"),
])
def test_invalid_completion_parameters_are_named(client, extra, param):
    err = error_of(client.post("/v1/completions", json={"model": "fake-model", **extra}), 400)
    assert err["param"] == param


def test_unknown_fields_and_user_are_ignored(client):
    r = client.post("/v1/chat/completions", json=chat_body(user="u1", frobnicate=True,
                                                           max_tokens=2, tools=[]))
    assert r.status_code == 200


def test_content_parts_and_developer_role(client, model):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]}]
    r = client.post("/v1/chat/completions", json=chat_body(messages=messages, max_tokens=1))
    assert r.status_code == 200
    assert r.get_json()["usage"]["prompt_tokens"] == len(model.tokenizer.encode(
        model.apply_chat_template([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "a\nb"}]), special=True))


def test_sampling_options_reach_the_engine(client, model):
    body = chat_body(max_tokens=3, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=11,
                     stop="zz", presence_penalty=0.5, frequency_penalty=-0.5,
                     repetition_penalty=1.1, logit_bias={"65": -100})
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    call = model.calls[-1]
    assert call["max_tokens"] == 3 and call["stop"] == ("zz",) and call["seed"] == 11
    assert (call["temperature"], call["top_p"], call["top_k"], call["min_p"]) == (0.5, 0.9, 40,
                                                                                 0.05)
    assert (call["presence_penalty"], call["frequency_penalty"], call["repetition_penalty"]) == (
        0.5, -0.5, 1.1)
    assert call["logit_bias"] == {65: -100.0} and call["logprobs"] is None  # default


def test_logit_bias_is_honoured(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4,
                                              "logit_bias": {"90": 100}})
    assert r.get_json()["choices"][0]["text"] == "ZZZZ"


def test_context_overflow_is_400(client):
    err = error_of(client.post("/v1/completions", json={"prompt": "x" * 600}), 400)
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]
    err = error_of(client.post("/v1/completions", json={"prompt": "x" * 100, "max_tokens": 500}),
                   400)
    assert err["code"] == "context_length_exceeded"


def test_default_max_tokens_fills_the_context(client, model):
    client.post("/v1/completions", json={"prompt": "x" * 100})
    assert model.calls[-1]["max_tokens"] == 512 - 100


def test_a_base_model_does_not_chat_and_says_what_to_use(make_app):
    app = make_app([FakeModel(chat_template=False)])
    client = app.test_client()
    err = error_of(client.post("/v1/chat/completions", json=chat_body()), 400)
    assert err["code"] == "model_not_supported" and "no chat template" in err["message"]
    assert "/v1/completions" in err["message"] and "--chat-template" in err["message"]
    assert client.get("/v1/models").get_json()["data"][0]["capabilities"] == [
        "completion", "embeddings"]
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code \
        == 200


def test_unknown_route_method_and_model(client):
    assert error_of(client.get("/v2/nothing"), 404)["code"] == "unknown_url"
    r = client.get("/v1/chat/completions")
    assert error_of(r, 405)["code"] == "method_not_allowed" and "POST" in r.headers["Allow"]
    err = error_of(client.post("/v1/chat/completions", json=chat_body(model="gpt-5")), 404)
    assert (err["code"], err["param"]) == ("model_not_found", "model")
    assert error_of(client.get("/v1/models/gpt-5"), 404)["code"] == "model_not_found"


def test_body_too_large_is_413(make_app):
    client = make_app(max_body_size=1000).test_client()
    r = client.post("/v1/completions", data=json.dumps({"prompt": "x" * 5000}))
    assert error_of(r, 413)["code"] == "request_too_large"


def test_models_and_aliases(client):
    listing = client.get("/v1/models").get_json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["fake-model"]
    assert client.get("/v1/models/gpt-4o-mini").get_json()["id"] == "fake-model"
    r = client.post("/v1/chat/completions", json=chat_body(model="gpt-4o-mini", max_tokens=1))
    assert r.get_json()["model"] == "fake-model"


def test_several_models_routed_by_name(make_app):
    a, b = FakeModel("model-a"), FakeModel("model-b")
    client = make_app([a, b]).test_client()
    client.post("/v1/completions", json={"model": "model-b", "prompt": "x", "max_tokens": 1})
    assert (len(a.calls), len(b.calls)) == (0, 1)
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})  # default: first
    assert len(a.calls) == 1


def test_api_keys_guard_v1_but_not_probes(make_app):
    client = make_app(api_keys=["k1", "k2"]).test_client()
    assert error_of(client.get("/v1/models"), 401)["code"] == "missing_api_key"
    err = error_of(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
    assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200


def test_cors(make_app):
    client = make_app(cors_origins=["https://app.example"], api_keys=["k"]).test_client()
    pre = client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"]
    r = client.get("/v1/models", headers={"Origin": "https://app.example",
                                          "Authorization": "Bearer k"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = client.get("/v1/models", headers={"Origin": "https://evil.example",
                                          "Authorization": "Bearer k"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_request_ids(client):
    r = client.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    generated = {client.get("/healthz").headers["X-Request-Id"] for _ in range(3)}
    assert len(generated) == 3 and all(g.startswith("req_") for g in generated)
    r = client.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.headers["X-Request-Id"].startswith("req_")


def test_access_log_has_request_id_and_tokens(client, caplog):
    caplog.set_level("INFO", logger="numbalm.access")
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=3),
                    headers={"X-Request-Id": "trace-1"})
    r.close()
    record = next(r for r in caplog.records if r.name == "numbalm.access")
    assert record.request_id == "trace-1"
    assert record.fields["status"] == 200 and record.fields["completion_tokens"] == 3


def test_readiness_waits_for_loading():
    gate = __import__("threading").Event()

    def loader(ref, backend):
        gate.wait(5)
        return FakeModel(ref)

    app = create_app({"models": ["m1"]}, pool=ModelPool(["m1"], loader=loader, warmup=True))
    app.extensions["numbalm"].pool.start()
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.get_json()["status"] == "loading"
    err = error_of(client.post("/v1/completions", json={"prompt": "x"}), 503)
    assert err["code"] == "model_not_ready"
    gate.set()
    assert app.extensions["numbalm"].pool.wait_ready(5)
    assert client.get("/readyz").get_json() == {"status": "ready", "models": ["m1"]}
    assert len(app.extensions["numbalm"].pool.models["m1"].llm.calls) == 1  # the warm-up


def test_failed_load_keeps_readyz_503():
    def loader(ref, backend):
        raise OSError("no such file: m.gguf")

    pool = ModelPool(["m.gguf"], loader=loader)
    app = create_app({}, pool=pool)
    pool._load_all()
    r = app.test_client().get("/readyz")
    assert r.status_code == 503 and "no such file" in r.get_json()["status"]


def test_metrics_count_requests_and_tokens(client):
    client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 4}).close()
    client.get("/v1/nothing").close()
    text = client.get("/metrics").get_data(as_text=True)
    assert 'numbalm_http_requests_total{method="POST",route="/v1/completions",status="200"} 1.0' \
        in text
    assert 'route="unmatched",status="404"} 1.0' in text
    assert 'numbalm_prompt_tokens_total{model="fake-model"} 2.0' in text
    assert 'numbalm_completion_tokens_total{model="fake-model"} 4.0' in text
    assert 'numbalm_time_to_first_token_seconds_count{model="fake-model"} 1.0' in text
    assert "numbalm_queue_depth 0.0" in text and "numbalm_ready 1.0" in text


def test_two_apps_in_one_process_keep_separate_metrics(make_app):
    a, b = make_app().test_client(), make_app().test_client()
    a.get("/healthz").close()
    assert 'route="/healthz"' in a.get("/metrics").get_data(as_text=True)
    assert 'route="/healthz"' not in b.get("/metrics").get_data(as_text=True)


def test_streaming_sse_format(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True,
                                              "temperature": 0,
                                              "stream_options": {"include_usage": True}})
    assert r.mimetype == "text/event-stream"
    events = [e for e in r.get_data(as_text=True).split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hel"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 3,
                                   "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}
    r.close()


def test_request_timeout_cancels_the_generation(make_app):
    slow = FakeModel(delay=0.02)
    client = make_app([slow], request_timeout=0.1).test_client()
    err = error_of(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 200}), 503)
    assert err["code"] == "request_timeout" and slow.cancelled == 1
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True})
    events = [e for e in r.get_data(as_text=True).split("\n\n") if e]
    assert json.loads(events[-2][6:])["error"]["code"] == "request_timeout"
    assert events[-1] == "data: [DONE]"
    r.close()
    assert app_admission(client).active == 0


def app_admission(client):
    return client.application.extensions["numbalm"].admission


def test_stream_chat_logprobs_per_token(client):
    r = client.post("/v1/chat/completions", json=chat_body(
        max_tokens=2, temperature=0, stream=True, logprobs=True, top_logprobs=1))
    chunks = [json.loads(e[6:]) for e in r.get_data(as_text=True).split("\n\n")
              if e.startswith("data: {")]
    r.close()
    tokens = [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks
              if c["choices"][0]["logprobs"]]
    assert tokens == ["H", "e"]
    assert app_admission(client).active == 0
