"""OpenAI request bodies, validated by `server.openai.schemas`, → the requests to run.

Unknown fields are ignored, as OpenAI's API does for forward compatibility; a known field
whose value we cannot honour (audio, a schema keyword the grammar engine cannot enforce, ...)
is refused by name. `response_format` and `tools` become a `Grammar` here, before the request
waits for a slot, so a schema we cannot enforce is a 400 at once, never a silent downgrade.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.http.errors import bad_request
from server.http.schema import type_error
from server.openai.tools import parse_tools
from server.serving.grammar import NO_CALLS, build_grammar
from server.serving.request import GenerationRequest, Sampling

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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
    value = body.get(name)
    if value is not None and value > cap:
        raise bad_request(f"Invalid value for '{name}': {value}; this server allows at most "
                          f"{cap} completion tokens.", param=name, code="invalid_value")
    return value


def _logit_bias(bias: dict | None) -> dict[int, float] | None:
    if bias is None:
        return None
    for key in bias:
        if not str(key).lstrip("-").isdigit():
            raise bad_request(f"Invalid key in 'logit_bias': {key!r} is not a token id.",
                              param="logit_bias", code="invalid_value")
    return {int(k): float(v) for k, v in bias.items()}


def sampling(body: dict, cap: int) -> Sampling:
    """The engine's options from a body validated by `schemas.SAMPLING`."""
    stop = body["stop"]
    stops = [stop] if isinstance(stop, str) else stop or []
    return Sampling(
        max_tokens=_max_tokens(body, cap),
        temperature=body["temperature"], top_p=body["top_p"], top_k=body["top_k"],
        min_p=body["min_p"], seed=body["seed"], stop=[s for s in stops if s],
        presence_penalty=float(body["presence_penalty"]),
        frequency_penalty=float(body["frequency_penalty"]),
        repetition_penalty=float(body["repetition_penalty"]),
        logit_bias=_logit_bias(body["logit_bias"]),
    )


# --- structured output ----------------------------------------------------------------------

def response_format(rf: dict | None, where: str = "response_format") \
        -> tuple[str, dict | None]:
    """A validated `response_format` → ("text" | "json_object" | "json_schema", the schema or
    None). Lenient as llama.cpp is: a json_schema needs no name, and json_object may carry a
    `schema` (llama.cpp's extension), which is then enforced."""
    if rf is None:
        return "text", None
    kind = rf.get("type")
    if kind == "text":
        return kind, None
    if kind == "json_object":
        return ("json_schema", rf["schema"]) if rf.get("schema") is not None else (kind, None)
    if kind != "json_schema":
        raise bad_request(f"Missing '{where}.type': expected 'text', 'json_object' or "
                          "'json_schema'.", param=where, code="invalid_value")
    spec = rf.get("json_schema")
    if spec is None:
        raise bad_request(f"'{where}.json_schema' must be an object with 'name' and "
                          "'schema'.", param=where, code="missing_required_parameter")
    if spec.get("schema") is None:
        raise bad_request(f"'{where}.json_schema.schema' must be a JSON schema object.",
                          param=where, code="missing_required_parameter")
    # `strict` is OpenAI's "follow the schema exactly": with constrained decoding we always
    # do, so both values mean the same here.
    return kind, spec["schema"]


def _common(body: dict, kind: str, cap: int, max_n: int) -> GenerationRequest:
    _unsupported_fields(body, kind)
    stream = body["stream"]
    if body["stream_options"] is not None and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.",
                          param="stream_options", code="invalid_value")
    if body["n"] > max_n:
        raise bad_request(f"Invalid value for 'n': {body['n']}; it must be between 1 and "
                          f"{max_n}.", param="n", code="invalid_value")
    return GenerationRequest(
        kind=kind, model=body["model"] or None, sampling=sampling(body, cap),
        n=body["n"], stream=stream,
        include_usage=bool((body["stream_options"] or {}).get("include_usage")),
    )


