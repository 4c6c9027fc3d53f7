"""Tool calling with the fake model: validation (400s), the grammar per tool_choice (checked
with llguidance on a byte vocabulary), the call parser, responses and stream deltas."""

from __future__ import annotations

import json

import llguidance
import pytest

from engine.constrain import Grammar
from server.openai.tools import parse_tools
from server.serving.grammar import lark_grammar
from server.serving.toolcalls import ToolCallParser, parse_output
from tests.helpers import chat_body
from tests.server.fake_engine import SCRIPT, FakeModel
from tests.server.test_app import error_of

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object",
                                  "properties": {"a": {"type": "integer"},
                                                 "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SUM = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


@pytest.fixture
def model():
    return FakeModel(n_ctx=4096)  # room for the tool signatures in the system prompt


def calls_body(**extra) -> dict:
    return chat_body(tools=TOOLS, **extra)


# --- the grammar, on a byte-level vocabulary --------------------------------------------------

class Bytes:
    """A vocabulary of the 256 bytes plus an end token, for llguidance."""

    eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]

    def __call__(self, text):
        return list(text.encode() if isinstance(text, str) else text)


BYTES = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes()))


def accepts(lark: str | Grammar, text: str) -> bool:
    spec = lark.spec if isinstance(lark, Grammar) else llguidance.LLMatcher.grammar_from_lark(lark)
    matcher = llguidance.LLMatcher(BYTES, spec, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


WRONG_ARGS = '<tool_call>\n{"name": "add", "arguments": {"city": "Paris"}}\n</tool_call>'
UNKNOWN = '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>'
TEXTS = ["Hello <b>there</b>", PARIS, PARIS + "\n" + SUM, WRONG_ARGS, UNKNOWN,
         "Sure. " + PARIS, "<tool_call>x"]


@pytest.mark.parametrize("choice, parallel, expected", [
    ("auto", True, [True, True, True, False, False, False, False]),
    ("required", True, [False, True, True, False, False, False, False]),
    ("required", False, [False, True, False, False, False, False, False]),
    ({"type": "function", "function": {"name": "add"}}, True,
     [False, False, False, False, False, False, False]),
    ("none", True, [True, False, False, False, False, False, False]),
])
def test_grammar_per_tool_choice(choice, parallel, expected):
    spec = parse_tools({"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel})
    lark = lark_grammar(spec)
    assert [accepts(lark, t) for t in TEXTS] == expected
    Grammar.lark(lark)  # the engine compiles it too


def test_named_function_grammar_takes_only_that_function():
    spec = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function",
                                                        "function": {"name": "add"}}})
    assert accepts(lark_grammar(spec), SUM) and not accepts(lark_grammar(spec), PARIS)
    assert not accepts(lark_grammar(spec), SUM + "\n" + SUM)  # exactly one call


def test_text_beside_tools_does_not_start_with_a_tag():
    spec = parse_tools({"tools": TOOLS, "tool_choice": "none"})
    assert not accepts(lark_grammar(spec), "<tool_response>18 C</tool_response>")
    assert not accepts(lark_grammar(spec), "<b>hi</b>")


def test_calls_may_end_with_a_newline():
    # a model that wants to write on after a call may end the line, then must stop or call
    spec = parse_tools({"tools": TOOLS, "tool_choice": "required"})
    assert accepts(lark_grammar(spec), PARIS + "\n")
    assert not accepts(lark_grammar(spec), PARIS + "\nThe weather")


def test_response_format_with_tools_replaces_free_text():
    spec = parse_tools({"tools": TOOLS})
    lark = lark_grammar(spec, '%json {"type": "object"}')
    assert [accepts(lark, t) for t in ['{"a": 1}', "plain text", PARIS]] == [True, False, True]


# --- the parser ---------------------------------------------------------------------------------

def ids():
    n = iter(range(100))
    return lambda: f"call_{next(n)}"


