"""The Responses API and Anthropic's Messages API on the real SmolLM2-135M-Instruct, served by
waitress, through the official `openai` and `anthropic` clients."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from pydantic import BaseModel

from server import ModelPool, create_app
from server.http.wsgi import ServerThread
from tests.helpers import model_path

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "name": "get_weather",
           "description": "Get the current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def smollm2():
    model_path("smollm2")  # skip (or fail in CI) without the model
    from engine import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return str(tmp_path_factory.mktemp("responses") / "responses.sqlite3")


def serve(smollm2, store):
    pool = ModelPool.from_models([smollm2], aliases={"smollm2": MODEL}, warmup=False)
    return ServerThread(create_app({"max_concurrent": 2, "responses_store": store}, pool=pool))


@pytest.fixture(scope="module")
def url(smollm2, store):
    with serve(smollm2, store) as server:
        yield server.url


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def claude(url):
    return anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=600)


# --- the Responses API ---------------------------------------------------------------------

def test_responses_create_with_string_and_items(oai):
    r = oai.responses.create(model="smollm2", input="What is 2+2?", temperature=0,
                             max_output_tokens=40)
    assert r.id.startswith("resp_") and r.status == "completed" and r.model == MODEL
    assert "4" in r.output_text
    assert r.usage.output_tokens > 0 and r.usage.total_tokens == \
        r.usage.input_tokens + r.usage.output_tokens
    items = oai.responses.create(model=MODEL, instructions="Answer with one word.",
                                 input=[{"role": "user", "content": [
                                     {"type": "input_text", "text": "What is 2+2?"}]}],
                                 temperature=0, max_output_tokens=40)
    assert items.output[0].type == "message" and items.output_text
    assert items.instructions == "Answer with one word."


def test_responses_incomplete_when_cut(oai):
    r = oai.responses.create(model=MODEL, input="Tell me a long story.", temperature=0,
                             max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5


def test_responses_stream_helper_gets_the_final_response(oai):
    deltas = []
    numbers = []
    with oai.responses.stream(model=MODEL, input="What is 2+2?", temperature=0,
                              max_output_tokens=40) as stream:
        for event in stream:
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert numbers == list(range(len(numbers)))
    assert final.status == "completed" and final.output_text == "".join(deltas)
    whole = oai.responses.create(model=MODEL, input="What is 2+2?", temperature=0,
                                 max_output_tokens=40)
    assert whole.output_text == final.output_text


class Person(BaseModel):
    name: str
    age: int


def test_responses_parse_with_a_pydantic_model(oai):
    r = oai.responses.parse(model=MODEL, input="Invent a person: a name and an age.",
                            text_format=Person, temperature=0, max_output_tokens=60)
    assert isinstance(r.output_parsed, Person)


def test_responses_function_tool_round_trip(oai):
    # one call: after it SmolLM2 is near a tie between ending and a second, parallel call (the
    # KV of a cached prefix tips it either way), and 60 tokens leave no room for a second
    first = oai.responses.create(model=MODEL, input=ASK, tools=[WEATHER],
                                 tool_choice="required", parallel_tool_calls=False,
                                 temperature=0, max_output_tokens=60)
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"]
    with oai.responses.stream(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="required",
                              parallel_tool_calls=False, temperature=0,
                              max_output_tokens=60) as stream:
        streamed = stream.get_final_response()
    assert streamed.output[0].arguments == call.arguments
    # the round trip: the call and its output as items, the answer as text
    answer = oai.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none", input=[
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id,
         "output": json.dumps({"temperature_c": 18, "sky": "sunny"})},
    ], temperature=0, max_output_tokens=60)
    assert answer.output[0].type == "message" and answer.output_text


def test_previous_response_id_survives_a_restart(smollm2, store, oai):
    first = oai.responses.create(model=MODEL, input="My name is Ada. Say hello.",
                                 temperature=0, max_output_tokens=20)
    with serve(smollm2, store) as server:  # a new app, process state gone; the file stays
        again = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                              timeout=600)
        assert again.responses.retrieve(first.id).output_text == first.output_text
        items = again.responses.input_items.list(first.id)
        assert [i.type for i in items.data] == ["message"]
        follow = again.responses.create(model=MODEL, input="What is my name?",
                                        previous_response_id=first.id, temperature=0,
                                        max_output_tokens=20)
        assert follow.previous_response_id == first.id
        # the stored turn is in the prompt: more input tokens than the question alone
        alone = again.responses.create(model=MODEL, input="What is my name?", temperature=0,
                                       max_output_tokens=20, store=False)
        assert follow.usage.input_tokens > alone.usage.input_tokens + 10
        again.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            again.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError) as e:
            again.responses.create(model=MODEL, input="x", previous_response_id=first.id)
        assert e.value.body["code"] == "response_not_found"
        with pytest.raises(openai.NotFoundError):
            again.responses.retrieve(alone.id)  # store=False kept nothing


# --- Anthropic's Messages API --------------------------------------------------------------

def test_messages_create(claude):
    m = claude.messages.create(model=MODEL, max_tokens=40, system="Be brief.",
                               messages=[{"role": "user", "content": "What is 2+2?"}],
                               extra_body={"temperature": 0})
    assert m.id.startswith("msg_") and m.role == "assistant" and m.model == MODEL
    assert m.content[0].type == "text" and "4" in m.content[0].text
    assert m.stop_reason == "end_turn" and m.usage.input_tokens > 0


def test_messages_stream_to_the_final_message(claude):
    with claude.messages.stream(model=MODEL, max_tokens=40, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "What is 2+2?"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


def test_messages_stop_reasons(claude):
    cut = claude.messages.create(model=MODEL, max_tokens=3, extra_body={"temperature": 0},
                                 messages=[{"role": "user", "content": "Count to ten."}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    whole = claude.messages.create(model=MODEL, max_tokens=60, extra_body={"temperature": 0},
                                   messages=[{"role": "user", "content": "Count to ten."}])
    word = whole.content[0].text.split()[2]
    stopped = claude.messages.create(model=MODEL, max_tokens=60, stop_sequences=[word],
                                     extra_body={"temperature": 0},
                                     messages=[{"role": "user", "content": "Count to ten."}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word


def test_messages_tool_use_round_trip(claude):
    tool = {"name": "get_weather", "description": WEATHER["description"],
            "input_schema": WEATHER["parameters"]}
    ask = [{"role": "user", "content": ASK}]
    one = {"type": "any", "disable_parallel_tool_use": True}  # see the Responses test above
    first = claude.messages.create(model=MODEL, max_tokens=60, tools=[tool],
                                   tool_choice=one, messages=ask,
                                   extra_body={"temperature": 0})
    use = first.content[0]
    assert first.stop_reason == "tool_use" and use.type == "tool_use"
    assert use.name == "get_weather" and use.id.startswith("toolu_") and use.input["city"]
    with claude.messages.stream(model=MODEL, max_tokens=60, tools=[tool], messages=ask,
                                tool_choice=one,
                                extra_body={"temperature": 0}) as s:
        streamed = s.get_final_message()
    assert streamed.content[0].input == use.input
    answer = claude.messages.create(model=MODEL, max_tokens=60, tools=[tool],
                                    tool_choice={"type": "none"}, extra_body={"temperature": 0},
                                    messages=ask + [
                                        {"role": "assistant", "content": first.content},
                                        {"role": "user", "content": [{
                                            "type": "tool_result", "tool_use_id": use.id,
                                            "content": "18 C and sunny"}]}])
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"


def test_count_tokens_and_error_shape(claude, url):
    count = claude.messages.count_tokens(model=MODEL, messages=[
        {"role": "user", "content": "What is 2+2?"}])
    made = claude.messages.create(model=MODEL, max_tokens=1, extra_body={"temperature": 0},
                                  messages=[{"role": "user", "content": "What is 2+2?"}])
    assert count.input_tokens == made.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=10, messages=[],
                               extra_body={"temperature": 0})
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "messages" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-nope", max_tokens=10,
                               messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"


# --- tokenize -------------------------------------------------------------------------------

def test_tokenize_round_trip_on_the_real_tokenizer(url, smollm2):
    import httpx

    text = "Hello, caf\u00e9!"
    r = httpx.post(url + "/tokenize", json={"content": text, "with_pieces": True}).json()
    ids = [t["id"] for t in r["tokens"]]
    assert ids == smollm2.tokenizer.encode(text, add_bos=False, special=True)
    back = httpx.post(url + "/v1/detokenize", json={"tokens": ids}).json()
    assert back["content"] == text