# --- chat -----------------------------------------------------------------------------------

def _content(content) -> str:
    """A validated `content`: a string, or text parts joined by newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part["text"] for part in content)


def _tool_calls(calls: list[dict]) -> list[dict]:
    """An assistant message's validated `tool_calls`, as the chat template gets them."""
    return [{"id": c["id"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
            for c in calls]


def _message(message, i: int, calls: dict[str, str]) -> dict:
    """One message, validated; `calls` maps the ids of earlier tool calls to their names."""
    where = f"messages[{i}]"
    role = message["role"]
    if role == "function" or message.get("function_call"):
        raise bad_request(f"Function messages (the legacy form of tool calls) are not "
                          f"supported ({where}); use 'tool_calls' and 'tool' messages.",
                          param=f"{where}.role", code="unsupported_parameter")
    if role == "assistant" and message.get("tool_calls") is not None:
        tool_calls = _tool_calls(message["tool_calls"])
        calls.update((c["id"], c["function"]["name"]) for c in tool_calls)
        content = message.get("content")
        return {"role": "assistant", "tool_calls": tool_calls,
                "content": None if content is None else _content(content)}
    if message.get("content") is None and role != "assistant":
        raise bad_request(f"Missing '{where}.content'.", param=f"{where}.content",
                          code="missing_required_parameter")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if call_id not in calls:
            raise bad_request(f"'{where}.tool_call_id' is {call_id!r}, which no earlier "
                              "assistant message's 'tool_calls' holds.",
                              param=f"{where}.tool_call_id", code="invalid_value")
        return {"role": "tool", "tool_call_id": call_id, "name": calls[call_id],
                "content": _content(message["content"])}
    return {"role": ROLES[role], "content": _content(message.get("content"))}


def _messages(messages: list) -> list[dict]:
    calls: dict[str, str] = {}
    return [_message(m, i, calls) for i, m in enumerate(messages)]


def parse_chat(body: dict, cap: int, max_n: int = 8) -> GenerationRequest:
    """A body validated by `schemas.CHAT` → the request to run."""
    req = _common(body, "chat", cap, max_n)
    messages = body["messages"]
    req.messages = _messages(messages)
    req.tools = parse_tools(body)
    req.response_format, schema = response_format(body["response_format"])
    tools = req.tools
    if tools is None and any(m.get("tool_calls") or m["role"] == "tool" for m in req.messages):
        # Past calls are in the prompt (as <tool_call> blocks where the template has no tool
        # support) but none may be made now: the reply is text that never holds the tag.
        tools = NO_CALLS
    req.grammar = build_grammar(req.response_format, schema, tools)
    top = body["top_logprobs"]
    if body["logprobs"]:
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
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or _is_ids(p) for p in prompt):
        return list(prompt)
    raise type_error("prompt", "a string, an array of strings, an array of token ids or an "
                      "array of token-id arrays (non-empty)", prompt)


def parse_completion(body: dict, cap: int, max_n: int = 8) -> GenerationRequest:
    """A body validated by `schemas.COMPLETION` → the request to run."""
    req = _common(body, "completion", cap, max_n)
    req.prompts = _prompts(body["prompt"])
    req.echo = body["echo"]
    req.logprobs = body["logprobs"]
    req.response_format, schema = response_format(body["response_format"])
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
    expected = ("a non-empty string, an array of non-empty strings, an array of token ids or "
                "an array of non-empty token-id arrays")
    if isinstance(value, str):
        inputs = [value]
    elif not isinstance(value, list):
        raise type_error("input", expected, value)
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
        raise type_error(f"input[{bad}]", "a non-empty string or a non-empty array of token "
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
    """A body validated by `schemas.EMBEDDINGS` → the request to run."""
    return EmbeddingRequest(model=body["model"] or None,
                            inputs=_embedding_inputs(body["input"], max_batch),
                            encoding_format=body["encoding_format"],
                            dimensions=body["dimensions"])
