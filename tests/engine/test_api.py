"""engine.api: the LLM and the server's test double both implement the one documented surface."""

from __future__ import annotations

import inspect

import pytest

from engine.api import LanguageModel, TextTokenizer
from tests.server.fake_engine import FakeModel


def members(protocol) -> dict[str, object]:
    """The protocol's attributes (annotations) and methods, by name."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
    return {n: getattr(protocol, n, None) for n in sorted(names)}


def check(obj, protocol) -> None:
    assert isinstance(obj, protocol)
    for name, spec in members(protocol).items():
        assert hasattr(obj, name), f"{type(obj).__name__} lacks {name}"
        if callable(spec):
            named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            wanted = [n for n, p in inspect.signature(spec).parameters.items()
                      if n != "self" and p.kind in named]
            params = inspect.signature(getattr(obj, name)).parameters
            missing = [n for n in wanted if n not in params]
            assert not missing, f"{type(obj).__name__}.{name} lacks parameters {missing}"


@pytest.mark.parametrize("make", [lambda: FakeModel()], ids=["fake"])
def test_the_fake_implements_the_protocol(make):
    model = make()
    check(model, LanguageModel)
    check(model.tokenizer, TextTokenizer)


def test_the_llm_implements_the_protocol(smollm2_fast):
    check(smollm2_fast, LanguageModel)
    check(smollm2_fast.tokenizer, TextTokenizer)
    assert smollm2_fast.backend_name == "fast"


def test_the_protocol_lists_what_the_docs_promise():
    names = set(members(LanguageModel))
    assert {"generate", "logits", "embed", "chat_prompt_ids", "compile_grammar",
            "capabilities", "tokenizer", "backend_name"} <= names
