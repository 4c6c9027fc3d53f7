"""`/tokenize` and `/detokenize` in llama-server's shapes, at the root and under /v1."""

from __future__ import annotations

import pytest

from tests.server.fake_engine import IM_START
from tests.server.test_app import error_of


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_and_back(client, prefix):
    r = client.post(prefix + "/tokenize", json={"content": "Hi"})
    assert r.status_code == 200 and r.get_json() == {"tokens": [72, 105]}
    r = client.post(prefix + "/detokenize", json={"tokens": [72, 105]})
    assert r.get_json() == {"content": "Hi"}


def test_special_tokens_and_pieces(client):
    tokens = client.post("/tokenize", json={"content": "<|im_start|>\u00e9"}).get_json()
    assert tokens["tokens"] == [IM_START, 0xC3, 0xA9]
    plain = client.post("/tokenize", json={"content": "<|im_start|>", "parse_special": False})
    assert IM_START not in plain.get_json()["tokens"]
    bos = client.post("/tokenize", json={"content": "a", "add_special": True}).get_json()
    assert bos["tokens"][0] == 256
    pieces = client.post("/tokenize", json={"content": "a\u00e9", "with_pieces": True})
    # a piece that is part of a UTF-8 character is given as its bytes, as llama-server does
    assert pieces.get_json()["tokens"] == [{"id": 97, "piece": "a"},
                                           {"id": 0xC3, "piece": [0xC3]},
                                           {"id": 0xA9, "piece": [0xA9]}]


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": "x", "with_pieces": "yes"}, "with_pieces"),
    ("/detokenize", {"tokens": [1, 99999]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
    ("/v1/detokenize", {"tokens": "12"}, "tokens"),
])
def test_bad_bodies_are_400(client, route, body, param):
    assert error_of(client.post(route, json=body), 400)["param"] == param
