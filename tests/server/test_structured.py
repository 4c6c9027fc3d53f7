"""response_format (json_object, json_schema) with the fake model: the grammar reaches the
engine on both routes, streamed or not; every bad shape or unenforceable schema is a 400
before any generation."""

from __future__ import annotations

import json

import pytest

from engine.constrain import Grammar
from tests.helpers import chat_body
from tests.server.fake_engine import SCRIPT
from tests.server.test_app import error_of

PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def schema_format(schema=PERSON, **extra) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, **extra}}


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", chat_body()),
    ("/v1/completions", {"model": "fake-model", "prompt": "A person:"}),
])
@pytest.mark.parametrize("response_format, kind", [
    (schema_format(strict=True, description="someone"), "json_schema"),
    (schema_format(strict=False), "json_schema"),
    ({"type": "json_object"}, "json_object"),
    # lenient as llama.cpp: no name, and json_object with a schema (llama.cpp's extension)
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "json_schema"),
    ({"type": "json_object", "schema": PERSON}, "json_schema"),
])
def test_response_format_reaches_the_engine(client, model, route, body, response_format, kind):
    model.grammar_output = '{"name": "Ada", "age": 36}'
    r = client.post(route, json={**body, "response_format": response_format})
    assert r.status_code == 200, r.get_data(as_text=True)
    choice = r.get_json()["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert json.loads(text) == {"name": "Ada", "age": 36}
    grammar = model.calls[-1]["grammar"]
    assert isinstance(grammar, Grammar) and grammar.kind == kind


def test_text_format_is_plain(client, model):
    r = client.post("/v1/chat/completions",
                    json=chat_body(temperature=0, response_format={"type": "text"}))
    assert r.get_json()["choices"][0]["message"]["content"] == SCRIPT
    assert model.calls[-1]["grammar"] is None


def test_streamed_json(client, model):
    model.grammar_output = '{"name": "Ada", "age": 36}'
    r = client.post("/v1/chat/completions", json=chat_body(
        stream=True, response_format=schema_format(),
        stream_options={"include_usage": True}))
    events = [e[6:] for e in r.get_data(as_text=True).split("\n\n") if e]
    r.close()
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert json.loads(text) == {"name": "Ada", "age": 36}
    assert chunks[-1]["usage"]["completion_tokens"] == len(text) + 1


@pytest.mark.parametrize("response_format, code", [
    ("json", "invalid_type"),
    ({"type": "xml"}, "invalid_value"),
    ({}, "invalid_value"),
    ({"type": "json_schema"}, "missing_required_parameter"),
    ({"type": "json_schema", "json_schema": "person"}, "invalid_type"),
    ({"type": "json_schema", "json_schema": {"name": "a person", "schema": PERSON}},
     "invalid_value"),
    ({"type": "json_schema", "json_schema": {"name": "person"}}, "missing_required_parameter"),
    ({"type": "json_schema", "json_schema": {"name": "person", "schema": "{}"}},
     "invalid_type"),
    (schema_format(strict="yes"), "invalid_type"),
    (schema_format({"type": "array", "uniqueItems": True}), "unsupported_schema_keyword"),
    (schema_format({"type": "object", "not": {"required": ["a"]}}),
     "unsupported_schema_keyword"),
    (schema_format({"type": "string", "format": "bogus"}), "invalid_schema"),
])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_bad_response_format_is_400(client, model, route, response_format, code):
    body = chat_body() if "chat" in route else {"prompt": "x"}
    err = error_of(client.post(route, json={**body, "response_format": response_format}), 400)
    assert err["param"].startswith("response_format") and err["code"] == code
    assert model.calls == []  # refused before admission and generation


def test_unsupported_keyword_is_named(client):
    err = error_of(client.post("/v1/chat/completions", json=chat_body(
        response_format=schema_format({"type": "array", "uniqueItems": True}))), 400)
    assert err["param"] == "response_format" and "'uniqueItems'" in err["message"]


def test_bad_schema_is_400_even_when_every_slot_is_busy(make_app, model):
    app = make_app(max_concurrent=1, queue_size=0)
    app.extensions["numbalm"].admit()  # the only slot is taken
    client = app.test_client()
    err = error_of(client.post("/v1/chat/completions", json=chat_body(
        response_format=schema_format({"not": {}}))), 400)
    assert err["code"] == "unsupported_schema_keyword"
    r = client.post("/v1/chat/completions", json=chat_body(response_format=schema_format()))
    assert r.status_code == 429  # a good one waits for the slot (and finds no queue)


def test_response_format_with_tools_constrains_the_text_alternative(client, model):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    model.n_ctx = 4096
    model.grammar_output = '{"name": "Ada", "age": 36}'
    r = client.post("/v1/chat/completions", json=chat_body(
        tools=tools, response_format=schema_format()))
    assert json.loads(r.get_json()["choices"][0]["message"]["content"])["age"] == 36
    assert model.calls[-1]["grammar"].kind == "lark"
