"""Structured output: grammars are validated up front, and every sample the real SmolLM2 draws
under one is valid: JSON that parses and validates against its schema.

The validity tests sample at temperature 1.0 with top-k, top-p and min-p all off (top_k=0,
top_p=1.0, min_p=0.0: the model's full distribution), so the grammar's mask is the only thing
keeping the output in shape. 10 seeds per schema by default; `-m slow` runs 50.

Strings in the schemas carry a maxLength (and numbers bounds): a 135M model sampled that way
sometimes writes a string that never ends (measured: 1 in 50 under an unbounded "city"). That
output is still a valid JSON prefix, but max_tokens would cut it, and these tests want every
sample complete.
"""

from __future__ import annotations

import json
import threading

import jsonschema
import numpy as np
import pytest

from engine.constrain import Grammar, GrammarError, ll_tokenizer
from engine.errors import EngineError

FULL_DISTRIBUTION = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
MAX_TOKENS = 400  # never reached by the samples below (measured: longest ~150 tokens)

POINT = {"type": "object",
         "properties": {"x": {"type": "integer", "minimum": -1000, "maximum": 1000},
                        "y": {"type": "integer", "minimum": -1000, "maximum": 1000}},
         "required": ["x", "y"], "additionalProperties": False}

# name: (schema, an example value shown in the prompt)
SCHEMAS = {
    "nested": ({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {"type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 40},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    }, {"name": "Ada Lovelace", "address": {"city": "London", "zip": "12345"}}),
    "enums": ({
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
                       "in_stock": {"type": "boolean"}},
        "required": ["color", "size", "in_stock"], "additionalProperties": False,
    }, {"color": "green", "size": "M", "in_stock": True}),
    "arrays": ({
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20},
                     "minItems": 2, "maxItems": 4},
            "scores": {"type": "array", "minItems": 1, "maxItems": 3,
                       "items": {"type": "integer", "minimum": 0, "maximum": 100}},
        },
        "required": ["tags", "scores"], "additionalProperties": False,
    }, {"tags": ["red", "small"], "scores": [7, 42]}),
    "numbers": ({
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "temperature": {"type": "number", "minimum": -50, "maximum": 60.5},
                       "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
        "required": ["age", "temperature", "ratio"], "additionalProperties": False,
    }, {"age": 34, "temperature": 21.5, "ratio": 0.25}),
    "optional": ({
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 60},
                       "subtitle": {"type": "string", "maxLength": 60},
                       "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                       "draft": {"type": "boolean"}},
        "required": ["title"], "additionalProperties": False,
    }, {"title": "Dune", "year": 1965}),
    "refs": ({
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"},
                       "via": {"type": "array", "items": {"$ref": "#/$defs/point"},
                               "maxItems": 3}},
        "required": ["start", "end"], "additionalProperties": False,
    }, {"start": {"x": 0, "y": 0}, "end": {"x": 3, "y": 4}}),
}


def chat_ids(model, schema: dict | None, example: dict) -> list[int]:
    if schema is None:
        ask = "Reply with a JSON object giving the title and author of a famous novel."
    else:
        ask = f"Reply with only a JSON object that matches this JSON schema: {json.dumps(schema)}"
    content = f"{ask} For example: {json.dumps(example)}"
    return model.chat_prompt_ids([{"role": "user", "content": content}])


def sample_text(model, ids, grammar, seed, **opts) -> tuple[str, list]:
    steps = list(model.generate(ids, max_tokens=MAX_TOKENS, seed=seed, grammar=grammar,
                                **(opts or FULL_DISTRIBUTION)))
    return "".join(s.text for s in steps), steps


# -- validation at construction ---------------------------------------------------------------

