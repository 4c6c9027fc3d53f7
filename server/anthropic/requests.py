"""Anthropic Messages request bodies: their schemas (which validate and write /openapi.json) and
their translation to the `GenerationRequest` every protocol runs.

Blocks map onto the chat messages the chat template takes: a user turn's `text` blocks are one
user message and each `tool_result` block a tool message; an assistant turn's `text` and
`tool_use` blocks are one assistant message with `tool_calls`. `thinking` blocks in the history
are dropped (this server does not think aloud). `tool_choice` `any` is OpenAI's `required`,
`tool` a named function.
"""

from __future__ import annotations

import json

from server.http.errors import bad_request
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
from server.openai.schemas import INT32_MAX, NAME, NAME_TEXT
from server.openai.tools import tool, tool_spec
from server.serving.grammar import NO_CALLS, build_grammar
from server.serving.request import GenerationRequest, Sampling

MAX_STOP_SEQUENCES = 16

TEXT_BLOCK = Object({"type": String(enum=("text",), required=True),
                     "text": String(required=True)}, nullable=False)
RESULT_CONTENT = OneOf(options=(String(), Array(items=TEXT_BLOCK)),
                       expected="a string or an array of text blocks")
BLOCK = Object({
    "type": String(enum=("text", "tool_use", "tool_result", "thinking", "redacted_thinking"),
                   required=True),
    "text": String(), "id": String(), "name": String(), "input": Free(),
    "tool_use_id": String(), "content": RESULT_CONTENT, "is_error": Boolean(),
}, nullable=False, description="text, tool_use or tool_result (thinking blocks are dropped).")
MESSAGE = Object({
    "role": String(enum=("user", "assistant"), required=True),
    "content": OneOf(options=(String(), Array(items=BLOCK)), required=True,
                     expected="a string or an array of content blocks"),
}, nullable=False)
TOOL = Object({
    "name": String(required=True, pattern=NAME, pattern_text=NAME_TEXT),
    "description": String(),
    "input_schema": Free(required=True, description="A JSON schema of type object."),
    "type": String(enum=("custom",), description="Only client tools are served here."),
}, nullable=False)
TOOL_CHOICE = Object({
    "type": String(enum=("auto", "any", "tool", "none"), required=True),
    "name": String(), "disable_parallel_tool_use": Boolean(),
})
CONVERSATION = {
    "model": String(required=True, description="A served model's id or alias."),
    "system": OneOf(options=(String(), Array(items=TEXT_BLOCK)),
                    expected="a string or an array of text blocks"),
    "messages": Array(items=MESSAGE, min_items=1, required=True),
    "tools": Array(items=TOOL, max_items=128),
    "tool_choice": TOOL_CHOICE,
}
MESSAGES = Object({
    **CONVERSATION,
    "max_tokens": Integer(1, INT64[1], required=True),
    "stop_sequences": Array(items=String(nullable=False), max_items=MAX_STOP_SEQUENCES),
    "temperature": Number(0, 1), "top_p": Number(0, 1), "top_k": Integer(0, INT32_MAX),
    "seed": Integer(*INT64, description="Our addition: reproducible sampling."),
    "stream": Boolean(default=False),
    "metadata": Object({"user_id": String()}),
}, title="MessagesRequest")
COUNT_TOKENS = Object(CONVERSATION, title="CountTokensRequest")


def _text(blocks) -> str:
    if isinstance(blocks, str):
        return blocks
    return "\n".join(b["text"] for b in blocks or [])


def _require(block: dict, where: str, *names: str) -> None:
    for name in names:
        if block.get(name) is None:
            raise bad_request(f"Missing required parameter: '{where}.{name}'.",
                              param=f"{where}.{name}", code="missing_required_parameter")


def _turn(message: dict, i: int, calls: dict[str, str]) -> list[dict]:
    """One Anthropic turn → chat messages; `calls` maps tool_use ids to their names."""
    role, content = message["role"], message["content"]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    texts, out, tool_calls = [], [], []
    for j, block in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = block["type"]
        if kind == "text":
            _require(block, where, "text")
            texts.append(block["text"])
        elif kind == "tool_use":
            if role != "assistant":
                raise bad_request(f"'{where}' is a tool_use block in a user turn.",
                                  param=f"{where}.type", code="invalid_value")
            _require(block, where, "id", "name", "input")
            calls[block["id"]] = block["name"]
            tool_calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block["input"])}})
        elif kind == "tool_result":
            _require(block, where, "tool_use_id")
            if block["tool_use_id"] not in calls:
                raise bad_request(f"'{where}.tool_use_id' is {block['tool_use_id']!r}, which no "
                                  "earlier tool_use block holds.", param=f"{where}.tool_use_id",
                                  code="invalid_value")
            result = _text(block.get("content"))
            if block.get("is_error"):
                result = "Error: " + result
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                        "name": calls[block["tool_use_id"]], "content": result})
    if role == "assistant":
        message = {"role": "assistant", "content": "\n".join(texts) or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return [message] if tool_calls or texts else []
    if texts:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _messages(body: dict) -> list[dict]:
    out = []
    if body["system"]:
        out.append({"role": "system", "content": _text(body["system"])})
    calls: dict[str, str] = {}
    for i, message in enumerate(body["messages"]):
        out += _turn(message, i, calls)
    if not any(m["role"] != "system" for m in out):
        raise bad_request("'messages' holds no text or tool results to answer.",
                          param="messages", code="invalid_value")
    return out


def _tools(body: dict):
    tools = [tool({"name": t["name"], "description": t.get("description"),
                   "parameters": t["input_schema"]}, f"tools[{i}]")
             for i, t in enumerate(body["tools"] or [])]
    choice = body["tool_choice"] or {}
    kind = {"auto": "auto", "any": "required", "none": "none", "tool": "function"}.get(
        choice.get("type"))
    if kind == "function":
        if not choice.get("name"):
            raise bad_request("'tool_choice.name' is required when 'tool_choice.type' is "
                              "'tool'.", param="tool_choice.name",
                              code="missing_required_parameter")
        named = {"type": "function", "function": {"name": choice["name"]}}
    else:
        named = kind
    return tool_spec(tools, named, not choice.get("disable_parallel_tool_use"))


def conversation(body: dict, kind: str = "chat") -> GenerationRequest:
    """The prompt part of a body (also all count_tokens needs)."""
    req = GenerationRequest(kind=kind, model=body["model"], sampling=Sampling())
    req.messages = _messages(body)
    req.tools = _tools(body)
    return req


def parse_messages(body: dict, cap: int) -> GenerationRequest:
    """A body validated by `MESSAGES` → the request to run."""
    req = conversation(body)
    if body["max_tokens"] > cap:
        raise bad_request(f"Invalid value for 'max_tokens': {body['max_tokens']}; this server "
                          f"allows at most {cap}.", param="max_tokens", code="invalid_value")
    req.sampling = Sampling(max_tokens=body["max_tokens"], temperature=body["temperature"],
                            top_p=body["top_p"], top_k=body["top_k"], seed=body["seed"],
                            stop=[s for s in body["stop_sequences"] or [] if s])
    req.stream = body["stream"]
    tools = req.tools
    if tools is None and any(m.get("tool_calls") or m["role"] == "tool" for m in req.messages):
        tools = NO_CALLS  # calls in the history, none offered now: the reply is text
    req.grammar = build_grammar("text", None, tools)
    return req
