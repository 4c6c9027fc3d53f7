"""The Anthropic and Responses routes on the fake model: wire details the SDK tests do not pin
down (event order, sequence numbers, error shapes, auth headers, the store's bounds)."""

from __future__ import annotations

import json
import time

import pytest

from server.serving.response_store import ResponseStore
from tests.server.fake_engine import FakeModel
from tests.server.test_app import error_of

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def model():
    return FakeModel(n_ctx=4096)  # room for the tool signatures in the system prompt


@pytest.fixture
def app(make_app, tmp_path):
    return make_app(responses_store=str(tmp_path / "r.sqlite3"))


def events(response) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    out = []
    for block in response.get_data(as_text=True).strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines.get("event"), json.loads(lines["data"])))
    return out


# --- Anthropic --------------------------------------------------------------------------------

def test_anthropic_stream_events_in_order(client):
    r = client.post("/v1/messages?beta=true", json={
        "model": "fake-model", "max_tokens": 8, "messages": HI, "stream": True,
        "temperature": 0})
    got = events(r)
    names = [name for name, _ in got]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-4:] == ["content_block_delta", "content_block_stop", "message_delta",
                          "message_stop"]
    assert all(name == data["type"] for name, data in got)
    text = "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta")
    assert text == "Hello th"
    assert got[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert got[-2][1]["usage"]["output_tokens"] == 8


def test_anthropic_tool_use_streams_input_json(client, model):
    model.grammar_output = CALL
    tool = {"name": "get_weather", "input_schema": WEATHER["parameters"]}
    r = client.post("/v1/messages", json={
        "model": "fake-model", "max_tokens": 200, "messages": HI, "stream": True,
        "tools": [tool], "tool_choice": {"type": "any"}})
    got = events(r)
    start = next(d for n, d in got if n == "content_block_start")
    assert start["content_block"]["type"] == "tool_use"
    assert start["content_block"]["id"].startswith("toolu_")
    partial = "".join(d["delta"]["partial_json"] for n, d in got
                      if n == "content_block_delta")
    assert json.loads(partial) == {"city": "Paris"}
    assert got[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_anthropic_errors_and_auth_in_anthropic_shape(make_app):
    client = make_app(api_keys=["sk-1"]).test_client()
    body = {"model": "fake-model", "max_tokens": 5, "messages": HI}
    r = client.post("/v1/messages", json=body)
    assert r.status_code == 401
    assert r.get_json() == {"type": "error", "error": {
        "type": "authentication_error", "message": r.get_json()["error"]["message"]}}
    assert client.post("/v1/messages?beta=true", json=body,
                       headers={"x-api-key": "sk-1"}).status_code == 200
    assert client.post("/v1/messages", json=body,
                       headers={"Authorization": "Bearer sk-1"}).status_code == 200
    r = client.get("/v1/messages", headers={"x-api-key": "sk-1"})
    assert r.status_code == 405 and r.get_json()["type"] == "error"
    r = client.post("/v1/messages", json={**body, "max_tokens": None},
                    headers={"x-api-key": "sk-1"})
    assert r.status_code == 400 and "max_tokens" in r.get_json()["error"]["message"]
    # the OpenAI routes keep OpenAI's shape, with either header
    assert error_of(client.post("/v1/chat/completions", json={"messages": []},
                                headers={"x-api-key": "sk-1"}), 400)["param"] == "messages"


def test_anthropic_tool_result_must_follow_a_tool_use(client):
    r = client.post("/v1/messages", json={"model": "fake-model", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                      "content": "18 C"}]}]})
    assert r.status_code == 400 and "tool_use_id" in r.get_json()["error"]["message"]


# --- Responses --------------------------------------------------------------------------------

