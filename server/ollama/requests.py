"""Ollama request bodies → the server's `GenerationRequest`: the one place that turns their bad
input into errors (400s, which the Blueprint writes as Ollama's `{"error": "message"}`).

Ollama's fields and what they become:
- `options` (temperature, top_k, top_p, min_p, seed, num_predict, stop, repeat_penalty,
  presence_penalty, frequency_penalty) → `Sampling`; options that tune Ollama's runner
  (num_ctx, num_thread, num_gpu, ...) are accepted and have no effect here, as unknown ones
  are in Ollama. A sampling option not given takes numbalm's chat defaults
  (`engine.sampling.CHAT_DEFAULTS`, Ollama's own repeat_penalty 1.1 among them).
- `format`: `"json"` → any JSON object, a JSON schema → that schema; enforced while
  generating by the grammar `/v1` uses (`server.serving.grammar`).
- `tools` (the same objects as OpenAI's) → a `ToolSpec`; `messages[].tool_calls` carry
  arguments as objects (OpenAI: JSON strings) and a `tool` message names its tool
  (`tool_name`) instead of a call id.
- `stream` is true unless it is false, as in Ollama.
"""

from __future__ import annotations

import json

from engine.sampling import CHAT_DEFAULTS
from server.http.errors import bad_request
from server.openai.tools import parse_tools
from server.serving.grammar import NO_CALLS, build_grammar
from server.serving.request import GenerationRequest, Sampling

ROLES = ("system", "user", "assistant", "tool")
# Ollama's option name → Sampling's field, with its JSON type and bounds
OPTIONS = {
    "temperature": ("temperature", float, 0, 2),
    "top_p": ("top_p", float, 0, 1),
    "top_k": ("top_k", int, 0, None),
    "min_p": ("min_p", float, 0, 1),
    "seed": ("seed", int, None, None),
    "repeat_penalty": ("repetition_penalty", float, 0.01, 10),
    "repeat_last_n": ("repeat_last_n", int, -1, None),
    "presence_penalty": ("presence_penalty", float, -2, 2),
    "frequency_penalty": ("frequency_penalty", float, -2, 2),
}


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
            list: "an array", dict: "an object"}[kind]


def _typed(body: dict, name: str, kind, where: str | None = None):
    """body[name] if it is of `kind` (None when absent); else a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and isinstance(value, float) and value == int(value):
        value, ok = int(value), True
    if not ok:
        raise bad_request(f"invalid type for '{where or name}': expected {_type_name(kind)}")
    return value


def _in_range(value, name: str, lo, hi):
    if value is not None and ((lo is not None and value < lo) or
                              (hi is not None and value > hi)):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad_request(f"invalid value for option '{name}': {value}; it must be {bounds}")
    return value


def parse_json(raw: bytes) -> dict:
    if not raw.strip():
        raise bad_request("missing request body")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad_request(f"invalid JSON in the request body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def model_name(body: dict) -> str:
    """`model` (or the older `name`): required by every route that names one."""
    name = _typed(body, "model", str) or _typed(body, "name", str)
    if not name:
        raise bad_request("model is required")
    return name


def sampling(body: dict, cap: int) -> Sampling:
    """`options` → Sampling; not given: numbalm's chat defaults."""
    options = _typed(body, "options", dict) or {}
    out = Sampling(**{k: v for k, v in CHAT_DEFAULTS.items() if k in Sampling.__dataclass_fields__})
    for name, (field, kind, lo, hi) in OPTIONS.items():
        value = _in_range(_typed(options, name, kind, f"options.{name}"), name, lo, hi)
        if value is not None:
            setattr(out, field, float(value) if kind is float else value)
    predict = _typed(options, "num_predict", int, "options.num_predict")
    if predict is not None and predict >= 0:  # -1 (and -2): until the context is full
        if predict == 0:
            raise bad_request("invalid value for option 'num_predict': 0; use -1 for no "
                              "limit or a positive count")
        out.max_tokens = min(predict, cap)
    stop = options.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad_request("invalid type for 'options.stop': expected an array of strings")
        out.stop = [s for s in stops if s]
    return out


def _format(body: dict) -> tuple[str, dict | None]:
    """`format` → ("text" | "json_object" | "json_schema", the schema or None)."""
    fmt = body.get("format")
    if fmt in (None, ""):
        return "text", None
    if fmt == "json":
        return "json_object", None
    if isinstance(fmt, dict):
        return "json_schema", fmt
    raise bad_request(f"invalid format {fmt!r}: use \"json\" or a JSON schema object")


