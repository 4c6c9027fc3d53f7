"""Ollama's API on the fake model, through Flask's test client: shapes, NDJSON streaming,
options, errors in Ollama's shape, API keys, and /api/pull's progress from a local server."""

from __future__ import annotations

import json

import pytest

from engine import __version__
from engine.sampling import CHAT_DEFAULTS
from tests.server.fake_engine import SCRIPT, FakeModel

GREEDY = {"temperature": 0}
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}],
        "stream": False, "options": GREEDY}


def lines(response) -> list[dict]:
    assert response.status_code == 200 and response.mimetype == "application/x-ndjson"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def test_chat_not_streamed(client, model):
    r = client.post("/api/chat", json=CHAT)
    body = r.get_json()
    assert r.status_code == 200 and body["model"] == "fake-model" and body["done"] is True
    assert body["message"] == {"role": "assistant", "content": SCRIPT}
    assert body["done_reason"] == "stop" and body["eval_count"] == len(SCRIPT.encode()) + 1
    assert body["prompt_eval_count"] > 0 and body["total_duration"] > 0
    assert body["created_at"].endswith("Z")


def test_chat_streams_ndjson_by_default(client):
    chunks = lines(client.post("/api/chat", json={**CHAT, "stream": None}))
    assert all(c["done"] is False for c in chunks[:-1]) and chunks[-1]["done"] is True
    assert "".join(c["message"]["content"] for c in chunks) == SCRIPT
    assert chunks[-1]["done_reason"] == "stop" and "eval_duration" in chunks[-1]


def test_options_reach_the_engine_and_defaults_are_the_chat_defaults(client, model):
    client.post("/api/chat", json=CHAT)
    assert model.calls[-1]["repetition_penalty"] == CHAT_DEFAULTS["repetition_penalty"]
    assert model.calls[-1]["penalize_prompt"] is False
    options = {"temperature": 0.5, "top_k": 7, "top_p": 0.5, "min_p": 0.1, "seed": 3,
               "num_predict": 5, "stop": ["x"], "repeat_penalty": 1.3, "repeat_last_n": -1,
               "num_ctx": 4096, "num_thread": 2}  # the last two tune Ollama's runner: no effect
    body = client.post("/api/chat", json={**CHAT, "options": options}).get_json()
    call = model.calls[-1]
    assert (call["temperature"], call["top_k"], call["top_p"], call["min_p"]) == \
        (0.5, 7, 0.5, 0.1)
    assert call["max_tokens"] == 5 and call["stop"] == ("x",) and call["seed"] == 3
    assert (call["repetition_penalty"], call["repeat_last_n"]) == (1.3, -1)
    assert body["done_reason"] == "length" and body["eval_count"] == 5


def test_generate_uses_the_chat_template_unless_raw(client, model):
    body = client.post("/api/generate", json={"model": "fake-model", "prompt": "Hi",
                                              "system": "Be brief.", "stream": False,
                                              "options": GREEDY}).get_json()
    assert body["response"] == SCRIPT and body["done"] is True
    assert model.templates[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}]
    n = len(model.templates)
    chunks = lines(client.post("/api/generate", json={"model": "fake-model", "prompt": "Hi",
                                                      "raw": True, "options": GREEDY}))
    assert len(model.templates) == n  # raw: no template
    assert "".join(c["response"] for c in chunks) == SCRIPT


def test_a_base_model_generates_but_does_not_chat(make_app):
    client = make_app([FakeModel(chat_template=False)]).test_client()
    r = client.post("/api/chat", json=CHAT)
    assert r.status_code == 400 and "no chat template" in r.get_json()["error"]
    body = client.post("/api/generate", json={"model": "fake-model", "prompt": "Once",
                                              "stream": False, "options": GREEDY}).get_json()
    assert body["response"] == SCRIPT
    show = client.post("/api/show", json={"model": "fake-model"}).get_json()
    assert show["capabilities"] == ["completion"] and show["template"] == ""


def test_empty_prompt_only_loads(client, model):
    body = client.post("/api/generate", json={"model": "fake-model"}).get_json()
    assert body["done"] is True and body["done_reason"] == "load" and not model.calls


def test_format_json_schema_and_tools_become_the_grammar(client, model):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.post("/api/chat", json={**CHAT, "format": schema})
    assert model.calls[-1]["grammar"] is not None
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}}}}]
    client.post("/api/chat", json={**CHAT, "tools": tools})
    assert model.templates[-1]["tools"][0]["function"]["name"] == "f"