@pytest.mark.parametrize("step", [1, 2, 5, 13, 1000])
def test_parser_is_the_same_in_any_pieces(step):
    text = PARIS + "\n" + SUM + "\n"
    parser = ToolCallParser(ids())
    deltas = [parser.push(text[i:i + step]) for i in range(0, len(text), step)]
    deltas.append(parser.finish())
    assert not any(d.content for d in deltas)
    entries = [c for d in deltas for c in d.calls]
    assert entries[0] == {"index": 0, "id": "call_0", "type": "function",
                          "function": {"name": "get_weather", "arguments": ""}}
    args = {0: "", 1: ""}
    for e in entries:
        args[e["index"]] += e["function"]["arguments"]
    assert args == {0: '{"city": "Paris"}', 1: '{"a": 1, "b": 2}'}
    assert [c.openai() for c in parser.calls] == [
        {"id": "call_0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_1", "type": "function",
         "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]


def test_parser_text_and_held_prefix():
    parser = ToolCallParser(ids())
    assert parser.push("<tool").content == ""  # could still be the tag
    assert parser.push("box> is a word").content == "<toolbox> is a word"
    assert parse_output("<tool", ids()) == ("<tool", [])  # never became a tag
    assert parse_output("Hi", ids()) == ("Hi", [])


def test_parser_handles_braces_and_escapes_in_strings():
    tricky = '<tool_call>\n{"name": "f", "arguments": {"s": "a}\\"{]"}}\n</tool_call>'
    content, calls = parse_output(tricky, ids())
    assert content is None and json.loads(calls[0].arguments) == {"s": 'a}"{]'}


def test_parser_drops_an_exact_repeat_and_says_so():
    parser = ToolCallParser(ids())
    parser.push(PARIS + "\n" + SUM + "\n")
    assert not parser.repeated
    delta = parser.push(PARIS)
    assert parser.repeated and delta.calls == [] and len(parser.calls) == 2


# --- validation -------------------------------------------------------------------------------

def fn(**function):
    return [{"type": "function", "function": function}]


@pytest.mark.parametrize("extra, param", [
    ({"tools": {"name": "f"}}, "tools"),
    ({"tools": ["f"]}, "tools[0]"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": fn()}, "tools[0].function.name"),
    ({"tools": fn(name="has space")}, "tools[0].function.name"),
    ({"tools": fn(name="f", description=3)}, "tools[0].function.description"),
    ({"tools": fn(name="f", parameters="{}")}, "tools[0].function.parameters"),
    ({"tools": fn(name="f", parameters={"type": "string"})}, "tools[0].function.parameters"),
    ({"tools": fn(name="f", parameters={"type": "object"}, strict="yes")},
     "tools[0].function.strict"),
    ({"tools": fn(name="f") + fn(name="f")}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tools_are_400_naming_the_field(client, model, extra, param):
    err = error_of(client.post("/v1/chat/completions", json=chat_body(**extra)), 400)
    assert err["param"] == param
    assert model.calls == []  # refused before any generation


def test_unsupported_keyword_in_parameters_names_tool_and_keyword(client):
    tools = [WEATHER] + fn(name="tag", parameters={
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}})
    err = error_of(client.post("/v1/chat/completions", json=chat_body(tools=tools)), 400)
    assert err["param"] == "tools[1].function.parameters"
    assert err["code"] == "unsupported_schema_keyword" and "uniqueItems" in err["message"]


CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "content": "18 C"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "tool_call_id": "call_9", "content": "18 C"}],
     "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_1"}], "messages[1].content"),
    ([{"role": "assistant", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f",
                                                                 "arguments": {}}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}],
     "messages[0].tool_calls[0].function"),
    ([{"role": "assistant", "content": None, "function_call": {"name": "f"}}],
     "messages[0].role"),
])
def test_bad_tool_messages_are_400(client, messages, param):
    err = error_of(client.post("/v1/chat/completions", json=chat_body(messages=messages)), 400)
    assert err["param"] == param


def test_tools_on_completions_are_refused(client):
    r = client.post("/v1/completions", json={"prompt": "x", "tools": TOOLS})
    assert error_of(r, 400)["param"] == "tools"


# --- responses --------------------------------------------------------------------------------

def test_required_returns_tool_calls(client, model):
    model.grammar_output = PARIS + "\n" + SUM
    r = client.post("/v1/chat/completions", json=calls_body(tool_choice="required"))
    choice = r.get_json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["role"] == "assistant"
    first, second = message["tool_calls"]
    assert first["id"].startswith("call_") and len(first["id"]) == 29
    assert first["id"] != second["id"] and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert json.loads(second["function"]["arguments"]) == {"a": 1, "b": 2}
    grammar = model.calls[-1]["grammar"]
    assert grammar.kind == "lark"
    # the tools reach the chat template
    assert model.templates[-1]["tools"][0]["function"]["name"] == "get_weather"


def test_auto_with_text_is_content(client, model):
    model.grammar_output = "It is sunny."
    r = client.post("/v1/chat/completions", json=calls_body())
    choice = r.get_json()["choices"][0]
    assert choice["message"]["content"] == "It is sunny."
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"


