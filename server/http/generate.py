"""One generation request from a route's point of view, whatever its protocol: resolve the
model, plan (tokenize, check the context, fit the grammar), take an admission slot, start every
choice, and release the slot when the answer is complete or its stream is closed.

    gen = begin(req)                                # 4xx, 429 and 503 happen here
    return complete(gen, lambda results: shape(results))          # a whole answer, or
    return stream(gen, sse_lines(events(gen), gen.check))         # a stream of events

Every protocol (`server/openai`, `server/anthropic`, the Responses API) runs through these, so
sampling, grammar, cancellation on disconnect, timeouts, admission and metrics are the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Response, current_app, g, request

from server.http.errors import APIError
from server.http.sse import EventStream
from server.serving.generation import ChoiceResult, Plan, Stats, StopCheck, close, collect, plan
from server.serving.generation import start as start_choices
from server.serving.request import GenerationRequest


class Generation:
    """A planned, admitted, started request; `finish()` frees its slot (once)."""

    def __init__(self, rt, req: GenerationRequest):
        self.rt = rt
        self.served = rt.pool.get(req.model, need=req.kind)  # 400 for an embedding-only model
        self.plan: Plan = plan(req, self.served, rt.config.max_tokens_cap)
        self.stats = Stats(start=g.start)
        self.check = StopCheck(request.environ.get("waitress.client_disconnected"),
                               rt.config.request_timeout, rt.shutdown)
        self.results: list[ChoiceResult] = []
        self._finished = False

    def _begin(self) -> None:
        self.rt.admit()
        self.stats.admitted = time.perf_counter()
        try:
            self.results = start_choices(self.plan, self.check, self.stats)  # batched from now
        except APIError:
            self.rt.release()
            raise

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        close(self.results)  # a choice not read to its end (client gone, error) stops now
        self.rt.release()
        self.rt.observe(self.served.id, self.plan.prompt_tokens, self.stats)
        if self.check.reason:
            self.rt.metrics.cancelled.labels(self.check.reason).inc()


def begin(req: GenerationRequest) -> Generation:
    gen = Generation(current_app.extensions["numbalm"], req)
    g.access.update(model=gen.served.id, stream=req.stream, stats=gen.stats,
                    prompt_tokens=gen.plan.prompt_tokens)
    gen._begin()
    return gen


def complete(gen: Generation, shape: Callable[[list[ChoiceResult]], dict]) -> dict:
    """Run every choice to its end and shape the answer; the slot is freed either way."""
    try:
        collect(gen.results, gen.stats)
        if gen.check.reason:
            raise gen.check.error()
        return shape(gen.results)
    finally:
        gen.finish()


def stream(gen: Generation, chunks) -> Response:
    """A streamed answer: the slot passes to the body, which frees it when closed."""
    return Response(EventStream(chunks, gen.check, gen.finish), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
