"""OpenAI request bodies -> validated requests. The one place that turns their bad input into
400s.

Unknown fields are ignored, as OpenAI's API does for forward compatibility; a known field
whose value we cannot honour (audio, a schema keyword the grammar engine cannot enforce, ...)
is refused by name. `response_format` and `tools` become a `Grammar` here, before the request
waits for a slot, so a schema we cannot enforce is a 400 at once, never a silent downgrade.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from server.http.errors import APIError, bad_request
from server.openai.tools import NAME, parse_tools
from server.serving.grammar import NO_CALLS, build_grammar
from server.serving.request import GenerationRequest, Sampling

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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
        "functions": lambda v: v not in (None, []),  # the legacy form of `tools`
        "function_call": lambda v: v not in (None, "none", "auto"),
        "audio": lambda v: v is not None,
        "modalities": lambda v: v not in (None, ["text"]),
        "prediction": lambda v: v is not None,
        "reasoning_effort": lambda v: v is not None,
        "web_search_options": lambda v: v is not None,
    }
    if kind == "completion":  # tools are a chat feature
        checks["tools"] = lambda v: v not in (None, [])
        checks["tool_choice"] = lambda v: v not in (None, "none", "auto")
        checks["suffix"] = lambda v: v not in (None, "")
        checks["best_of"] = lambda v: v not in (None, 1, body.get("n") or 1)
    instead = {"functions": "tools", "function_call": "tool_choice"}  # OpenAI's successors
    for name, refused in checks.items():
        if refused(body.get(name)):
            hint = (f" It is the deprecated form of '{instead[name]}'; send that instead."
                    if name in instead else "")
            raise bad_request(f"'{name}' is not supported by this server.{hint}", param=name,
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


# --- structured output ----------------------------------------------------------------------

def _response_format(body: dict) -> tuple[str, dict | None]:
    """`response_format` → ("text" | "json_object" | "json_schema", the schema or None)."""
    rf = body.get("response_format")
    if rf is None:
        return "text", None
    if not isinstance(rf, dict):
        raise _type_error("response_format", "an object", rf)
    kind = rf.get("type")
    if kind in ("text", "json_object"):
        return kind, None
    if kind != "json_schema":
        raise bad_request(f"Invalid value for 'response_format.type': {kind!r}; expected "
                          "'text', 'json_object' or 'json_schema'.", param="response_format",
                          code="invalid_value")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("'response_format.json_schema' must be an object with 'name' and "
                          "'schema'.", param="response_format",
                          code="missing_required_parameter" if spec is None else "invalid_type")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise bad_request("'response_format.json_schema.name' must be 1-64 letters, digits, "
                          f"'_' or '-'; got {name!r}.", param="response_format",
                          code="invalid_value" if name is not None
                          else "missing_required_parameter")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise bad_request("'response_format.json_schema.schema' must be a JSON schema "
                          "object.", param="response_format",
                          code="invalid_type" if schema is not None
                          else "missing_required_parameter")
    for key, expected in (("strict", bool), ("description", str)):
        if spec.get(key) is not None and not isinstance(spec[key], expected):
            raise _type_error(f"response_format.json_schema.{key}", "a boolean"
                              if expected is bool else "a string", spec[key])
    # `strict` is OpenAI's "follow the schema exactly": with constrained decoding we always
    # do, so both values mean the same here.
    return kind, schema


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


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's `tool_calls`, as the chat template gets them."""
    if not isinstance(calls, list) or not calls:
        raise _type_error(f"{where}.tool_calls", "a non-empty array", calls)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise _type_error(f"{at}.function", "an object", fn)
        if call.get("type", "function") != "function":
            raise bad_request(f"'{at}.type' must be 'function'.", param=f"{at}.type",
                              code="invalid_value")
        for key, value in (("id", call.get("id")), ("function.name", fn.get("name")),
                           ("function.arguments", fn.get("arguments"))):
            if not isinstance(value, str):
                raise _type_error(f"{at}.{key}", "a string", value)
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def _message(message, i: int, calls: dict[str, str]) -> dict:
    """One message, validated; `calls` maps the ids of earlier tool calls to their names."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _type_error(where, "an object", message)
    role = message.get("role")
    if role == "function" or message.get("function_call"):
        raise bad_request(f"Function messages (the legacy form of tool calls) are not "
                          f"supported ({where}); use 'tool_calls' and 'tool' messages.",
                          param=f"{where}.role", code="unsupported_parameter")
    if role not in ROLES and role != "tool":
        raise bad_request(f"Invalid value for '{where}.role': {role!r}; expected one of "
                          "system, developer, user, assistant, tool.", param=f"{where}.role",
                          code="invalid_value")
    if role == "assistant" and message.get("tool_calls") is not None:
        tool_calls = _tool_calls(message["tool_calls"], where)
        calls.update((c["id"], c["function"]["name"]) for c in tool_calls)
        content = message.get("content")
        return {"role": "assistant", "tool_calls": tool_calls,
                "content": None if content is None else _content(content, where)}
    if message.get("content") is None and role != "assistant":
        raise bad_request(f"Missing '{where}.content'.", param=f"{where}.content",
                          code="missing_required_parameter")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise _type_error(f"{where}.tool_call_id", "a string", call_id)
        if call_id not in calls:
            raise bad_request(f"'{where}.tool_call_id' is {call_id!r}, which no earlier "
                              "assistant message's 'tool_calls' holds.",
                              param=f"{where}.tool_call_id", code="invalid_value")
        return {"role": "tool", "tool_call_id": call_id, "name": calls[call_id],
                "content": _content(message["content"], where)}
    return {"role": ROLES[role], "content": _content(message.get("content"), where)}


def _messages(messages: list) -> list[dict]:
    calls: dict[str, str] = {}
    return [_message(m, i, calls) for i, m in enumerate(messages)]


def parse_chat(body: dict, cap: int, max_n: int = 8) -> GenerationRequest:
    req = _common(body, "chat", cap, max_n)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        if messages is None:
            raise bad_request("Missing required parameter: 'messages'.", param="messages",
                              code="missing_required_parameter")
        raise bad_request("'messages' must be a non-empty array.", param="messages",
                          code="invalid_value")
    req.messages = _messages(messages)
    req.tools = parse_tools(body)
    req.response_format, schema = _response_format(body)
    tools = req.tools
    if tools is None and any(m.get("tool_calls") or m["role"] == "tool" for m in req.messages):
        # Past calls are in the prompt (as <tool_call> blocks where the template has no tool
        # support) but none may be made now: the reply is text that never holds the tag.
        tools = NO_CALLS
    req.grammar = build_grammar(req.response_format, schema, tools)
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
    req.response_format, schema = _response_format(body)
    req.grammar = build_grammar(req.response_format, schema, None)
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
