"""A structured reply always parses, even when max_tokens cuts it (the landing,
engine/landing.py): the real SmolLM2 on waitress, through the official openai client, at
temperature 1.0 with max_tokens just above the smallest reply the grammar allows.

10 seeds per case by default, 50 with `-m slow`. The budgets run from one token above the
minimum to eight above, so most replies are landed (finish_reason "length") and a few end
on their own ("stop" / "tool_calls")."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from engine import load_model
from engine.constrain import Grammar
from server import ModelPool, create_app
from server.serving.grammar import ToolSpec, build_grammar

MODEL = "smollm2-135m-instruct"
CLIENTS = 8  # requests at once: the scheduler batches them, each with its own grammar

NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "genre": {"enum": ["novel", "poem", "play"]},
        "author": {"type": "object",
                   "properties": {"name": {"type": "string"},
                                  "born": {"type": "integer", "minimum": 1000}},
                   "required": ["name", "born"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    },
    "required": ["title", "genre", "author", "tags"], "additionalProperties": False,
}
NOTE_TOOL = {"type": "function", "function": {
    "name": "save_note", "description": "Save a note",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                   "required": ["text"], "additionalProperties": False}}}
ASK_BOOK = [{"role": "user", "content": "Describe a famous novel as a JSON object: its title, "
                                         "genre, author (name, year born) and some tags."}]
ASK_NOTE = [{"role": "user", "content": "Save a long note about the history of cats."}]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def oai(smollm2):
    from server.http.wsgi import ServerThread

    pool = ModelPool.from_models([smollm2], warmup=True)
    app = create_app({"max_concurrent": CLIENTS, "queue_size": 64}, pool=pool)
    with ServerThread(app) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                            timeout=600)


def minimum(smollm2, grammar: Grammar) -> int:
    """The fewest tokens of a reply the grammar allows, as the engine counts them."""
    return grammar.start(smollm2.tokenizer).ending.length


@pytest.fixture(params=[10, pytest.param(50, marks=pytest.mark.slow)], ids=["10", "50"])
def seeds(request) -> range:
    if request.param == 50 and "slow" not in request.config.getoption("markexpr", ""):
        pytest.skip("50 samples per case take minutes: run with -m slow")
    return range(request.param)


def check_replies(create, parse, least: int, n: range) -> None:
    """Each seed: a reply with max_tokens = least + 1 .. least + 8 must parse (CLIENTS
    requests at a time)."""

    def one(seed: int) -> tuple[str, str | None]:
        budget = least + 1 + seed % 8
        r = create(seed=seed, max_tokens=budget)
        choice = r.choices[0]
        try:
            assert r.usage.completion_tokens <= budget
            parse(choice.message)
        except (ValueError, TypeError, AssertionError, jsonschema.ValidationError) as e:
            return choice.finish_reason, f"seed {seed}, max_tokens {budget}: {e} in {choice}"
        return choice.finish_reason, None

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(one, n))
    reasons = [reason for reason, _ in results]
    bad = [problem for _, problem in results if problem]
    print(f"{len(n) - len(bad)}/{len(n)} parse; finish_reason: "
          f"{ {r: reasons.count(r) for r in set(reasons)} }")
    assert not bad, "\n".join(bad)
    assert "length" in reasons  # the budget forced landings, and says so


def test_json_object_always_parses(oai, smollm2, seeds):
    least = minimum(smollm2, Grammar.json_object())
    assert least == 1  # {}

    def create(**kw):
        return oai.chat.completions.create(model=MODEL, messages=ASK_BOOK, temperature=1.0,
                                           response_format={"type": "json_object"}, **kw)

    check_replies(create, lambda m: json.loads(m.content).keys(), least, seeds)


def test_json_schema_always_parses_and_validates(oai, smollm2, seeds):
    least = minimum(smollm2, Grammar.json_schema(NESTED))
    smallest = '{"title":"","genre":"play","author":{"name":"","born":1000},"tags":[""]}'
    # the engine's ending is short, not always the shortest: it takes "novel", the first
    # allowed byte's value, where "play" is a byte shorter
    assert least <= len(smollm2.tokenizer.encode(smallest)) + 1

    def create(**kw):
        return oai.chat.completions.create(
            model=MODEL, messages=ASK_BOOK, temperature=1.0,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "book", "schema": NESTED}}, **kw)

    check_replies(create, lambda m: jsonschema.validate(json.loads(m.content), NESTED),
                  least, seeds)


def test_a_tool_call_with_an_unbounded_string_always_parses(oai, smollm2, seeds):
    least = minimum(smollm2, build_grammar("text", None, ToolSpec([NOTE_TOOL], "required")))

    def create(**kw):
        return oai.chat.completions.create(model=MODEL, messages=ASK_NOTE, temperature=1.0,
                                           tools=[NOTE_TOOL], tool_choice="required", **kw)

    def parse(message):
        assert message.content is None and message.tool_calls, "no call"
        for call in message.tool_calls:
            assert call.function.name == "save_note"
            assert isinstance(json.loads(call.function.arguments)["text"], str)

    check_replies(create, parse, least, seeds)
