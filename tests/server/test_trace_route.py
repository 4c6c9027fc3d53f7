"""`POST /v1/trace` on the real SmolLM2: the trace as JSON, its bounds and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from engine.trace import MAX_ATTENTION_WEIGHTS
from server import ModelPool, create_app

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(smollm2_fast):
    pool = ModelPool.from_models([smollm2_fast])
    return create_app({"api_keys": ["sekrit"]}, pool=pool).test_client()


def post(client, body, key="sekrit"):
    return client.post("/v1/trace", json=body, headers={"Authorization": f"Bearer {key}"})


def test_a_prompt_is_traced(client, smollm2_fast):
    r = post(client, {"prompt": PROMPT, "top_k": 3})
    assert r.status_code == 200, r.get_json()
    js = r.get_json()
    want = smollm2_fast.trace(PROMPT, top_k=3)
    assert [t["id"] for t in js["tokens"]] == want.ids
    assert js["logit_lens"]["top_ids"] == want.logit_lens.top_ids.tolist()
    np.testing.assert_allclose(js["attention"]["weights"][0], want.attention[0], atol=1e-5)
    assert js["vocab"][str(js["logit_lens"]["targets"][-1])] == " Paris"
    assert js["usage"] == {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}


def test_chat_messages_generation_and_interventions(client, smollm2_fast):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    r = post(client, {"messages": messages, "max_tokens": 3, "attention": False,
                      "ablate_heads": [[3, 1]], "ablate_mlp": [0],
                      "steer": [{"layer": 5, "scale": 2, "positive": "happy",
                                 "negative": "sad"}]})
    assert r.status_code == 200, r.get_json()
    js = r.get_json()
    prompt = smollm2_fast.chat_prompt_ids(messages)
    assert [t["id"] for t in js["tokens"]][: len(prompt)] == prompt
    assert js["usage"]["completion_tokens"] == 3 and js["tokens"][-1]["generated"]
    assert js["attention"] is None
    assert js["intervention"]["ablate_heads"] == [[3, 1]]
    assert js["intervention"]["steer"][0]["positive"] == "happy"
    assert len(js["intervention"]["kl"]) == len(js["tokens"])


def test_an_oversized_trace_is_a_400_naming_the_option(client):
    r = post(client, {"prompt": " ".join(["word"] * 120)})
    assert r.status_code == 400
    err = r.get_json()["error"]
    assert err["param"] == "attention_layers" and err["code"] == "trace_too_large"
    assert f"{MAX_ATTENTION_WEIGHTS:,}" in err["message"]
    r = post(client, {"prompt": " ".join(["word"] * 120), "attention_positions": [-1]})
    assert r.status_code == 200, r.get_json()
    js = r.get_json()
    assert js["attention"]["positions"] == [len(js["tokens"]) - 1]  # -1: the last position
    r = post(client, {"prompt": "hi", "max_tokens": 5000})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": "hi", "top_k": "5"}, "top_k"),
    ({"prompt": "hi", "attention_layers": [99]}, "attention_layers"),
    ({"prompt": "hi", "attention_heads": ["a"]}, "attention_heads"),
    ({"prompt": "hi", "ablate_heads": [[1]]}, "ablate_heads"),
    ({"prompt": "hi", "ablate_heads": [[1, 99]]}, "ablate_heads"),
    ({"prompt": "hi", "steer": [{"layer": 1, "vector": [1, 2]}]}, "steer"),
    ({"prompt": "hi", "steer": [{"scale": 1}]}, "steer"),
    ({"prompt": "hi", "bogus": 1}, "bogus"),
    ({"prompt": "hi", "model": "nope"}, "model"),
])
def test_bad_bodies_are_400s_naming_the_field(client, body, param):
    r = post(client, body)
    assert r.status_code in (400, 404), r.get_json()
    given = r.get_json()["error"]["param"]  # a path such as steer[0].layer names the field
    assert given == param or given.startswith((param + "[", param + ".")), given


def test_the_api_key_is_required(client):
    r = post(client, {"prompt": "hi"}, key="wrong")
    assert r.status_code == 401


def test_a_trace_waits_for_a_slot_like_a_generation(smollm2_fast):
    pool = ModelPool.from_models([smollm2_fast])
    app = create_app({"max_concurrent": 1, "queue_size": 0}, pool=pool)
    rt = app.extensions["numbalm"]
    rt.admit()  # the one slot is taken
    try:
        r = app.test_client().post("/v1/trace", json={"prompt": "hi"})
    finally:
        rt.release()
    assert r.status_code == 429 and r.headers["Retry-After"]
    assert app.test_client().post("/v1/trace", json={"prompt": "hi"}).status_code == 200
