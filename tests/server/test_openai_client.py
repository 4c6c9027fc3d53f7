"""The official `openai` client against a real waitress server on a loopback port."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from tests.server.fake_engine import SCRIPT, FakeModel

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def wait_for(predicate, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_models_list_and_retrieve(oai):
    assert [m.id for m in oai.models.list()] == ["fake-model"]
    model = oai.models.retrieve("fake-model")
    assert (model.id, model.object, model.owned_by) == ("fake-model", "model", "numbalm")
    assert oai.models.retrieve("gpt-4o-mini").id == "fake-model"  # alias


def test_chat_completion(oai, model):
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.model == "fake-model" and r.system_fingerprint.startswith("fp_")
    assert abs(r.created - time.time()) < 60
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == SCRIPT
    assert choice.finish_reason == "stop"
    prompt = model.apply_chat_template(MESSAGES)
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt, special=True))
    assert r.usage.completion_tokens == len(SCRIPT.encode()) + 1  # every byte, then EOS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_length_and_max_completion_tokens(oai):
    r = oai.chat.completions.create(model="fake-model", messages=MESSAGES, temperature=0,
                                    max_completion_tokens=5)
    assert r.choices[0].message.content == "Hello"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_chat_stream_with_usage(oai):
    stream = oai.chat.completions.create(model="fake-model", messages=MESSAGES, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPT  # deltas never split a UTF-8 character
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(SCRIPT.encode()) + 1
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stop_sequences(oai):
    r = oai.chat.completions.create(model="fake-model", messages=MESSAGES, temperature=0,
                                    stop=["brown", "fox"])
    assert r.choices[0].message.content == "Hello there, caf\u00e9 \U0001f642 friend. The quick "
    assert r.choices[0].finish_reason == "stop"
    stream = oai.completions.create(model="fake-model", prompt="x", temperature=0, stop="there",
                                    stream=True)
    assert "".join(c.choices[0].text for c in stream) == "Hello "


def test_seed_reproducibility_and_n(oai):
    def run(seed):
        return oai.chat.completions.create(model="fake-model", messages=MESSAGES, seed=seed,
                                           temperature=0.8, n=3)

    a, b, c = run(7), run(7), run(8)
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.message.content for ch in b.choices]
    assert texts != [ch.message.content for ch in c.choices]
    assert len(set(texts)) == 3  # each choice draws its own sample
    assert a.usage.completion_tokens == sum(len(t.encode()) + 1 for t in texts)


def test_stream_n_choices(oai):
    stream = oai.chat.completions.create(model="fake-model", messages=MESSAGES, seed=1, n=2,
                                         temperature=1, stream=True)
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in stream:
        c = chunk.choices[0]
        texts[c.index] += c.delta.content or ""
        if c.finish_reason:
            finishes[c.index] = c.finish_reason
    assert finishes == {0: "stop", 1: "stop"} and texts[0] and texts[0] != texts[1]


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model="fake-model", messages=MESSAGES, temperature=0,
                                    max_tokens=3, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == ["H", "e", "l"]
    assert content[0].bytes == [72] and content[0].logprob == -0.5
    assert len(content[0].top_logprobs) == 2 and content[0].top_logprobs[0].token == "H"


def test_completions_prompt_forms(oai):
    r = oai.completions.create(model="fake-model", prompt=["ab", "cd"], temperature=0,
                               max_tokens=2, n=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == ["He"] * 4
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 8
    r = oai.completions.create(model="fake-model", prompt=[104, 105], temperature=0,
                               max_tokens=2, echo=True)
    assert r.choices[0].text == "hiHe" and r.usage.prompt_tokens == 2


def test_legacy_logprobs_with_echo(oai):
    r = oai.completions.create(model="fake-model", prompt="ab", temperature=0, max_tokens=2,
                               logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["a", "b", "H", "e"]
    assert lp.token_logprobs[0] is None and lp.token_logprobs[2:] == [-0.5, -0.5]
    assert lp.text_offset == [0, 1, 2, 3]
    assert lp.top_logprobs[2] == {"H": -0.5}


def test_errors_as_client_exceptions(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=-3)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="fake-model", messages=MESSAGES,
                                    tools=[{"type": "function", "function": {"name": "f"}}],
                                    tool_choice={"type": "function", "function": {"name": "g"}})
    assert e.value.param == "tool_choice" and "'g'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="fake-model", messages=[], temperature=0)
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="fake-model", prompt="x" * 600)
    assert e.value.code == "context_length_exceeded"


def test_bad_body_over_http(live):
    import httpx2 as httpx

    r = httpx.post(live + "/v1/chat/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert r.headers["X-Request-Id"]


def test_api_keys(make_app, serve):
    url = serve(make_app(api_keys=["sk-one", "sk-two"]))
    good = openai.OpenAI(base_url=url + "/v1", api_key="sk-two", max_retries=0)
    assert [m.id for m in good.models.list()] == ["fake-model"]
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


def test_queue_full_is_429_with_retry_after(make_app, serve):
    slow = FakeModel(delay=0.02)
    app = make_app([slow], max_concurrent=1, queue_size=1, queue_timeout=10)
    url = serve(app)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    busy = [threading.Thread(target=oai.chat.completions.create,
                             kwargs=dict(model="fake-model", messages=MESSAGES, max_tokens=30))
            for _ in range(2)]
    for t in busy:
        t.start()
    admission = app.extensions["numbalm"].admission
    assert wait_for(lambda: admission.active == 1 and admission.waiting == 1)
    with pytest.raises(openai.RateLimitError) as e:
        oai.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert int(e.value.response.headers["Retry-After"]) >= 1
    for t in busy:
        t.join()
    assert slow.max_active == 1
    assert 'reason="queue_full"} 1.0' in _metrics(url)


def test_queue_timeout_is_503(make_app, serve):
    app = make_app([FakeModel(delay=0.05)], max_concurrent=1, queue_size=2, queue_timeout=0.2)
    url = serve(app)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    t = threading.Thread(target=oai.chat.completions.create,
                         kwargs=dict(model="fake-model", messages=MESSAGES, max_tokens=20))
    t.start()
    assert wait_for(lambda: app.extensions["numbalm"].admission.active == 1)
    with pytest.raises(openai.InternalServerError) as e:
        oai.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert e.value.status_code == 503 and e.value.code == "queue_timeout"
    t.join()
    assert 'reason="queue_timeout"} 1.0' in _metrics(url)


def test_disconnect_mid_stream_frees_the_slot(make_app, serve):
    slow = FakeModel(delay=0.05)
    app = make_app([slow], max_concurrent=1, queue_size=0)
    url = serve(app)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    stream = oai.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=400,
                                         temperature=0, stream=True)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 3:
            break
    stream.close()
    closed_at = time.monotonic()
    admission = app.extensions["numbalm"].admission
    assert wait_for(lambda: admission.active == 0, timeout=2)
    assert time.monotonic() - closed_at < 0.5  # a few tokens' time, not the 400-token run
    assert slow.active == 0  # the engine's generator has ended (should_stop or closed)
    # the slot is really free: the next request is served, not refused
    r = oai.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    assert 'numbalm_generations_cancelled_total{reason="disconnect"} 1.0' in _metrics(url)


def _metrics(url: str) -> str:
    import httpx2 as httpx

    return httpx.get(url + "/metrics").text


def test_body_too_large_is_json_413(make_app, serve):
    import httpx2 as httpx

    url = serve(make_app(max_body_size=2000))
    r = httpx.post(url + "/v1/completions", json={"prompt": "x" * 3000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