@pytest.mark.parametrize("keyword, schema", [
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    ("contains", {"type": "array", "contains": {"type": "integer"}}),
    ("not", {"not": {"type": "string"}}),
    ("if", {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^a"}}),
    ("unevaluatedProperties", {"type": "object", "unevaluatedProperties": False}),
])
def test_unsupported_keywords_are_named_errors(keyword, schema):
    with pytest.raises(GrammarError) as err:
        Grammar.json_schema(schema, where="response_format.json_schema")
    assert err.value.keyword == keyword
    assert str(err.value) == (f"response_format.json_schema: keyword '{keyword}' "
                              f"is not supported")
    assert isinstance(err.value, EngineError)


def test_a_schema_cannot_make_itself_lenient():
    with pytest.raises(GrammarError, match="uniqueItems"):
        Grammar.json_schema({"type": "array", "uniqueItems": True,
                             "x-guidance": {"lenient": True}})


def test_not_strict_drops_unsupported_keywords_and_says_so():
    grammar = Grammar.json_schema({"type": "array", "uniqueItems": True}, strict=False)
    assert any("uniqueItems" in w for w in grammar.warnings)


@pytest.mark.parametrize("schema, fragment", [
    ({"$ref": "#/$defs/missing"}, "/$defs/missing"),
    ({"type": "strnig"}, "strnig"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"$ref": "https://example.com/schema.json"}, "example.com"),
])
def test_broken_schemas_are_errors(schema, fragment):
    with pytest.raises(GrammarError, match="json_schema: .*" + fragment.replace("$", r"\$")):
        Grammar.json_schema(schema)


@pytest.mark.parametrize("schema", [[1, 2], "object", None, False])
def test_a_schema_must_be_an_object(schema):
    with pytest.raises(GrammarError, match="json_schema"):
        Grammar.json_schema(schema)


def test_supported_keywords_pass():
    for schema, _ in SCHEMAS.values():
        assert Grammar.json_schema(schema).warnings == ()
    Grammar.json_schema({"type": "object", "patternProperties": {"^x": {"type": "string"}},
                         "minProperties": 1, "title": "t", "description": "d"})


def test_lark_is_validated():
    Grammar.lark('start: "yes" | "no"')
    Grammar.lark('start: "call " %json{"type": "object", "properties": {"a": {"type": "integer"}}}')
    with pytest.raises(GrammarError, match="grammar: .*unknown name"):
        Grammar.lark("start: foo")
    with pytest.raises(GrammarError):
        Grammar.lark("   ")


# -- the vocabulary as llguidance sees it ---------------------------------------------------

def test_ll_tokenizer_is_built_once_from_our_vocabulary(smollm2_fast):
    tok = smollm2_fast.tokenizer
    llt = ll_tokenizer(tok)
    assert ll_tokenizer(tok) is llt
    assert llt.vocab_size == tok.n_vocab
    assert set(llt.eos_tokens) == set(tok.eot_ids)
    im_start = tok.encode("<|im_start|>", special=True)[0]
    assert llt.is_special_token(im_start) and not llt.is_special_token(tok.encode("a")[0])
    text = 'He said: "<|im_end|> is not a token here" {1, 2}'
    assert llt.tokenize_str(text) == tok.encode(text, add_bos=False)


def test_caches_let_a_tokenizer_go(smollm2_fast):
    import gc
    import weakref

    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(smollm2_fast.metadata)
    grammar = Grammar.json_object()
    grammar.start(tok)
    assert ll_tokenizer(tok).tokenize_str("{}") == tok.encode("{}")
    gone = weakref.ref(tok)
    del tok
    gc.collect()
    assert gone() is None


def test_special_token_names_are_checked_against_the_model(smollm2_fast):
    smollm2_fast.compile_grammar(Grammar.lark('start: "yes" <|im_end|>'))
    with pytest.raises(GrammarError):
        smollm2_fast.compile_grammar(Grammar.lark('start: "yes" <|no_such_token|>'))


# -- generation under a grammar -------------------------------------------------------------

def test_greedy_json_stops_when_the_grammar_is_complete(smollm2_fast):
    schema, example = SCHEMAS["nested"]
    ids = chat_ids(smollm2_fast, schema, example)
    text, steps = sample_text(smollm2_fast, ids, Grammar.json_schema(schema), 0, temperature=0.0)
    jsonschema.validate(json.loads(text), schema)
    assert steps[-1].finish_reason == "stop"
    assert all(s.finish_reason is None for s in steps[:-1])
    assert steps[-1].id not in smollm2_fast.tokenizer.eot_ids  # ended by the grammar, not EOS
    assert text == smollm2_fast.tokenizer.decode([s.id for s in steps])


def test_grammar_must_be_a_grammar(smollm2_fast):
    with pytest.raises(EngineError, match="Grammar"):
        smollm2_fast.generate([1, 2], grammar={"type": "object"})


def test_max_tokens_cuts_a_grammar_short_with_length(smollm2_fast):
    schema, example = SCHEMAS["nested"]
    ids = chat_ids(smollm2_fast, schema, example)
    full, _ = sample_text(smollm2_fast, ids, Grammar.json_schema(schema), 0, temperature=0.0)
    steps = list(smollm2_fast.generate(ids, max_tokens=4, temperature=0.0,
                                       grammar=Grammar.json_schema(schema)))
    assert len(steps) == 4 and steps[-1].finish_reason == "length"
    assert full.startswith("".join(s.text for s in steps))


def test_end_of_turn_waits_for_the_grammar(smollm2_fast):
    # The bias begs for <|im_end|> at every step; the mask only allows it once the object is
    # complete, and by then the grammar has already ended the generation.
    ids = chat_ids(smollm2_fast, None, {"title": "Dune", "author": "Frank Herbert"})
    bias = {t: 100.0 for t in smollm2_fast.tokenizer.eot_ids}
    text, steps = sample_text(smollm2_fast, ids, Grammar.json_object(), 0, temperature=0.0,
                              logit_bias=bias)
    assert isinstance(json.loads(text), dict) and steps[-1].finish_reason == "stop"


def test_end_of_turn_is_allowed_once_the_grammar_accepts(smollm2_fast):
    # "yes" followed by optional "!"s: complete only at end of turn, which the bias then picks.
    eot = sorted(smollm2_fast.tokenizer.eot_ids)
    ids = smollm2_fast.chat_prompt_ids([{"role": "user", "content": "Say yes."}])
    _, steps = sample_text(smollm2_fast, ids, Grammar.lark('start: "yes" "!"*'), 0,
                           temperature=0.0, logit_bias={t: 100.0 for t in eot})
    assert "".join(s.text for s in steps) == "yes"
    assert steps[-1].id in eot and steps[-1].finish_reason == "stop"


def test_logprobs_are_for_the_masked_distribution(smollm2_fast):
    ids = smollm2_fast.chat_prompt_ids([{"role": "user", "content": "Pick a colour."}])
    grammar = Grammar.json_schema({"enum": ["red", "green", "blue"]})
    steps = list(smollm2_fast.generate(ids, max_tokens=10, temperature=0.0, grammar=grammar,
                                       logprobs=20))
    first = steps[0]
    tok = smollm2_fast.tokenizer
    listed = [t for t, _ in first.top_logprobs]
    assert all('"red"'.startswith(p) or '"green"'.startswith(p) or '"blue"'.startswith(p)
               for p in (tok.decode([t]) for t in listed))
    assert sum(np.exp(lp) for _, lp in first.top_logprobs) == pytest.approx(1.0, abs=1e-6)
    assert json.loads("".join(s.text for s in steps)) in ("red", "green", "blue")


def test_stop_sequences_still_apply(smollm2_fast):
    schema, example = SCHEMAS["enums"]
    ids = chat_ids(smollm2_fast, schema, example)
    text, steps = sample_text(smollm2_fast, ids, Grammar.json_schema(schema), 0,
                              temperature=0.0, stop=['"size"'])
    assert steps[-1].finish_reason == "stop" and '"size"' not in text and text.startswith("{")


def test_one_grammar_shared_by_concurrent_generations(smollm2_fast):
    schema, example = SCHEMAS["refs"]
    grammar = Grammar.json_schema(schema)
    ids = chat_ids(smollm2_fast, schema, example)
    expected = [sample_text(smollm2_fast, ids, grammar, seed)[0] for seed in (1, 2)]
    results = {}

    def run(seed):
        results[seed] = sample_text(smollm2_fast, ids, grammar, seed)[0]

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[1], results[2]] == expected


