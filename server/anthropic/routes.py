"""`POST /v1/messages` (whole or streamed) and `POST /v1/messages/count_tokens`, in Anthropic's
shapes, errors included: `{"type": "error", "error": {"type", "message"}}`.

The stream is Anthropic's event sequence, each event named on its own `event:` line:

    message_start, ping, then per content block: content_block_start,
    content_block_delta (text_delta | input_json_delta)..., content_block_stop;
    message_delta (stop_reason, usage), message_stop

Auth takes `x-api-key` or a Bearer token (server.http.hooks); the query string Claude Code
sends (`?beta=true`) is ignored.
"""

from __future__ import annotations

import json

from flask import Blueprint, current_app, jsonify

from server.anthropic.requests import COUNT_TOKENS, MESSAGES, conversation, parse_messages
from server.http.errors import SHAPES, APIError, ErrorShape
from server.http.generate import begin, complete, stream
from server.http.schema import String, route
from server.http.sse import sse_lines
from server.serving.generation import cached_tokens, chat_prompt_tokens, matched_stop, run_choice
from server.serving.ids import new_id

bp = Blueprint("anthropic", __name__, url_prefix="/v1")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "overloaded_error"}


def error_body(err: APIError) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(err.status, "api_error"),
                                       "message": err.message}}


SHAPES["anthropic"] = ErrorShape(error_body, {
    "type": "object", "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}})
BETA = {"beta": String(description="Sent by Claude Code; ignored.")}


def tool_use_id(call_id: str) -> str:
    """Anthropic's form of a call's id: toolu_ and the same letters."""
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict:
    try:
        value = json.loads(arguments)
    except ValueError:  # cut short by max_tokens
        return {}
    return value if isinstance(value, dict) else {}


def stop_reason(result, tokenizer, stops) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished choice."""
    if result.finish_reason == "length":
        return "max_tokens", None
    if result.parser is not None and result.parser.calls:
        return "tool_use", None
    stop = matched_stop(result, tokenizer, stops)
    return ("stop_sequence", stop) if stop else ("end_turn", None)


def _usage(gen, results, output_tokens: int) -> dict:
    return {"input_tokens": gen.plan.prompt_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached_tokens(gen.plan, results)}


class Shaper:
    def __init__(self, gen):
        self.gen = gen
        self.id = new_id("msg_")
        self.model = gen.served.id
        self.tokenizer = gen.served.llm.tokenizer
        self.stops = gen.plan.req.sampling.stop

    def message(self, content: list, reason=None, sequence=None, usage=None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": reason, "stop_sequence": sequence,
                "usage": usage}

    def whole(self, results) -> dict:
        r = results[0]
        content = []
        text = r.parser.content if r.parser is not None else r.text
        if text:
            content.append({"type": "text", "text": text})
        for call in (r.parser.calls if r.parser is not None else []):
            content.append({"type": "tool_use", "id": tool_use_id(call.id), "name": call.name,
                            "input": _input(call.arguments)})
        reason, sequence = stop_reason(r, self.tokenizer, self.stops)
        return self.message(content, reason, sequence,
                            _usage(self.gen, results, self.gen.stats.completion_tokens))

    def events(self):
        gen, r = self.gen, self.gen.results[0]
        yield {"type": "message_start", "message": self.message(
            [], usage={**_usage(gen, gen.results, 0), "output_tokens": 0})}
        yield {"type": "ping"}
        blocks = Blocks()
        for tok in run_choice(r, gen.stats):
            if r.parser is None:
                yield from blocks.text(tok.text)
            elif r.delta is not None:
                yield from blocks.delta(r.delta)
        if gen.check.reason or r.finish_reason == "cancelled":
            return
        if r.parser is not None and r.delta is not None:
            yield from blocks.delta(r.delta)  # what the parser released at the end
        yield from blocks.close()
        reason, sequence = stop_reason(r, self.tokenizer, self.stops)
        yield {"type": "message_delta", "delta": {"stop_reason": reason,
                                                  "stop_sequence": sequence},
               "usage": {"output_tokens": gen.stats.completion_tokens}}
        yield {"type": "message_stop"}


class Blocks:
    """Content block events out of text and tool-call deltas: one block open at a time."""

    def __init__(self):
        self.index = -1
        self.open: str | None = None  # "text" | "tool_use"

    def _start(self, block: dict):
        yield from self.close()
        self.index += 1
        self.open = block["type"]
        yield {"type": "content_block_start", "index": self.index, "content_block": block}

    def close(self):
        if self.open is not None:
            self.open = None
            yield {"type": "content_block_stop", "index": self.index}

    def text(self, text: str):
        if not text:
            return
        if self.open != "text":
            yield from self._start({"type": "text", "text": ""})
        yield {"type": "content_block_delta", "index": self.index,
               "delta": {"type": "text_delta", "text": text}}

    def delta(self, delta):
        yield from self.text(delta.content)
        for entry in delta.calls:
            if "id" in entry:  # a call's head
                yield from self._start({"type": "tool_use", "id": tool_use_id(entry["id"]),
                                        "name": entry["function"]["name"], "input": {}})
            fragment = entry["function"].get("arguments")
            if fragment:
                yield {"type": "content_block_delta", "index": self.index,
                       "delta": {"type": "input_json_delta", "partial_json": fragment}}


@bp.post("/messages")
@route("Create a message (Anthropic's Messages API)", body=MESSAGES, tag="Anthropic",
       errors="anthropic", streams=True, query=BETA)
def create_message(body):
    req = parse_messages(body, current_app.extensions["numbalm"].config.max_tokens_cap)
    gen = begin(req)
    shaper = Shaper(gen)
    if req.stream:
        return stream(gen, sse_lines(shaper.events(), gen.check, error=error_body, named=True,
                                     done=False))
    return jsonify(complete(gen, shaper.whole))


@bp.post("/messages/count_tokens")
@route("Count a message's input tokens (Anthropic's)", body=COUNT_TOKENS, tag="Anthropic",
       errors="anthropic", query=BETA)
def count_tokens(body):
    req = conversation(body)
    served = current_app.extensions["numbalm"].pool.get(req.model, need="chat")
    return jsonify({"input_tokens": chat_prompt_tokens(req, served.llm)})
