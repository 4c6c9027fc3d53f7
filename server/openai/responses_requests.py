"""The Responses API's request body: its schema, and its translation to the chat messages and
`GenerationRequest` every protocol runs.

Input items map onto chat messages: a `message` item (role and text parts) is one message, a
`function_call` item an assistant message's tool call (consecutive calls share one message),
a `function_call_output` item a tool message. `instructions` is a system message first; with
`previous_response_id` the stored conversation comes before the new input (its instructions
are not carried over, as in OpenAI's API).
"""

from __future__ import annotations

from server.http.errors import bad_request
from server.http.schema import (
    Array,
    Boolean,
    Free,
    Integer,
    Object,
    OneOf,
    String,
)
from server.openai.requests import response_format, sampling
from server.openai.schemas import (
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    MODEL,
    NAME,
    NAME_TEXT,
    SAMPLING,
)
from server.openai.tools import tool, tool_spec
from server.serving.grammar import NO_CALLS, build_grammar
from server.serving.request import GenerationRequest

LOGPROBS = "message.output_text.logprobs"
TEXT_TYPES = ("input_text", "output_text", "text", "refusal")

PART = Object({"type": String(enum=(*TEXT_TYPES, "input_image", "input_file"), required=True),
               "text": String(), "refusal": String()}, nullable=False)
ITEM = Object({
    "type": String(enum=("message", "function_call", "function_call_output", "reasoning",
                         "item_reference"),
                   description="Default 'message' (when a role is given)."),
    "role": String(enum=("user", "assistant", "system", "developer")),
    "content": OneOf(options=(String(), Array(items=PART)),
                     expected="a string or an array of content parts"),
    "id": String(), "call_id": String(), "name": String(), "arguments": String(),
    "output": OneOf(options=(String(), Array(items=PART)),
                    expected="a string or an array of content parts"),
}, nullable=False)
FORMAT = Object({
    "type": String(enum=("text", "json_object", "json_schema"), required=True),
    "name": String(pattern=NAME, pattern_text=NAME_TEXT), "description": String(),
    "schema": Free(), "strict": Boolean(),
})
TOOL = Object({
    "type": String(enum=("function",), required=True,
                   description="Function tools only (no hosted tools here)."),
    "name": String(required=True, pattern=NAME, pattern_text=NAME_TEXT),
    "description": String(), "parameters": Free(), "strict": Boolean(),
}, nullable=False)
RESPONSES = Object({
    "model": MODEL,
    "input": OneOf(options=(String(), Array(items=ITEM)), required=True,
                   expected="a string or an array of input items"),
    "instructions": String(description="A system message before the input."),
    "previous_response_id": String(description="Continue a stored response."),
    "max_output_tokens": Integer(1, 2**63 - 1),
    **{k: SAMPLING[k] for k in ("temperature", "top_p", "top_k", "min_p", "seed", "stop",
                                "presence_penalty", "frequency_penalty", "repetition_penalty",
                                "logit_bias")},
    "tools": Array(items=TOOL, max_items=MAX_TOOLS),
    "tool_choice": OneOf(options=(String(enum=("none", "auto", "required")),
                                  Object({"type": String(enum=("function",), required=True),
                                          "name": String(required=True)})),
                         expected="'none', 'auto', 'required' or a function"),
    "parallel_tool_calls": Boolean(),
    "text": Object({"format": FORMAT}),
    "store": Boolean(default=True, description="Keep the response for GET and "
                     "previous_response_id (default true, as OpenAI's)."),
    "stream": Boolean(default=False),
    "metadata": Object(values=String(nullable=False, max_length=512)),
    "include": Array(items=String(nullable=False)),
    "top_logprobs": Integer(0, MAX_TOP_LOGPROBS),
    "truncation": String(enum=("disabled", "auto")),
    "background": Boolean(),
    "user": String(),
}, title="ResponseRequest")