# -- every sample valid ------------------------------------------------------------------------

CASES = [*SCHEMAS, "json_object"]


def check_samples(model, name: str, n: int) -> None:
    """n seeded samples at the full distribution: each must end by itself and be valid.

    json_object is the exception: its strings are unbounded, and about 1 sample in 10 is a
    string the model never closes (a valid JSON prefix that max_tokens cuts, as OpenAI's
    json_object mode can). Those are checked to be prefixes the grammar accepts, and at
    most 10 % may end that way.
    """
    schema, example = SCHEMAS.get(name, (None, {"title": "Dune", "author": "Frank Herbert"}))
    grammar = Grammar.json_object() if schema is None else Grammar.json_schema(schema)
    ids = chat_ids(model, schema, example)
    bad, cut = [], 0
    for seed in range(n):
        text, steps = sample_text(model, ids, grammar, seed)
        try:
            if schema is None and steps[-1].finish_reason == "length":
                constraint = grammar.start(model.tokenizer)
                for step in steps:
                    constraint.consume(step.id)  # raises if the grammar rejects a token
                cut += 1
                continue
            assert steps[-1].finish_reason == "stop", f"finish_reason {steps[-1].finish_reason}"
            value = json.loads(text)
            if schema is None:
                assert isinstance(value, dict), "not an object"
            else:
                jsonschema.validate(value, schema)
        except (AssertionError, ValueError, EngineError, jsonschema.ValidationError) as e:
            bad.append(f"seed {seed}: {str(e)[:80]} in {text[:120]!r}")
    print(f"{name}: {n - len(bad) - cut}/{n} complete and valid, {cut} cut by max_tokens")
    assert not bad, f"{len(bad)}/{n} invalid:\n" + "\n".join(bad)
    assert cut <= n // 10, f"{cut}/{n} json_object samples never ended"


@pytest.mark.parametrize("name", CASES)
def test_samples_are_valid(smollm2_fast, name):
    check_samples(smollm2_fast, name, n=10)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_fifty_samples_are_valid(smollm2_fast, name, request):
    if "slow" not in request.config.getoption("markexpr", ""):
        pytest.skip("50 samples per schema take minutes: run with -m slow")
    check_samples(smollm2_fast, name, n=50)


def test_gemma3_sentencepiece_vocabulary(gemma3_fast):
    # 262k tokens, SentencePiece, thousands of <unusedN> control tokens that must stay unused.
    tok = gemma3_fast.tokenizer
    llt = ll_tokenizer(tok)
    assert llt.vocab_size == tok.n_vocab and set(llt.eos_tokens) == set(tok.eot_ids)
    assert llt.tokenize_str(" a {\"b\": 1}") == tok.encode(" a {\"b\": 1}", add_bos=False)
    schema, _ = SCHEMAS["enums"]
    ids = tok.encode('A product as JSON with color, size and in_stock: ')
    text, steps = sample_text(gemma3_fast, ids, Grammar.json_schema(schema), 0, temperature=0.0)
    jsonschema.validate(json.loads(text), schema)
    assert steps[-1].finish_reason == "stop"
