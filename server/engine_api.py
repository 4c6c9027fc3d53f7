"""The few engine names the server needs, imported lazily.

The server depends on `engine` only through `load_model`, `GeneratedToken`, the error
classes in `engine.errors` and the constrained-decoding `Grammar` (docs/internals.md).
Importing them here, with stand-ins when the engine package is not importable, keeps
`import server` working on its own (for example in tests that drive the server with a fake
model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

try:  # pragma: no cover - which branch runs depends on the checkout
    from engine.errors import (
        ChatTemplateError,
        ContextOverflowError,
        EngineError,
        ModelNotFoundError,
    )
except ImportError:  # the engine is not there (yet): same names, same hierarchy

    class EngineError(Exception):
        """Base engine error; its message is fit to show a user."""

    class ModelNotFoundError(EngineError):
        pass

    class ContextOverflowError(EngineError):
        pass

    class ChatTemplateError(EngineError):
        pass


try:  # pragma: no cover
    from engine.generate import GeneratedToken
except ImportError:

    @dataclass
    class GeneratedToken:
        """One sampled token, as `Model.generate` yields it."""

        id: int
        text: str
        logprob: float | None = None
        top_logprobs: list[tuple[int, float]] | None = field(default=None)
        finish_reason: str | None = None


try:  # pragma: no cover
    from engine.constrain import JSON_STYLE, Grammar, GrammarError
except ImportError:  # no engine, or one without constrained decoding
    JSON_STYLE = {}  # the engine's whitespace rules for JSON (llguidance's "x-guidance")

    class GrammarError(EngineError):
        """A grammar or JSON schema the engine cannot enforce; `.keyword` names the culprit."""

        def __init__(self, message: str, keyword: str | None = None):
            super().__init__(message)
            self.keyword = keyword

    class Grammar:
        """Stand-in for `engine.constrain.Grammar`: it records what was asked for and
        enforces nothing, so only a fake model (which reads `.kind` and `.spec`) can use it."""

        def __init__(self, kind: str, spec):
            self.kind = kind
            self.spec = spec

        @classmethod
        def json_schema(cls, schema: dict, strict: bool = True, where: str = "") -> Grammar:
            return cls("json_schema", schema)

        @classmethod
        def json_object(cls, where: str = "") -> Grammar:
            return cls("json_object", None)

        @classmethod
        def lark(cls, text: str, where: str = "") -> Grammar:
            return cls("lark", text)


def load_model(name_or_path: str, backend: str = "fast"):
    """`engine.load_model`, imported on first use so the server starts without the engine."""
    try:
        from engine import load_model as _load_model
    except ImportError as e:
        raise EngineError(f"the numbalm engine is not importable: {e}") from e
    return _load_model(name_or_path, backend=backend)


__all__ = [
    "ChatTemplateError",
    "ContextOverflowError",
    "EngineError",
    "GeneratedToken",
    "Grammar",
    "GrammarError",
    "ModelNotFoundError",
    "load_model",
]