def input_items(value) -> list[dict]:
    """`input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return [{"type": item.get("type") or "message", **{k: v for k, v in item.items()
                                                      if v is not None and k != "type"}}
            for item in value]


def _text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part["type"] not in TEXT_TYPES:
            raise bad_request(f"Content parts of type {part['type']!r} are not supported; only "
                              "text.", param=f"{where}[{j}].type", code="unsupported_parameter")
        texts.append(part.get("text") or part.get("refusal") or "")
    return "\n".join(texts)


def _need(item: dict, where: str, *names: str) -> None:
    for name in names:
        if item.get(name) is None:
            raise bad_request(f"Missing required parameter: '{where}.{name}'.",
                              param=f"{where}.{name}", code="missing_required_parameter")


def messages(items: list[dict], where: str = "input") -> list[dict]:
    """Input (or stored) items → chat messages."""
    out: list[dict] = []
    calls: dict[str, str] = {}
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        kind = item["type"]
        if kind == "message":
            _need(item, at, "role")
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": _text(item.get("content"), f"{at}.content")})
        elif kind == "function_call":
            _need(item, at, "call_id", "name", "arguments")
            calls[item["call_id"]] = item["name"]
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            _need(item, at, "call_id", "output")
            if item["call_id"] not in calls:
                raise bad_request(f"'{at}.call_id' is {item['call_id']!r}, which no earlier "
                                  "function_call item holds.", param=f"{at}.call_id",
                                  code="invalid_value")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "name": calls[item["call_id"]],
                        "content": _text(item["output"], f"{at}.output")})
        elif kind == "item_reference":
            raise bad_request("'item_reference' items are not supported; send the items, or "
                              "previous_response_id.", param=f"{at}.type",
                              code="unsupported_parameter")
        # reasoning items (from other servers) carry nothing this model reads: dropped
    return out


def _tools(body: dict):
    tools = [tool(t, f"tools[{i}]") for i, t in enumerate(body["tools"] or [])]
    choice = body["tool_choice"]
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tool_spec(tools, choice, body["parallel_tool_calls"])


def parse_responses(body: dict, history: list[dict], cap: int) -> tuple[GenerationRequest,
                                                                        list[dict]]:
    """A body validated by `RESPONSES` and the stored conversation before it (items) → the
    request to run and this request's input items."""
    if body["background"]:
        raise bad_request("'background' is not supported by this server.", param="background",
                          code="unsupported_parameter")
    if (body["max_output_tokens"] or 0) > cap:
        raise bad_request(f"Invalid value for 'max_output_tokens': {body['max_output_tokens']}; "
                          f"this server allows at most {cap}.", param="max_output_tokens",
                          code="invalid_value")
    items = input_items(body["input"])
    chat = messages(history + items)
    if body["instructions"]:
        chat.insert(0, {"role": "system", "content": body["instructions"]})
    if not any(m["role"] != "system" for m in chat):
        raise bad_request("'input' holds nothing to answer.", param="input",
                          code="invalid_value")
    req = GenerationRequest(kind="chat", model=body["model"] or None,
                            sampling=sampling({**body, "max_tokens": body["max_output_tokens"],
                                               "max_completion_tokens": None}, cap),
                            stream=body["stream"], messages=chat)
    req.tools = _tools(body)
    fmt = (body["text"] or {}).get("format")
    rf = None
    if fmt is not None:  # the flat shape → chat's response_format
        rf = {"type": fmt["type"], "schema": fmt.get("schema"),
              "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    req.response_format, schema = response_format(rf, "text.format")
    tools = req.tools
    if tools is None and any(m.get("tool_calls") or m["role"] == "tool" for m in chat):
        tools = NO_CALLS
    req.grammar = build_grammar(req.response_format, schema, tools)
    if LOGPROBS in (body["include"] or []):
        req.logprobs = body["top_logprobs"] or 0
    return req, items
