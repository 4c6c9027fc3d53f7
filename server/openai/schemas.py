"""OpenAI request bodies, declared once: they validate requests and write `/openapi.json`.

What JSON alone can say is said here (types, ranges, enums, required fields, array sizes);
`server.openai.requests` adds what depends on several fields or on the server's settings
(`max_tokens` against the cap, `n` against `--max-n`, a tool message's `tool_call_id` naming
an earlier call, ...).
"""

from __future__ import annotations

from server.http.schema import (
    INT64,
    Array,
    Boolean,
    Free,
    Integer,
    Number,
    Object,
    OneOf,
    String,
)

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 128
NAME = r"^[A-Za-z0-9_-]{1,64}$"
NAME_TEXT = "1-64 letters, digits, '_' or '-'"
INT32_MAX = 2**31 - 1

MODEL = String(description="A served model's id or alias; default: the first served model.")

STOP = OneOf(options=(String(), Array(items=String(nullable=False), max_items=MAX_STOP)),
             expected="a string or an array of strings",
             description=f"Up to {MAX_STOP} sequences that end the reply (not included).")

# --- sampling: the engine's options, the same on every route that generates ----------------
SAMPLING = {
    "temperature": Number(0, 2, description="0: greedy. Default 0.8."),
    "top_p": Number(0, 1, description="Nucleus sampling. Default 0.95."),
    "top_k": Integer(0, INT32_MAX, description="Keep the k most likely tokens; 0: off. "
                     "Default 40."),
    "min_p": Number(0, 1, description="Drop tokens below min_p x the top probability. "
                    "Default 0.05."),
    "seed": Integer(*INT64, description="Reproducible sampling."),
    "stop": STOP,
    "presence_penalty": Number(-2, 2, default=0.0),
    "frequency_penalty": Number(-2, 2, default=0.0),
    "repetition_penalty": Number(0.01, 10, default=1.0,
                                 description="llama.cpp's repeat penalty; 1: off."),
    "logit_bias": Object(values=Number(-100, 100, nullable=False),
                         description="Token id (as a string) -> bias added to its logit."),
}
MAX_TOKENS = {
    "max_tokens": Integer(1, INT64[1], description="Tokens to generate at most; default: "
                          "up to the server's cap or the end of the context."),
    "max_completion_tokens": Integer(1, INT64[1], description="The newer name of max_tokens."),
}
STREAM = {
    "stream": Boolean(default=False, description="Answer with server-sent events."),
    "stream_options": Object({"include_usage": Boolean(default=False)},
                             description="With stream: a last chunk with usage."),
}

# --- structured output -------------------------------------------------------------------
JSON_SCHEMA = Free(description="A JSON schema; the grammar enforces it while generating.")
RESPONSE_FORMAT = Object({
    "type": String(enum=("text", "json_object", "json_schema")),
    "json_schema": Object({
        "name": String(pattern=NAME, pattern_text=NAME_TEXT),
        "description": String(),
        "schema": JSON_SCHEMA,
        "strict": Boolean(description="Always enforced here; both values mean the same."),
    }),
    "schema": Free(description="llama.cpp's extension: json_object with a schema."),
}, description="Structured output, enforced by the grammar.")

# --- tools ---------------------------------------------------------------------------------
FUNCTION = Object({
    "name": String(required=True, pattern=NAME, pattern_text=NAME_TEXT),
    "description": String(),
    "parameters": Free(description="A JSON schema of type object; default: no arguments."),
    "strict": Boolean(),
}, required=True)
TOOLS = Array(items=Object({"type": String(enum=("function",), required=True),
                            "function": FUNCTION}, nullable=False),
              max_items=MAX_TOOLS, description="Function tools the model may call.")
TOOL_CHOICE = OneOf(options=(String(enum=("none", "auto", "required")), Free()),
                    description="'none', 'auto', 'required' or {'type': 'function', "
                    "'function': {'name': ...}}.")

# --- chat ---------------------------------------------------------------------------------
TEXT_PART = Object({"type": String(enum=("text",), required=True),
                    "text": String(required=True)}, nullable=False)
CONTENT = OneOf(options=(String(), Array(items=TEXT_PART)),
                expected="a string or an array of content parts")
TOOL_CALL = Object({
    "id": String(required=True),
    "type": String(enum=("function",)),
    "function": Object({"name": String(required=True), "arguments": String(required=True)},
                       required=True),
}, nullable=False)
MESSAGE = Object({
    "role": String(enum=("system", "developer", "user", "assistant", "tool", "function"),
                   required=True),
    "content": CONTENT,
    "name": String(),
    "tool_calls": Array(items=TOOL_CALL, min_items=1),
    "tool_call_id": String(),
}, nullable=False)

CHAT = Object({
    "model": MODEL,
    "messages": Array(items=MESSAGE, min_items=1, required=True),
    **MAX_TOKENS,
    **SAMPLING,
    "n": Integer(1, INT32_MAX, default=1, description="Choices to generate (share a prefill)."),
    **STREAM,
    "response_format": RESPONSE_FORMAT,
    "tools": TOOLS,
    "tool_choice": TOOL_CHOICE,
    "parallel_tool_calls": Boolean(),
    "logprobs": Boolean(default=False),
    "top_logprobs": Integer(0, MAX_TOP_LOGPROBS),
    "user": String(),
}, title="ChatCompletionRequest")

# --- completions --------------------------------------------------------------------------
TOKEN_IDS = Array(items=Integer(0, INT32_MAX, nullable=False), min_items=1)
PROMPT = OneOf(options=(String(), Array(min_items=1)), required=True,
               description="A string, an array of strings, an array of token ids or an array "
               "of token-id arrays.")
COMPLETION = Object({
    "model": MODEL,
    "prompt": PROMPT,
    "max_tokens": MAX_TOKENS["max_tokens"],
    **SAMPLING,
    "n": CHAT.properties["n"],
    **STREAM,
    "echo": Boolean(default=False),
    "logprobs": Integer(0, MAX_TOP_LOGPROBS, description="Top alternatives per token."),
    "response_format": RESPONSE_FORMAT,
    "suffix": String(),
    "best_of": Integer(1, INT32_MAX),
    "user": String(),
}, title="CompletionRequest")

# --- embeddings ---------------------------------------------------------------------------
EMBEDDINGS = Object({
    "model": MODEL,
    "input": OneOf(options=(String(), Array()), required=True,
                   description="A non-empty string, an array of them, an array of token ids "
                   "or an array of token-id arrays."),
    "encoding_format": String(enum=("float", "base64"), default="float"),
    "dimensions": Integer(1, INT32_MAX, description="Truncate (and renormalize) to this "
                          "many dimensions."),
    "user": String(),
}, title="EmbeddingRequest")
