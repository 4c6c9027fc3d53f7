"""Batched serving on the real SmolLM2 under waitress: concurrent requests get what each gets
alone, n choices share a prefill, a repeated history is served from the prefix cache, a
client that leaves frees its slot, and /metrics shows the batching."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import openai
import pytest

from server import ModelPool, create_app
from server.http.wsgi import ServerThread
from tests.server.test_real_model import MODEL, load_model  # noqa: F401 - the fixture

TOPICS = ["the sea", "a red fox", "winter in Oslo", "bread", "the moon", "a violin",
          "chess", "rain on a roof"]


@pytest.fixture(scope="module")
def served():
    """(app, base url, openai client): SmolLM2 batched 8 ways."""
    pool = ModelPool.from_models([load_model(MODEL)], warmup=True)
    app = create_app({"max_concurrent": 8, "queue_size": 8}, pool=pool)
    with ServerThread(app) as server:
        yield app, server.url, openai.OpenAI(base_url=server.url + "/v1", api_key="x",
                                             max_retries=0, timeout=120)


def ask(oai, topic: str, **kw):
    r = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, **kw,
                                    messages=[{"role": "user", "content": f"About {topic}."}])
    return r.choices[0].message.content


def test_eight_concurrent_requests_give_what_each_gives_alone(served):
    app, _, oai = served
    alone = [ask(oai, t) for t in TOPICS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda t: ask(oai, t), TOPICS))
    assert together == alone
    assert app.extensions["numbalm"].admission.active == 0


def test_streams_side_by_side_equal_whole_replies(served):
    _, _, oai = served
    whole = [ask(oai, t) for t in TOPICS[:4]]

    def stream(topic):
        chunks = oai.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=24, stream=True,
            messages=[{"role": "user", "content": f"About {topic}."}])
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(stream, TOPICS[:4])) == whole


def test_n_choices_are_the_seeds_alone(served):
    _, _, oai = served
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=1.0, max_tokens=10)
    four = oai.completions.create(n=4, seed=11, **kw)
    singles = [oai.completions.create(seed=11 + i, **kw).choices[0].text for i in range(4)]
    assert [c.text for c in sorted(four.choices, key=lambda c: c.index)] == singles


def test_a_second_turn_reports_its_cached_history(served):
    _, _, oai = served
    history = [{"role": "user", "content": "Here is a list: " + ", ".join(
        f"item {i}" for i in range(150)) + ". Which item comes first?"}]
    first = oai.chat.completions.create(model=MODEL, messages=history, temperature=0,
                                        max_tokens=8)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2
    turn2 = history + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "And the last?"}]
    second = oai.chat.completions.create(model=MODEL, messages=turn2, temperature=0,
                                         max_tokens=8)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 32


def test_a_client_that_leaves_mid_stream_frees_its_slot(served):
    app, url, oai = served
    rt = app.extensions["numbalm"]
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 400, "temperature": 0,
                       "messages": [{"role": "user", "content": "Write a long story."}]})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.readline()  # the first event: the generation is running
    other = threading.Thread(target=ask, args=(oai, "the sea"))
    other.start()
    resp.close()  # gone, with ~400 tokens to go
    conn.close()
    other.join(timeout=60)
    llm = rt.pool.list()[0].llm
    for _ in range(200):  # it leaves within a step once waitress notices the socket closed
        if rt.admission.active == 0 and not llm.scheduler.running:
            break
        threading.Event().wait(0.05)
    assert rt.admission.active == 0 and not llm.scheduler.running
    assert ask(oai, "the sea")  # and the server goes on


def test_metrics_show_the_batching(served):
    app, _, _ = served
    text = app.test_client().get("/metrics").get_data(as_text=True)
    for name in ("numbalm_batch_steps_total", "numbalm_batch_sequences_total",
                 "numbalm_prefix_cache_hit_tokens_total", "numbalm_scheduler_running",
                 "numbalm_kv_cache_blocks_used"):
        assert f'{name}{{model="{MODEL}"}}' in text
