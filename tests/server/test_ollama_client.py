"""The official `ollama` Python client against numbalm serving the real SmolLM2-135M-Instruct
under waitress on loopback: chat (streamed and not), generate, embed, list, show, ps, a JSON
schema reply that validates, a tool call, and Ollama's errors."""

from __future__ import annotations

import json

import jsonschema
import ollama
import pytest

from engine import load_model
from server import ModelPool, create_app
from server.http.wsgi import ServerThread
from tests.server.test_real_model import ASK_WEATHER, MODEL, PERSON, TOOLS, WEATHER

GREEDY = {"temperature": 0, "num_predict": 40}
QUESTION = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def client():
    pool = ModelPool.from_models([load_model(MODEL)], warmup=True)
    app = create_app({"max_concurrent": 2, "queue_size": 4}, pool=pool)
    with ServerThread(app) as server:
        yield ollama.Client(host=server.url, timeout=600)


def test_chat_not_streamed(client):
    r = client.chat(model=MODEL, messages=QUESTION, options=GREEDY)
    assert r.model == MODEL and r.done and r.done_reason in ("stop", "length")
    assert r.message.role == "assistant" and "4" in r.message.content
    assert r.prompt_eval_count > 0 and 0 < r.eval_count <= 40 and r.total_duration > 0


def test_chat_streamed_equals_not_streamed(client):
    whole = client.chat(model=MODEL, messages=QUESTION, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=QUESTION, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_goes_through_the_template_and_raw_does_not(client):
    r = client.generate(model=MODEL, prompt="What is 2+2?", options=GREEDY)
    assert r.done and "4" in r.response
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 8})
    assert raw.done_reason == "length" and raw.eval_count == 8 and raw.response


def test_embed(client):
    r = client.embed(model=MODEL, input=["a cat", "a dog"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 576
    assert abs(sum(x * x for x in r.embeddings[0]) - 1) < 1e-4  # normalized, as Ollama's
    old = client.embeddings(model=MODEL, prompt="a cat")
    assert old.embedding == pytest.approx(r.embeddings[0], abs=1e-6)


def test_list_show_ps(client):
    [m] = client.list().models
    assert m.model == MODEL and m.details.family == "llama" and m.details.format == "gguf"
    show = client.show(MODEL)
    assert "tools" in show.capabilities and "completion" in show.capabilities
    assert show.modelinfo["general.architecture"] == "llama" and "im_start" in show.template
    [p] = client.ps().models
    assert p.model == MODEL and p.context_length == 8192


def test_format_json_schema_reply_validates(client):
    r = client.chat(model=MODEL, format=PERSON, options={"temperature": 0, "num_predict": 80},
                    messages=[{"role": "user", "content": "Give a person's name and age."}])
    jsonschema.validate(json.loads(r.message.content), PERSON)


# Ollama has no tool_choice: a model decides. This 135M model answers "auto" with text, unless
# the conversation shows it one call first; then it calls the tool for the new question.
ONE_CALL = [{"role": "user", "content": "What is the weather like in London?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "London"}}}]},
            {"role": "tool", "tool_name": "get_weather",
             "content": json.dumps({"city": "London", "temperature_c": 15, "sky": "cloudy"})},
            {"role": "assistant", "content": "It is 15 °C and cloudy in London."}]


def test_tool_call(client):
    kw = dict(model=MODEL, messages=ONE_CALL + ASK_WEATHER, tools=TOOLS[:1],
              options={"temperature": 0, "num_predict": 80})
    r = client.chat(**kw)
    [call] = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments["city"] == "Paris"
    jsonschema.validate(dict(call.function.arguments), WEATHER)
    streamed = list(client.chat(**kw, stream=True))
    calls = [c for part in streamed for c in part.message.tool_calls or []]
    assert [c.function.arguments for c in calls] == [call.function.arguments]


def test_errors_reach_the_client_as_ollamas(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=QUESTION)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=QUESTION, options={"top_p": 5})
    assert e.value.status_code == 400 and "top_p" in e.value.error
