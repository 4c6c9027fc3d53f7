"""OpenAI's Responses API: `POST /v1/responses` (whole or streamed), and for stored responses
`GET /v1/responses/{id}`, `DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`.

A reply becomes output items: a `message` with one `output_text` part, or one `function_call`
per tool call (`id` fc_..., `call_id` call_...). A reply cut by `max_output_tokens` has status
`incomplete` with `incomplete_details.reason`. The stream is OpenAI's event sequence, each event
with a `sequence_number` and its name on an `event:` line:

    response.created, response.in_progress,
    per item: response.output_item.added,
      message: response.content_part.added, response.output_text.delta..., .done,
               response.content_part.done
      call:    response.function_call_arguments.delta..., .done
    response.output_item.done; then response.completed (or .incomplete), or on an error
    `error` and response.failed.

`store` (default true) keeps the response in `server.serving.response_store`, so
`previous_response_id` continues it, after a restart too.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify, request

from server.http.errors import APIError
from server.http.generate import begin, complete, stream
from server.http.schema import Integer, String, route
from server.http.sse import sse_lines
from server.openai.responses_requests import RESPONSES, parse_responses
from server.openai.shapes import Shaper as ChatShaper
from server.serving.generation import cached_tokens, is_sampled, run_choice
from server.serving.ids import new_id

bp = Blueprint("v1_responses", __name__, url_prefix="/v1")


def _runtime():
    return current_app.extensions["numbalm"]


def not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.",
                    param="response_id", code="response_not_found")


class Shaper:
    """One response's objects and stream events; the sequence number counts every event."""

    def __init__(self, gen, body: dict, items: list[dict], history: list[dict]):
        self.gen, self.body, self.items, self.history = gen, body, items, history
        self.id = new_id("resp_")
        self.created = int(time.time())
        self.seq = 0
        self.chat = ChatShaper(gen.plan)  # token logprobs as chat has them
        self.output: list[dict] = []
        self.store = _runtime().responses  # the stream runs outside the app context

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def response(self, status: str, error=None) -> dict:
        b, r = self.body, self.gen.results[0] if self.gen.results else None
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        fmt = (b["text"] or {}).get("format") or {"type": "text"}
        out = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": error, "incomplete_details": incomplete, "instructions": b["instructions"],
            "max_output_tokens": b["max_output_tokens"], "model": self.gen.served.id,
            "output": self.output, "parallel_tool_calls": b["parallel_tool_calls"] is not False,
            "previous_response_id": b["previous_response_id"], "reasoning": None,
            "store": b["store"], "temperature": b["temperature"], "text": {"format": fmt},
            "tool_choice": b["tool_choice"] or "auto", "tools": b["tools"] or [],
            "top_p": b["top_p"], "truncation": b["truncation"] or "disabled",
            "user": b["user"], "metadata": b["metadata"] or {}, "usage": None,
        }
        if status in ("completed", "incomplete") and r is not None:
            n_in, n_out = self.gen.plan.prompt_tokens, self.gen.stats.completion_tokens
            out["usage"] = {"input_tokens": n_in, "output_tokens": n_out,
                            "total_tokens": n_in + n_out,
                            "input_tokens_details": {
                                "cached_tokens": cached_tokens(self.gen.plan, self.gen.results)},
                            "output_tokens_details": {"reasoning_tokens": 0}}
        return out

    def _status(self) -> str:
        return "incomplete" if self.gen.results[0].finish_reason == "length" else "completed"

    def _logprobs(self, tokens) -> list:
        if self.gen.plan.req.logprobs is None:
            return []
        return [self.chat.chat_logprob(t.id, t.logprob, t.top_logprobs) for t in tokens]

    # --- items ----------------------------------------------------------------------------

    @staticmethod
    def message_item(item_id: str, text: str, status: str, logprobs=None) -> dict:
        content = [] if text is None else [
            {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": content}

    @staticmethod
    def call_item(item_id: str, call, status: str, arguments: str | None = None) -> dict:
        return {"type": "function_call", "id": item_id, "call_id": call["id"],
                "name": call["name"], "arguments": call["arguments"] if arguments is None
                else arguments, "status": status}

    def whole(self, results) -> dict:
        r = results[0]
        status = self._status()
        item_status = "incomplete" if status == "incomplete" else "completed"
        if r.parser is not None and r.parser.calls:
            self.output = [self.call_item(new_id("fc_"), {"id": c.id, "name": c.name,
                                                          "arguments": c.arguments},
                                          item_status) for c in r.parser.calls]
        else:
            text = r.parser.content if r.parser is not None else r.text
            self.output = [self.message_item(new_id("msg_"), text, item_status,
                                             self._logprobs(r.tokens))]
        body = self.response(status)
        self.save(body)
        return body

    def save(self, body: dict) -> None:
        if self.body["store"]:
            self.store.put(body, self._with_ids(self.items),
                                     self.history + self.items + self.output)

    def _with_ids(self, items):
        return [{**item, "id": item.get("id") or new_id("msg_" if item["type"] == "message"
                                                        else "fc_")} for item in items]

    # --- the stream -------------------------------------------------------------------------

    def events(self):
        gen, r = self.gen, self.gen.results[0]
        yield self._event("response.created", response=self.response("in_progress"))
        yield self._event("response.in_progress", response=self.response("in_progress"))
        items = Items(self)
        for tok in run_choice(r, gen.stats):
            logprobs = self._logprobs([tok]) if is_sampled(tok) else []
            if r.parser is None:
                yield from items.text(tok.text, logprobs)
            elif r.delta is not None:
                yield from items.delta(r.delta, logprobs)
        if gen.check.reason or r.finish_reason == "cancelled":
            return
        if r.parser is not None and r.delta is not None:
            yield from items.delta(r.delta, [])
        status = self._status()
        yield from items.close("incomplete" if status == "incomplete" else "completed")
        body = self.response(status)
        self.save(body)
        yield self._event("response.completed" if status == "completed"
                          else "response.incomplete", response=body)

    def error(self, err: APIError) -> list[dict]:
        """A stream that breaks off: the `error` event, then `response.failed`."""
        error = self._event("error", code=err.code, message=err.message, param=err.param)
        failed = self.response("failed", {"code": err.code or "server_error",
                                          "message": err.message})
        return [error, self._event("response.failed", response=failed)]


class Items:
    """Output item events out of text and tool-call deltas: one item open at a time."""

    def __init__(self, shaper: Shaper):
        self.s = shaper
        self.open: dict | None = None   # the item being written
        self.text_so_far = ""
        self.logprobs: list = []

    def _index(self) -> int:
        return len(self.s.output) - 1

    def _added(self, item: dict):
        yield from self.close("completed")
        self.s.output.append(item)
        self.open = item
        yield self.s._event("response.output_item.added", output_index=self._index(),
                            item=item)

    def text(self, text: str, logprobs: list):
        if not text and not logprobs:
            return
        if self.open is None or self.open["type"] != "message":
            item = Shaper.message_item(new_id("msg_"), None, "in_progress")
            yield from self._added(item)
            self.text_so_far, self.logprobs = "", []
            yield self.s._event("response.content_part.added", item_id=item["id"],
                                output_index=self._index(), content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []})
        self.text_so_far += text
        self.logprobs += logprobs
        yield self.s._event("response.output_text.delta", item_id=self.open["id"],
                            output_index=self._index(), content_index=0, delta=text,
                            logprobs=logprobs)

    def delta(self, delta, logprobs: list):
        yield from self.text(delta.content, logprobs if not delta.calls else [])
        for entry in delta.calls:
            if "id" in entry:  # a call's head
                call = {"id": entry["id"], "name": entry["function"]["name"], "arguments": ""}
                yield from self._added(Shaper.call_item(new_id("fc_"), call, "in_progress"))
            fragment = entry["function"].get("arguments")
            if fragment:
                self.open["arguments"] += fragment
                yield self.s._event("response.function_call_arguments.delta",
                                    item_id=self.open["id"], output_index=self._index(),
                                    delta=fragment)

    def close(self, status: str):
        item, self.open = self.open, None
        if item is None:
            return
        index = len(self.s.output) - 1
        if item["type"] == "message":
            part = {"type": "output_text", "text": self.text_so_far, "annotations": [],
                    "logprobs": self.logprobs}
            yield self.s._event("response.output_text.done", item_id=item["id"],
                                output_index=index, content_index=0, text=self.text_so_far,
                                logprobs=self.logprobs)
            yield self.s._event("response.content_part.done", item_id=item["id"],
                                output_index=index, content_index=0, part=part)
            item["content"] = [part]
        else:
            yield self.s._event("response.function_call_arguments.done", item_id=item["id"],
                                output_index=index, name=item["name"],
                                arguments=item["arguments"])
        item["status"] = status
        yield self.s._event("response.output_item.done", output_index=index, item=item)


@bp.post("/responses")
@route("Create a response (OpenAI's Responses API)", body=RESPONSES, tag="OpenAI",
       streams=True)
def create_response(body):
    rt = _runtime()
    history = []
    if body["previous_response_id"]:
        stored = rt.responses.get(body["previous_response_id"])
        if stored is None:
            raise not_found(body["previous_response_id"])
        history = stored[2]
    req, items = parse_responses(body, history, rt.config.max_tokens_cap)
    gen = begin(req)
    shaper = Shaper(gen, body, items, history)
    if req.stream:
        return stream(gen, sse_lines(shaper.events(), gen.check, error=shaper.error,
                                     named=True, done=False))
    return jsonify(complete(gen, shaper.whole))


@bp.get("/responses/<response_id>")
@route("Retrieve a stored response", tag="OpenAI")
def get_response(response_id: str):
    stored = _runtime().responses.get(response_id)
    if stored is None:
        raise not_found(response_id)
    return jsonify(stored[0])


@bp.delete("/responses/<response_id>")
@route("Delete a stored response", tag="OpenAI")
def delete_response(response_id: str):
    if not _runtime().responses.delete(response_id):
        raise not_found(response_id)
    return jsonify({"id": response_id, "object": "response", "deleted": True})


ORDER = String(enum=("asc", "desc"), default="desc")
LIMIT = Integer(1, 100, default=20)


@bp.get("/responses/<response_id>/input_items")
@route("List a stored response's input items", tag="OpenAI",
       query={"order": ORDER, "limit": LIMIT, "after": String()})
def list_input_items(response_id: str):
    stored = _runtime().responses.get(response_id)
    if stored is None:
        raise not_found(response_id)
    args = request.args
    order = ORDER.validate(args.get("order", "desc"), "order")
    try:
        limit = LIMIT.validate(int(args.get("limit", 20)), "limit")
    except ValueError:
        raise APIError(400, "Invalid value for 'limit': expected an integer.", param="limit",
                       code="invalid_type") from None
    items = stored[1] if order == "asc" else stored[1][::-1]
    after = args.get("after")
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return jsonify({"object": "list", "data": page,
                    "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None,
                    "has_more": len(items) > limit})
