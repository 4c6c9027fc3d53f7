"""The `/v1` Blueprint: OpenAI's models, chat completions and completions routes."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify

from server.http.generate import begin, complete, stream
from server.http.schema import route
from server.http.sse import sse_lines
from server.openai.requests import parse_chat, parse_completion
from server.openai.schemas import CHAT, COMPLETION
from server.openai.shapes import Shaper
from server.serving.generation import Stats, StopCheck, cached_tokens, is_sampled, run_choice
from server.serving.runtime import Runtime
from server.serving.toolcalls import finish_reason

log = logging.getLogger("numbalm.server")
bp = Blueprint("v1", __name__, url_prefix="/v1")


def runtime() -> Runtime:
    return current_app.extensions["numbalm"]


def _model_object(served) -> dict:
    return {"id": served.id, "object": "model", "created": served.created, "owned_by": "numbalm",
            "architecture": served.llm.architecture, "context_length": served.llm.n_ctx,
            "capabilities": served.capabilities}


@bp.get("/models")
@route("List the served models", tag="OpenAI")
def list_models():
    rt = runtime()
    return jsonify({"object": "list", "data": [_model_object(s) for s in rt.pool.list()]})


@bp.get("/models/<path:model_id>")
@route("Retrieve a served model (by id or alias)", tag="OpenAI")
def get_model(model_id: str):
    return jsonify(_model_object(runtime().pool.get(model_id)))


@bp.post("/chat/completions")
@route("Create a chat completion", body=CHAT, tag="OpenAI", streams=True)
def chat_completions(body):
    return _generate(parse_chat, body)


@bp.post("/completions")
@route("Create a text completion", body=COMPLETION, tag="OpenAI", streams=True)
def completions(body):
    return _generate(parse_completion, body)


def _generate(parse, body: dict):
    cfg = runtime().config
    req = parse(body, cfg.max_tokens_cap, cfg.max_n)
    gen = begin(req)
    if req.stream:
        events = _chat_events if req.kind == "chat" else _text_events
        shaper = Shaper(gen.plan)
        return stream(gen, sse_lines(events(gen.plan, gen.results, shaper, gen.check,
                                            gen.stats), gen.check))
    return jsonify(complete(gen, lambda results: Shaper(gen.plan).completion(
        results, gen.stats.completion_tokens, cached_tokens(gen.plan, results))))


# --- streaming --------------------------------------------------------------------------------

def _chat_events(plan, results, shaper: Shaper, check: StopCheck, stats: Stats):
    tools = plan.req.tools
    # OpenAI's first delta: content "" for a reply that will be text, null for one that will
    # be calls. Only tool_choice required or a named function makes the latter certain.
    calls_only = tools is not None and tools.choice in ("required", "function")
    for result in results:
        choice = result.index
        yield shaper.chat_chunk(choice, {"role": "assistant",
                                         "content": None if calls_only else ""})
        for tok in run_choice(result, stats):
            logprobs = shaper.chat_logprobs([tok]) if is_sampled(tok) else None
            if result.parser is not None:  # tools: content or calls, as the parser says
                chunk = shaper.delta_chunk(choice, result.delta, logprobs)
                if chunk:
                    yield chunk
            elif tok.text or (logprobs and logprobs["content"]):
                yield shaper.chat_chunk(choice, {"content": tok.text}, logprobs=logprobs)
        if check.reason or result.finish_reason == "cancelled":
            return
        finish = result.finish_reason
        if result.parser is not None:
            chunk = shaper.delta_chunk(choice, result.delta)  # released at the end
            if chunk:
                yield chunk
            finish = finish_reason(finish, result.parser.calls)
        yield shaper.chat_chunk(choice, {}, finish=finish)
    if plan.req.include_usage:
        yield shaper.usage_chunk(stats.completion_tokens, cached_tokens(plan, results))


def _text_events(plan, results, shaper: Shaper, check: StopCheck, stats: Stats):
    for result in results:
        choice, prompt = result.index, result.prompt
        offset = 0
        if plan.req.echo:
            entries = shaper.echo_entries(prompt)
            yield shaper.text_chunk(choice, prompt.text,
                                    logprobs=shaper.legacy_logprobs(entries, 0))
            offset = len(prompt.text)
        for tok in run_choice(result, stats):
            entries = [(tok.id, tok.logprob, tok.top_logprobs)] if is_sampled(tok) else []
            logprobs = shaper.legacy_logprobs(entries, offset)
            if tok.text or (logprobs and logprobs["tokens"]):
                yield shaper.text_chunk(choice, tok.text, logprobs=logprobs)
            offset += len(tok.text or "")
        if check.reason or result.finish_reason == "cancelled":
            return
        yield shaper.text_chunk(choice, "", finish=result.finish_reason)
    if plan.req.include_usage:
        yield shaper.usage_chunk(stats.completion_tokens, cached_tokens(plan, results))
