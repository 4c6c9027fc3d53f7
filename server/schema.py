"""Request bodies -> validated requests. The one place that turns bad input into 400s.

Unknown fields are ignored, as OpenAI's API does for forward compatibility; a known field
whose value we cannot honour (tools, response_format json_schema, ...) is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from server.errors import APIError, bad_request

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Sampling:
    """Options passed through to `Model.generate`."""

    max_tokens: int | None = None  # None: up to the cap or the end of the context
    # Not given (None): the engine's defaults, llama.cpp's (0.8, 0.95, 40, 0.05).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None


@dataclass
class GenerationRequest:
    kind: str                       # "chat" | "completion"
    model: str | None
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None     # top alternatives per token; None: no logprobs at all
    echo: bool = False              # completions: prepend the prompt
    messages: list[dict] = field(default_factory=list)      # chat: [{"role", "content": str}]
    prompts: list[str | list[int]] = field(default_factory=list)  # completions


def parse_json(raw: bytes) -> dict:
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


# --- typed field access ---------------------------------------------------------------------

def _type_error(name: str, expected: str, value) -> APIError:
    return bad_request(f"Invalid type for '{name}': expected {expected}, got {_json_type(value)}.",
                       param=name, code="invalid_type")


def _json_type(value) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _number(body, name, default, lo=None, hi=None, integer=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "an integer" if integer else "a number", value)
    if integer:
        if value != int(value):
            raise _type_error(name, "an integer", value)
        value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad_request(f"Invalid value for '{name}': {value}; it must be {bounds}.",
                          param=name, code="invalid_value")
    return value


def _integer(body, name, default, lo=None, hi=None):
    return _number(body, name, default, lo, hi, integer=True)


def _bool(body, name, default=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


# --- fields we cannot honour ----------------------------------------------------------------

def _unsupported_fields(body: dict, kind: str) -> None:
    checks = {
        "tools": lambda v: v not in (None, []),
        "tool_choice": lambda v: v not in (None, "none", "auto"),
        "functions": lambda v: v not in (None, []),
        "function_call": lambda v: v not in (None, "none", "auto"),
        "response_format": lambda v: v is not None
        and not (isinstance(v, dict) and v.get("type") == "text"),
        "audio": lambda v: v is not None,
        "modalities": lambda v: v not in (None, ["text"]),
        "prediction": lambda v: v is not None,
        "reasoning_effort": lambda v: v is not None,
        "web_search_options": lambda v: v is not None,
    }
    if kind == "completion":
        checks["suffix"] = lambda v: v not in (None, "")
        checks["best_of"] = lambda v: v not in (None, 1, body.get("n") or 1)
    for name, refused in checks.items():
        if refused(body.get(name)):
            raise bad_request(f"'{name}' is not supported by this server.", param=name,
                              code="unsupported_parameter")


# --- shared sampling options ----------------------------------------------------------------

def _max_tokens(body: dict, cap: int) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    value = _integer(body, name, None, lo=1)
    if value is not None and value > cap:
        raise bad_request(f"Invalid value for '{name}': {value}; this server allows at most "
                          f"{cap} completion tokens.", param=name, code="invalid_value")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", stop)
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' takes at most {MAX_STOP} sequences.", param="stop",
                          code="invalid_value")
    return [s for s in stops if s]


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _type_error("logit_bias", "an object mapping token ids to numbers", bias)
    out = {}
    for key, value in bias.items():
        if not str(key).lstrip("-").isdigit():
            raise bad_request(f"Invalid key in 'logit_bias': {key!r} is not a token id.",
                              param="logit_bias", code="invalid_value")
        out[int(key)] = _number({"logit_bias": value}, "logit_bias", 0.0, -100, 100)
    return out


def _sampling(body: dict, cap: int) -> Sampling:
    return Sampling(
        max_tokens=_max_tokens(body, cap),
        temperature=_number(body, "temperature", None, 0, 2),
        top_p=_number(body, "top_p", None, 0, 1),
        top_k=_integer(body, "top_k", None, lo=0),
        min_p=_number(body, "min_p", None, 0, 1),
        seed=_integer(body, "seed", None),
        stop=_stop(body),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 10)),
        logit_bias=_logit_bias(body),
    )


def _common(body: dict, kind: str, cap: int, max_n: int) -> GenerationRequest:
    _unsupported_fields(body, kind)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.",
                              param="stream_options", code="invalid_value")
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object", options)
    return GenerationRequest(
        kind=kind, model=model or None, sampling=_sampling(body, cap),
        n=_integer(body, "n", 1, lo=1, hi=max_n), stream=stream,
        include_usage=_bool(options or {}, "include_usage"),
    )


# --- chat -----------------------------------------------------------------------------------

def _content(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _type_error(f"{where}.content", "a string or an array of content parts", content)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise _type_error(at, "a content part object", part)
        if part.get("type") != "text":
            raise bad_request(f"Content parts of type {part.get('type')!r} are not supported; "
                              "only 'text'.", param=f"{at}.type", code="unsupported_parameter")
        if not isinstance(part.get("text"), str):
            raise _type_error(f"{at}.text", "a string", part.get("text"))
        texts.append(part["text"])
    return "\n".join(texts)


def _message(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _type_error(where, "an object", message)
    role = message.get("role")
    if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
        raise bad_request(f"Tool and function messages are not supported ({where}).",
                          param=f"{where}.role", code="unsupported_parameter")
    if role not in ROLES:
        raise bad_request(f"Invalid value for '{where}.role': {role!r}; expected one of "
                          "system, developer, user, assistant.", param=f"{where}.role",
                          code="invalid_value")
    if message.get("content") is None and role != "assistant":
        raise bad_request(f"Missing '{where}.content'.", param=f"{where}.content",
                          code="missing_required_parameter")
    return {"role": ROLES[role], "content": _content(message.get("content"), where)}


def parse_chat(body: dict, cap: int, max_n: int = 8) -> GenerationRequest:
    req = _common(body, "chat", cap, max_n)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        if messages is None:
            raise bad_request("Missing required parameter: 'messages'.", param="messages",
                              code="missing_required_parameter")
        raise bad_request("'messages' must be a non-empty array.", param="messages",
                          code="invalid_value")
    req.messages = [_message(m, i) for i, m in enumerate(messages)]
    top = _integer(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if _bool(body, "logprobs"):
        req.logprobs = top or 0
    elif top is not None:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true.",
                          param="top_logprobs", code="invalid_value")
    return req


# --- completions ----------------------------------------------------------------------------

def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompts(prompt) -> list[str | list[int]]:
    if prompt is None:
        raise bad_request("Missing required parameter: 'prompt'.", param="prompt",
                          code="missing_required_parameter")
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or _is_ids(p) for p in prompt):
        return list(prompt)
    raise _type_error("prompt", "a string, an array of strings, an array of token ids or an "
                      "array of token-id arrays (non-empty)", prompt)


def parse_completion(body: dict, cap: int, max_n: int = 8) -> GenerationRequest:
    req = _common(body, "completion", cap, max_n)
    req.prompts = _prompts(body.get("prompt"))
    req.echo = _bool(body, "echo")
    req.logprobs = _integer(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    return req


# --- embeddings -----------------------------------------------------------------------------

@dataclass
class EmbeddingRequest:
    model: str | None
    inputs: list[str | list[int]]   # strings or token-id lists, in request order
    encoding_format: str = "float"  # float | base64
    dimensions: int | None = None   # None: the model's width


def _embedding_inputs(value, max_batch: int) -> list[str | list[int]]:
    if value is None:
        raise bad_request("Missing required parameter: 'input'.", param="input",
                          code="missing_required_parameter")
    expected = ("a non-empty string, an array of non-empty strings, an array of token ids or "
                "an array of non-empty token-id arrays")
    if isinstance(value, str):
        inputs = [value]
    elif not isinstance(value, list):
        raise _type_error("input", expected, value)
    elif not value:
        raise bad_request("'input' must not be an empty array.", param="input",
                          code="invalid_value")
    elif _is_ids(value):
        inputs = [list(value)]
    elif all(isinstance(v, str) or _is_ids(v) for v in value):
        inputs = list(value)
    else:
        bad = next(i for i, v in enumerate(value) if not (isinstance(v, str) or _is_ids(v)))
        if value[bad] == []:
            raise bad_request(f"'input[{bad}]' is an empty array of token ids.",
                              param="input", code="invalid_value")
        raise _type_error(f"input[{bad}]", "a non-empty string or a non-empty array of token "
                          "ids", value[bad])
    for i, item in enumerate(inputs):
        if isinstance(item, str) and not item:
            where = "input" if isinstance(value, str) else f"input[{i}]"
            raise bad_request(f"'{where}' is an empty string; nothing to embed.", param="input",
                              code="invalid_value")
    if len(inputs) > max_batch:
        raise bad_request(f"'input' holds {len(inputs)} items; this server embeds at most "
                          f"{max_batch} per request.", param="input", code="invalid_value")
    return inputs


def parse_embeddings(body: dict, max_batch: int = 256) -> EmbeddingRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    fmt = body.get("encoding_format")
    if fmt is not None and not isinstance(fmt, str):
        raise _type_error("encoding_format", "a string", fmt)
    if fmt not in (None, "float", "base64"):
        raise bad_request(f"Invalid value for 'encoding_format': {fmt!r}; expected 'float' or "
                          "'base64'.", param="encoding_format", code="invalid_value")
    return EmbeddingRequest(model=model or None,
                            inputs=_embedding_inputs(body.get("input"), max_batch),
                            encoding_format=fmt or "float",
                            dimensions=_integer(body, "dimensions", None, lo=1))
