"""The request schemas: one declaration validates each body and writes /openapi.json and /docs."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from tests.server.test_app import error_of


def test_openapi_document_is_valid_3_1_and_lists_every_route(app, client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.get_json()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on an invalid document
    rules = {(rule.rule.replace("<path:", "{").replace("<", "{").replace(">", "}"), m.lower())
             for rule in app.url_map.iter_rules() if rule.endpoint != "static"
             for m in rule.methods if m not in ("HEAD", "OPTIONS")}
    listed = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert rules == listed
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["messages"]
    assert body["properties"]["temperature"]["maximum"] == 2
    assert "text/event-stream" in chat["responses"]["200"]["content"]


def test_openapi_and_docs_are_open_without_an_api_key(make_app):
    client = make_app(api_keys=["sk-1"]).test_client()
    assert client.get("/openapi.json").status_code == 200
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/v1/chat/completions" in html and "temperature" in html
    assert "<script" not in html  # nothing to fetch: works offline


CHAT = '{"messages": [{"role": "user", "content": "Hi"}], '


@pytest.mark.parametrize("route, raw, param", [
    ("/v1/chat/completions", CHAT + '"temperature": NaN}', "temperature"),
    ("/v1/chat/completions", CHAT + '"seed": NaN}', "seed"),
    ("/v1/chat/completions", CHAT + '"n": NaN}', "n"),
    ("/v1/chat/completions", CHAT + '"top_p": Infinity}', "top_p"),
    ("/v1/chat/completions", CHAT + '"presence_penalty": NaN}', "presence_penalty"),
    ("/v1/chat/completions", CHAT + '"logit_bias": {"5": NaN}}', "logit_bias"),
    ("/v1/chat/completions", CHAT + '"top_k": 100000000000000000000000}', "top_k"),
    ("/v1/chat/completions", CHAT + '"seed": 100000000000000000000000}', "seed"),
    ("/v1/chat/completions", CHAT + '"max_tokens": -Infinity}', "max_tokens"),
    ("/v1/chat/completions", CHAT + '"response_format": {"type": "json_schema", "json_schema":'
     ' {"schema": {"type": "number", "maximum": NaN}}}}',
     "response_format.json_schema.schema.maximum"),
    ("/v1/completions", '{"prompt": "x", "temperature": -Infinity}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "repetition_penalty": 1e999}', "repetition_penalty"),
    ("/v1/embeddings", '{"input": "x", "dimensions": NaN}', "dimensions"),
])
def test_non_finite_and_out_of_range_numbers_are_400_naming_the_field(client, model, route,
                                                                      raw, param):
    r = client.post(route, data=raw, content_type="application/json")
    err = error_of(r, 400)
    assert err["param"] == param and err["code"] in ("invalid_value", "invalid_type")
    assert model.calls == []


def test_nulls_mean_not_given(client, model):
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "temperature": None, "stop": None,
        "tools": None, "response_format": None, "n": None, "stream": None})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert model.calls[-1]["temperature"] == 1.0  # the fake engine's own default: not passed


def test_deeply_nested_free_values_are_400_naming_the_field(client):
    deep = "[" * 200 + "]" * 200
    raw = CHAT + '"response_format": {"type": "json_schema", "json_schema": {"schema": ' \
        '{"a": ' + deep + '}}}}'
    err = error_of(client.post("/v1/chat/completions", data=raw,
                               content_type="application/json"), 400)
    assert err["param"].startswith("response_format.json_schema.schema.a[0]")
    raw = CHAT + '"metadata": ' + "[" * 5000 + "]" * 5000 + "}"  # past the JSON parser's limit
    assert error_of(client.post("/v1/chat/completions", data=raw,
                                content_type="application/json"), 400)["code"] == "invalid_json"