def test_responses_stream_event_sequence(client):
    r = client.post("/v1/responses", json={"input": "Hi", "stream": True, "temperature": 0,
                                           "max_output_tokens": 5})
    got = events(r)
    names = [n for n, _ in got]
    assert names[:5] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added",
                         "response.output_text.delta"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [d["sequence_number"] for _, d in got] == list(range(len(got)))
    final = got[-1][1]["response"]
    assert final["status"] == "incomplete" and final["output"][0]["content"][0]["text"] == \
        "Hello"
    assert got[2][1]["item"]["id"] == final["output"][0]["id"]


def test_responses_function_call_events(client, model):
    model.grammar_output = CALL
    r = client.post("/v1/responses", json={"input": "weather?", "stream": True,
                                           "tools": [{"type": "function", **WEATHER}],
                                           "tool_choice": "required"})
    got = events(r)
    added = next(d for n, d in got if n == "response.output_item.added")["item"]
    assert added["type"] == "function_call" and added["call_id"].startswith("call_")
    args = "".join(d["delta"] for n, d in got if n == "response.function_call_arguments.delta")
    done = next(d for n, d in got if n == "response.function_call_arguments.done")
    assert json.loads(args) == {"city": "Paris"} and done["arguments"] == args
    assert got[-1][0] == "response.completed"
    assert got[-1][1]["response"]["output"][0]["id"] == added["id"]


def test_responses_unknown_previous_id_is_404(client):
    err = error_of(client.post("/v1/responses", json={"input": "x",
                                                      "previous_response_id": "resp_nope"}),
                   404)
    assert err["code"] == "response_not_found"
    assert error_of(client.get("/v1/responses/resp_nope"), 404)["code"] == "response_not_found"
    assert error_of(client.delete("/v1/responses/resp_nope"), 404)["param"] == "response_id"


def test_responses_input_items_pages(client):
    items = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    rid = client.post("/v1/responses", json={"input": items, "max_output_tokens": 2}).get_json()
    page = client.get(f"/v1/responses/{rid['id']}/input_items?order=asc&limit=2").get_json()
    assert [i["content"] for i in page["data"]] == ["m0", "m1"] and page["has_more"]
    rest = client.get(f"/v1/responses/{rid['id']}/input_items?order=asc&limit=10"
                      f"&after={page['last_id']}").get_json()
    assert [i["content"] for i in rest["data"]] == ["m2", "m3", "m4"]
    assert not rest["has_more"]


@pytest.mark.parametrize("body, param", [
    ({"input": 5}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "input[0].call_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input[0].content[0].type"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
    ({"input": "x", "temperature": float("nan")}, "temperature"),
    ({"input": "x", "background": True}, "background"),
])
def test_responses_bad_bodies_name_the_field(client, body, param):
    r = client.post("/v1/responses", data=json.dumps(body), content_type="application/json")
    assert error_of(r, 400)["param"] == param


def test_store_is_bounded_by_size_and_age(tmp_path):
    store = ResponseStore(tmp_path / "s.sqlite3", max_age_days=1, max_mb=0.01)  # ~10 kB
    for i in range(20):
        store.put({"id": f"resp_{i}", "pad": "x" * 1000}, [], [])
    assert store.get("resp_0") is None and store.get("resp_19") is not None
    kept = [i for i in range(20) if store.get(f"resp_{i}")]
    assert kept == list(range(kept[0], 20)) and len(kept) < 12  # the newest, under 10 kB
    old = ResponseStore(tmp_path / "s.sqlite3", max_age_days=1e-9)
    time.sleep(0.01)
    assert old.get("resp_19") is None  # past its age: gone


def test_a_registry_alias_names_the_model_it_aliases(make_app):
    client = make_app([FakeModel(id="smollm2-135m-instruct")]).test_client()
    assert client.get("/v1/models/smollm2").get_json()["id"] == "smollm2-135m-instruct"
    r = client.post("/v1/messages", json={"model": "smollm2", "max_tokens": 2, "messages": HI})
    assert r.status_code == 200 and r.get_json()["model"] == "smollm2-135m-instruct"
