"""Landing (engine/landing.py): the distance to the end of a grammar, and a reply that always
finishes its grammar within max_tokens. On a tiny vocabulary here, so every case is exact;
the real SmolLM2 is in test_constrain.py and tests/server/test_structured.py."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from engine.constrain import Grammar, clear_token, set_token
from engine.generate import Decoding
from engine.landing import JsonStrings, Spelling
from engine.sampling import SamplingParams
from engine.tokenizer import CONTROL, NORMAL

# Every printable ASCII byte and the line break, a few pieces a BPE vocabulary would merge,
# and an end-of-text token (id 0).
PIECES = ['"}', '}}', ']}', '"]', '{}', '[]', '":', '", "', '": "', "true", "null", "tool",
          "<tool_call>", "</tool_call>", " cat", " the", "ing"]
WORDS = ["<|end|>", "\n", *map(chr, range(0x20, 0x7F)), *PIECES]


class TinyDecoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def push(self, token: int) -> str:
        return self.tokenizer.tokens[token]

    def flush(self) -> str:
        return ""


class TinyTokenizer:
    """What the grammar and the decoder need of a tokenizer, over WORDS."""

    eos_id, bos_id = 0, None
    eot_ids = frozenset({0})

    def __init__(self):
        self.tokens = WORDS
        self.n_vocab = len(WORDS)
        self.token_types = [CONTROL] + [NORMAL] * (len(WORDS) - 1)
        self.ids = {w: i for i, w in enumerate(WORDS)}

    def is_control(self, i: int) -> bool:
        return self.token_types[i] == CONTROL

    def token_bytes(self, i: int) -> bytes:
        return b"" if i == 0 else WORDS[i].encode()

    def encode(self, text: str, add_bos=None, special=False) -> list[int]:
        out, i = [], 0
        while i < len(text):  # longest match
            word = max((w for w in WORDS[1:] if text.startswith(w, i)), key=len)
            out.append(self.ids[word])
            i += len(word)
        return out

    def decoder(self):
        return TinyDecoder(self)


TOK = TinyTokenizer()

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "size": {"enum": ["small", "big"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "where": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 3}},
                  "required": ["x"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "size", "tags", "where", "ok"], "additionalProperties": False,
}
TOOL_GRAMMAR = ('start: "<tool_call>\\n" %json {"type": "object", "properties": {"text": '
                '{"type": "string"}}, "required": ["text"]} "\\n</tool_call>"')


def after(grammar: Grammar, text: str):
    constraint = grammar.start(TOK)
    for token in TOK.encode(text):
        constraint.consume(token)
    return constraint


# -- spelling and strings ----------------------------------------------------------------------

def test_spelling_counts_the_fewest_tokens_of_every_suffix():
    spell = Spelling(TOK, {0})
    ending = spell.spell(b'"}]}')
    assert ending.fewest == (2, 2, 1, 1, 0)  # "} + ]} ; }] is no token, so } + ]} from 1
    assert [TOK.tokens[t] for t in spell.tokens(ending)] == ['"}', ']}']
    assert ending.after(2) == spell.spell(b"]}")
    # a start of the ending that leaves its rest spellable in the tokens left
    assert {TOK.tokens[t] for t in spell.first_tokens(ending, 2)} == {'"}'}
    assert {TOK.tokens[t] for t in spell.first_tokens(ending, 3)} == {'"', '"}'}


@pytest.mark.parametrize("text, inside", [
    ('{"a', True), ('{"a": "b"', False), ('{"a\\"', True), ('{"a\\\\"', False),
    ('"\\\\\\"', True), ("[1, 2", False)])
def test_json_strings_follow_quotes_and_escapes(text, inside):
    strings = JsonStrings()
    strings.feed(text.encode())
    assert strings.inside is inside


def test_mask_bits():
    mask = np.zeros(3, dtype=np.int32)
    for token in (0, 31, 33, 95):
        set_token(mask, token)
    assert mask.view(np.uint32).tolist() == [1 | 1 << 31, 1 << 1, 1 << 31]
    clear_token(mask, 31)
    clear_token(mask, 95)
    assert mask.view(np.uint32).tolist() == [1, 2, 0]


# -- the distance --------------------------------------------------------------------------------

@pytest.mark.parametrize("grammar, text, ending, length", [
    (Grammar.json_object(), "", b"{}", 1),
    (Grammar.json_object(), '{"title": "Dune', b'"}', 1),
    (Grammar.json_object(), '{"a": [1, {"b": "x\\', b'""}]}', 3),  # an escaped quote first
    (Grammar.json_object(), '{"a": 1', b"}", 1),
    (Grammar.json_object(), '{"a":', b"1}", 2),
    (Grammar.json_object(), '{"a": 1}', b"", 0),
    (Grammar.json_schema({"type": "array", "items": {"type": "integer"}, "minItems": 2}),
     "[", b"1,1]", 4),
    # short, not always the shortest: 1 then 1 for "x" (minimum 3), where 3 would do
    (Grammar.json_schema(NESTED), '{"name": "cat", "size": "',
     b'big","tags":[""],"where":{"x":11},"ok":true}', 36),
    (Grammar.lark(TOOL_GRAMMAR), "", b'<tool_call>\n{"text":""}\n</tool_call>', 13),
    (Grammar.lark(TOOL_GRAMMAR), '<tool_call>\n{"text": "the cat', b'"}\n</tool_call>', 3),
    (Grammar.lark('start: "yes" "!"*'), "ye", b"s", 1),
])
def test_the_ending_and_its_length_in_tokens(grammar, text, ending, length):
    constraint = after(grammar, text)
    assert constraint.ending.data == ending
    assert constraint.ending.length == length


@pytest.mark.parametrize("grammar", [Grammar.json_object(), Grammar.json_schema(NESTED),
                                     Grammar.lark(TOOL_GRAMMAR)])
def test_following_the_ending_finishes_the_grammar_one_token_closer_each_time(grammar):
    constraint = grammar.start(TOK)
    spell = Spelling(TOK, {0})
    text = b""
    while constraint.ending.length:
        distance = constraint.ending.length
        token = spell.tokens(constraint.ending)[0]
        assert constraint.ending_after(token).length == distance - 1
        constraint.consume(token)
        text += TOK.token_bytes(token)
        assert constraint.ending.length == distance - 1
    assert constraint.matcher.is_accepting()
    if grammar.kind == "json_schema":
        jsonschema.validate(json.loads(text), NESTED)


def test_a_pattern_ends_without_running_in_circles():
    # the walk takes the next allowed byte after the one before, so a+ does not go on forever
    grammar = Grammar.json_schema({"type": "string", "pattern": "^a+b$"})
    assert after(grammar, '"a').ending.data == b'b"'


def test_a_grammar_without_ending_is_searched_a_few_times_only(monkeypatch):
    from engine import landing

    searches = []
    find = landing.find_ending
    monkeypatch.setattr(landing, "find_ending", lambda *a: searches.append(1) or find(*a))
    constraint = after(Grammar.lark('start: /[a-z]+/ "é"'), "abcdefghijkl")  # é: no token
    assert constraint.ending is None
    assert len(searches) == landing.MAX_MISSES  # then it stops looking


def test_no_ending_when_the_vocabulary_cannot_spell_it():
    constraint = Grammar.lark('start: "a" "é"').start(TOK)  # no token holds é's bytes
    assert constraint.ending is None


def test_ending_after_leaves_the_state_as_it_was():
    constraint = after(Grammar.json_object(), '{"a": "b')
    before = constraint.ending
    assert constraint.ending_after(TOK.ids['"']).data == b"}"
    assert constraint.ending_after(TOK.ids["<|end|>"]).length == 0
    assert constraint.ending == before and not constraint.matcher.is_accepting()


# -- the landing ---------------------------------------------------------------------------------

def decode(grammar, max_tokens: int, seed: int, favour=tuple("abc "),
           shun=("<|end|>",)) -> tuple[str, str]:
    """A reply from logits that want to write `favour`'s tokens forever: random, with those
    raised and `shun`'s lowered. Returns (text, finish_reason)."""
    rng = np.random.default_rng(seed)
    decoding = Decoding(TOK, [1], n_ctx=4096, max_tokens=max_tokens, grammar=grammar,
                        params=SamplingParams(temperature=1.0, top_k=0, top_p=1.0,
                                              min_p=0.0, seed=seed))
    raised = [TOK.ids[c] for c in favour]
    lowered = [TOK.ids[c] for c in shun]
    text = ""
    while True:
        logits = rng.standard_normal(TOK.n_vocab).astype(np.float32)
        logits[raised] += 4.0
        logits[lowered] -= 8.0
        step = decoding.step(logits)
        text += step.text
        if step.finish_reason:
            return text, step.finish_reason


