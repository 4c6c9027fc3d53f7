"""Errors the engine raises for a user's mistake.

Each message is fit to show a user as it is: it names the file, model or value at fault and
what is wrong with it. The CLI prints it on one line; the server maps it to an HTTP status.
"""

import re

# Characters that can break or forge a log line or a terminal: C0 and C1 controls (newline,
# carriage return, escape sequences), DEL, the Unicode line/paragraph separators and the bidi
# overrides ("Trojan source"), and lone surrogates (which no stream can encode). Text from a
# model file or a client may hold any of them.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                       "\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def clean_text(text: str) -> str:
    r"""`text` with every control character written as an escape (`\n`, `\x1b`, `\u202e`):
    safe to put in one log line or an error message."""
    if not _CONTROLS.search(text):
        return text
    return _CONTROLS.sub(_escape, text)


def _escape(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


class EngineError(Exception):
    """Base class: a problem with the user's input, not a bug in numbalm. Its message is one
    line: control characters (from a file name, a model's metadata, a client) are escaped."""

    def __init__(self, *args):
        super().__init__(*(clean_text(a) if isinstance(a, str) else a for a in args))


class GGUFError(EngineError):
    """A file is not a usable GGUF model (truncated, corrupt, unsupported, incomplete)."""


class ModelNotFoundError(EngineError):
    """No model by that id, alias or path."""


class RegistryError(EngineError):
    """The model cache or a download went wrong (bad URL, checksum mismatch, lost connection)."""


class ContextOverflowError(EngineError):
    """A prompt (plus the tokens asked for) does not fit the model's context window."""


class ChatTemplateError(EngineError):
    """The chat template failed to render these messages."""


class TokenizerError(EngineError):
    """The tokenizer metadata is unusable or an input cannot be tokenized."""


class TokenIdError(EngineError):
    """A token id outside the model's vocabulary."""


class CapabilityError(EngineError):
    """The model cannot do what was asked (say, generate text with an embedding-only model)."""


class TraceError(EngineError):
    """A trace the engine cannot make as asked (an option out of range, or a trace too big to
    return); `.option` names the option to change."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


class TraceTooLargeError(TraceError):
    """A trace over the size bound (engine.trace.MAX_TRACE_TOKENS, MAX_ATTENTION_WEIGHTS)."""