def _refuse(body: dict, names: tuple[str, ...]) -> None:
    """Fields numbalm cannot honour: a clear error, never a silent drop."""
    for name in names:
        value = body.get(name)
        if value in (None, "", [], False):
            continue
        why = {"images": "numbalm's models read text only",
               "think": "numbalm's models do not think (no reasoning output)",
               "suffix": "fill-in-the-middle is not supported",
               "template": "Ollama's Go templates are not supported; numbalm renders the "
                           "model's Jinja template (`numbalm serve --chat-template FILE`)",
               "context": "the deprecated 'context' field is not supported; send the "
                          "conversation as /api/chat messages"}[name]
        raise bad_request(f"'{name}' is not supported: {why}")


def _start(body: dict, kind: str, cap: int) -> GenerationRequest:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("invalid type for 'stream': expected a boolean")
    return GenerationRequest(kind=kind, model=model_name(body), sampling=sampling(body, cap),
                             stream=stream is not False)


def _tool_calls(calls, where: str) -> list[dict]:
    """Ollama's calls (arguments as objects) → the OpenAI form the chat template gets."""
    if not isinstance(calls, list):
        raise bad_request(f"invalid type for '{where}.tool_calls': expected an array")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"'{where}.tool_calls[{j}].function' must be an object with a "
                              "'name'")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise bad_request(f"'{where}.tool_calls[{j}].function.arguments' is not "
                                  "JSON") from None
        out.append({"id": f"call_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": json.dumps(args)}})
    return out


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list):
        raise bad_request("invalid type for 'messages': expected an array")
    out: list[dict] = []
    last_call = None  # the name a tool message answers when it does not say
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"invalid type for '{where}': expected an object")
        _refuse(m, ("images",))
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"invalid role {role!r} in '{where}': expected one of "
                              f"{', '.join(ROLES)}")
        content = _typed(m, "content", str, f"{where}.content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = _tool_calls(m["tool_calls"], where)
            last_call = calls[-1]["function"]["name"]
            out.append({"role": "assistant", "content": content or None, "tool_calls": calls})
        elif role == "tool":
            name = _typed(m, "tool_name", str, f"{where}.tool_name") or last_call or "tool"
            out.append({"role": "tool", "tool_call_id": "call_0", "name": name,
                        "content": content})
        else:
            out.append({"role": role, "content": content})
    return out


def parse_chat(body: dict, cap: int) -> GenerationRequest:
    _refuse(body, ("think",))
    req = _start(body, "chat", cap)
    if body.get("messages") is None:
        raise bad_request("messages is required")
    req.messages = _messages(body["messages"])
    if not req.messages:
        raise bad_request("messages must not be empty")
    tools = body.get("tools")
    req.tools = parse_tools({"tools": tools}) if tools else None
    req.response_format, schema = _format(body)
    spec = req.tools
    if spec is None and any(m.get("tool_calls") or m["role"] == "tool" for m in req.messages):
        spec = NO_CALLS  # past calls in the prompt, none to be made now
    req.grammar = build_grammar(req.response_format, schema, spec)
    return req


def parse_generate(body: dict, cap: int, can_chat: bool) -> GenerationRequest:
    """`/api/generate`: as Ollama, the prompt goes through the model's chat template (as one
    user turn after `system`) unless `raw` is true or the model has none (a base model);
    then it is plain text to continue."""
    _refuse(body, ("images", "think", "suffix", "template", "context"))
    raw = _typed(body, "raw", bool) or False
    prompt = _typed(body, "prompt", str) or ""
    system = _typed(body, "system", str)
    kind = "chat" if can_chat and not raw else "completion"
    req = _start(body, kind, cap)
    if kind == "chat":
        req.messages = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": prompt}]
    else:
        req.prompts = [f"{system}\n\n{prompt}" if system and not raw else prompt]
    req.response_format, schema = _format(body)
    req.grammar = build_grammar(req.response_format, schema, None)
    return req


def embed_inputs(body: dict, legacy: bool) -> tuple[list[str], bool]:
    """`/api/embed`'s `input` (a string or strings) with `truncate` (default true), or
    `/api/embeddings`' single `prompt`."""
    if legacy:
        prompt = _typed(body, "prompt", str)
        if not prompt:
            raise bad_request("prompt is required")
        return [prompt], True
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or \
            not all(isinstance(v, str) and v for v in inputs):
        raise bad_request("'input' must be a non-empty string or an array of non-empty "
                          "strings")
    truncate = body.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise bad_request("invalid type for 'truncate': expected a boolean")
    return inputs, truncate is not False


def dimensions(body: dict) -> int | None:
    value = _typed(body, "dimensions", int)
    if value is not None and value < 1:
        raise bad_request("invalid value for 'dimensions': it must be at least 1")
    return value

