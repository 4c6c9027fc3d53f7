"""Errors the engine raises for a user's mistake.

Each message is fit to show a user as it is: it names the file, model or value at fault and
what is wrong with it. The CLI prints it on one line; the server maps it to an HTTP status.
"""


class EngineError(Exception):
    """Base class: a problem with the user's input, not a bug in numbalm."""


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