def test_tool_history_in_ollamas_form(client, model):
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18 C", "tool_name": "get_weather"}]
    assert client.post("/api/chat", json={**CHAT, "messages": messages}).status_code == 200
    sent = model.templates[-1]["messages"]
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert sent[2]["role"] == "tool" and sent[2]["name"] == "get_weather"


@pytest.mark.parametrize("body, status, words", [
    ({"messages": []}, 400, "model is required"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model 'nope' not found"),
    ({**CHAT, "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ({**CHAT, "options": {"top_p": 3}}, 400, "between 0 and 1"),
    ({**CHAT, "format": "yaml"}, 400, "invalid format"),
    ({**CHAT, "think": True}, 400, "do not think"),
    ({**CHAT, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400,
     "text only"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid role"),
    ({**CHAT, "format": {"type": "object", "properties": {"a": {"type": "string",
                                                                "format": "ipv7"}}}}, 400,
     "format"),
])
def test_errors_have_ollamas_shape(client, body, status, words):
    r = client.post("/api/chat", json=body)
    assert r.status_code == status and set(r.get_json()) == {"error"}
    assert words in r.get_json()["error"]


def test_bad_json_and_unknown_method(client):
    r = client.post("/api/chat", data=b"{nope", content_type="application/json")
    assert r.status_code == 400 and "invalid JSON" in r.get_json()["error"]
    r = client.get("/api/chat")
    assert r.status_code == 405 and "error" in r.get_json()


def test_api_keys_apply_and_errors_keep_ollamas_shape(make_app):
    client = make_app(api_keys=["k"]).test_client()
    r = client.get("/api/tags")
    assert r.status_code == 401 and set(r.get_json()) == {"error"}
    r = client.get("/api/tags", headers={"Authorization": "Bearer k"})
    assert r.status_code == 200 and r.get_json()["models"][0]["name"] == "fake-model"


def test_tags_show_ps_version(client):
    [m] = client.get("/api/tags").get_json()["models"]
    assert m["model"] == "fake-model" and m["details"]["format"] == "gguf"
    assert m["details"]["family"] == "fake"
    show = client.post("/api/show", json={"model": "fake-model:latest"}).get_json()
    assert show["capabilities"] == ["completion", "tools"]
    assert show["model_info"]["general.architecture"] == "fake" and show["template"]
    ps = client.get("/api/ps").get_json()
    assert ps["models"][0]["context_length"] == 512 and ps["numbalm"]["running"] == 0
    assert client.get("/api/version").get_json() == {"version": __version__}


def test_embed_and_the_older_embeddings(client, model):
    body = client.post("/api/embed", json={"model": "fake-model", "input": ["a", "b"]}
                       ).get_json()
    assert len(body["embeddings"]) == 2 and len(body["embeddings"][0]) == model.dim
    assert body["prompt_eval_count"] == 2
    old = client.post("/api/embeddings", json={"model": "fake-model", "prompt": "a"}).get_json()
    assert old["embedding"] == body["embeddings"][0]
    short = client.post("/api/embed", json={"model": "fake-model", "input": "a",
                                            "dimensions": 4}).get_json()
    assert len(short["embeddings"][0]) == 4


def test_embed_truncates_by_default_as_ollama(make_app):
    client = make_app([FakeModel(n_ctx=8)]).test_client()
    long = "x" * 20
    assert client.post("/api/embed", json={"model": "fake-model", "input": long}
                       ).status_code == 200
    r = client.post("/api/embed", json={"model": "fake-model", "input": long, "truncate": False})
    assert r.status_code == 400 and "maximum context length" in r.get_json()["error"]


def test_pull_streams_the_registrys_progress(client, tmp_path, monkeypatch):
    from tests.engine.test_hub import Hub
    from tests.engine.test_registry import write_tiny_gguf

    payload = write_tiny_gguf(tmp_path / "p.gguf", n_vocab=256).read_bytes()
    hub = Hub(payload)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("NUMBALM_HOME", str(tmp_path / "home"))
    try:
        chunks = lines(client.post("/api/pull", json={"model": "hf.co/owner/repo:Q8_0"}))
        quiet = client.post("/api/pull", json={"model": "hf.co/owner/repo:Q8_0",
                                               "stream": False})
    finally:
        hub.close()
    assert chunks[0] == {"status": "pulling manifest"} and chunks[-1] == {"status": "success"}
    bytes_ = [c for c in chunks if c.get("digest") == "SmolThing-Q8_0.gguf"]
    assert bytes_[-1]["completed"] == bytes_[-1]["total"] == len(payload)
    assert quiet.get_json() == {"status": "success"}
    r = client.post("/api/pull", json={"model": "no-such-model", "stream": False})
    assert r.status_code == 404 and "not a catalog model" in r.get_json()["error"]