@pytest.mark.parametrize("grammar, check", [
    (Grammar.json_object(), lambda text: isinstance(json.loads(text), dict)),
    (Grammar.json_schema(NESTED), lambda text: jsonschema.validate(json.loads(text), NESTED)),
    (Grammar.lark(TOOL_GRAMMAR),
     lambda text: json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))),
])
def test_every_reply_finishes_its_grammar_within_max_tokens(grammar, check):
    minimum = grammar.start(TOK).ending.length
    landed = 0
    for extra in (0, 1, 2, 5, 12):
        for seed in range(12):
            text, reason = decode(grammar, minimum + extra, seed)
            check(text)  # parses (and validates)
            assert len(TOK.encode(text)) <= minimum + extra
            landed += reason == "length"
    assert landed > 0


def test_a_reply_the_budget_did_not_shape_stops():
    # A generous budget: the model closes the object itself and nothing was narrowed.
    text, reason = decode(Grammar.json_object(), 200, 0, favour=["{}"])
    assert text == "{}" and reason == "stop"


def test_a_landed_reply_says_length():
    text, reason = decode(Grammar.json_object(), 6, 0, shun=["<|end|>", "{}"])
    assert isinstance(json.loads(text), dict)
    assert reason == "length"


def test_without_an_ending_that_fits_nothing_changes():
    grammar = Grammar.json_schema(NESTED)
    minimum = grammar.start(TOK).ending.length
    text, reason = decode(grammar, minimum - 1, 0)
    assert reason == "length" and len(TOK.encode(text)) == minimum - 1


# -- on the real SmolLM2: the batched scheduler, each sequence with its own grammar ----------

def test_sequences_in_one_batch_land_each_on_their_own(smollm2_fast):
    asks = ["A JSON object about a cat.", "Describe Paris as JSON.", "A book, as a JSON object."]
    prompts = [smollm2_fast.chat_prompt_ids([{"role": "user", "content": a}]) for a in asks]
    grammar = Grammar.json_object()
    streams = [smollm2_fast.generate(ids, max_tokens=budget, grammar=grammar, seed=1,
                                     temperature=1.0)
               for ids, budget in zip(prompts, (3, 5, 8))]  # all running at once
    streams += smollm2_fast.submit(prompts[0], 3, max_tokens=6, grammar=grammar, seed=7,
                                   temperature=1.0)  # n = 3 choices after one prompt
    for stream, budget in zip(streams, (3, 5, 8, 6, 6, 6)):
        steps = list(stream)
        assert len(steps) <= budget
        assert isinstance(json.loads("".join(s.text for s in steps)), dict)