def test_none_offers_no_calls_but_keeps_tools_in_the_prompt(client, model):
    model.grammar_output = "No tools needed."
    r = client.post("/v1/chat/completions", json=calls_body(tool_choice="none"))
    assert r.get_json()["choices"][0]["message"]["content"] == "No tools needed."
    lark = model.calls[-1]["grammar"]
    assert model.templates[-1]["tools"] == TOOLS
    assert isinstance(lark, Grammar) and lark.kind == "lark"


# A call, its result, and the answer still to come.
ROUND_TRIP = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]


def test_past_calls_without_tools_keep_the_tag_out_of_the_reply(client, model):
    # The fallback writes the history's call as a <tool_call> block; a small model then likes
    # to write one too. With no tools offered, the grammar keeps the reply to plain text.
    model.grammar_output = "It is 18 C in Paris."
    r = client.post("/v1/chat/completions", json=chat_body(messages=ROUND_TRIP))
    message = r.get_json()["choices"][0]["message"]
    assert message["content"] == "It is 18 C in Paris." and "tool_calls" not in message
    grammar = model.calls[-1]["grammar"]
    assert accepts(grammar, "It is 18 C in Paris.") and not accepts(grammar, PARIS)
    assert model.templates[-1]["tools"] is None


def test_no_tools_no_grammar(client, model):
    r = client.post("/v1/chat/completions", json=chat_body(temperature=0))
    assert r.get_json()["choices"][0]["message"]["content"] == SCRIPT
    assert model.calls[-1]["grammar"] is None and model.templates[-1]["tools"] is None


def test_a_repeated_call_ends_the_reply(client, model):
    model.grammar_output = (PARIS + "\n") * 5
    r = client.post("/v1/chat/completions", json=calls_body(tool_choice="required"))
    body = r.get_json()
    assert len(body["choices"][0]["message"]["tool_calls"]) == 1
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    stop = len(PARIS) + 1 + PARIS.index("}}") + 1  # as soon as the repeat's arguments end
    assert body["usage"]["completion_tokens"] == stop


def test_cut_short_call_is_length(client, model):
    model.grammar_output = PARIS
    r = client.post("/v1/chat/completions", json=calls_body(tool_choice="required",
                                                            max_tokens=60))
    choice = r.get_json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_round_trip_messages_render_the_fallback(client, model):
    model.grammar_output = "It is 18 C in Paris."
    r = client.post("/v1/chat/completions", json=calls_body(messages=ROUND_TRIP))
    assert r.get_json()["choices"][0]["message"]["content"] == "It is 18 C in Paris."
    sent = model.templates[-1]["messages"]
    assert sent[1] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                       "content": "18 C"}


# --- streaming --------------------------------------------------------------------------------

def stream_chunks(client, body) -> list[dict]:
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    lines = [line[6:] for line in r.get_data(as_text=True).split("\n\n") if line]
    r.close()  # frees the slot, as a server closing the response does
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_stream_tool_call_deltas(client, model):
    model.grammar_output = PARIS + "\n" + SUM
    chunks = stream_chunks(client, calls_body(tool_choice="required",
                                              stream_options={"include_usage": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert not any(d.get("content") for d in deltas)  # no tag text, no content
    assert deltas[0] == {"role": "assistant", "content": None}  # calls are certain: null
    assert calls[0] == [{"index": 0, "id": calls[0][0]["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]
    assert all(set(c[0]) == {"index", "function"} and set(c[0]["function"]) == {"arguments"}
               for c in calls[1:] if "id" not in c[0])
    assert len(calls) > 4  # the first call's arguments come in pieces
    whole = client.post("/v1/chat/completions", json=calls_body(tool_choice="required"))
    expected = whole.get_json()["choices"][0]["message"]["tool_calls"]
    assert reassemble(calls) == [(c["function"]["name"], c["function"]["arguments"])
                                 for c in expected]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == \
        whole.get_json()["usage"]["completion_tokens"]


def reassemble(deltas) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for entries in deltas:
        for e in entries:
            name, args = calls.setdefault(e["index"], ["", ""])
            calls[e["index"]] = [name + e["function"].get("name", ""),
                                 args + e["function"]["arguments"]]
    return [tuple(calls[i]) for i in sorted(calls)]


def test_stream_auto_text_holds_back_only_a_possible_tag(client, model):
    model.grammar_output = "<tool> tips"
    chunks = stream_chunks(client, calls_body())
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "<tool> tips"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("extra, successor", [
    ({"functions": [{"name": "f"}]}, "tools"),
    ({"function_call": {"name": "f"}}, "tool_choice"),
])
def test_legacy_function_fields_point_to_their_successors(client, extra, successor):
    err = error_of(client.post("/v1/chat/completions", json=chat_body(**extra)), 400)
    assert err["code"] == "unsupported_parameter" and f"'{successor}'" in err["message"]
