"""Server-sent events: the body of a streamed response.

    data: {chunk}\n\n … data: [DONE]\n\n

`EventStream` holds the request's admission slot until waitress closes the body (after the
last chunk, or when a write failed because the client has gone).
"""

from __future__ import annotations

import json
import logging

from server.http.errors import APIError

log = logging.getLogger("numbalm.server")


def sse(payload, named: bool = False) -> bytes:
    """One event: a JSON payload (or a bare string such as "[DONE]") as a `data:` line; with
    `named`, after an `event:` line naming the payload's "type" (Anthropic's and the
    Responses API's streams, whose SDKs dispatch on it)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False,
                                                               separators=(",", ":"))
    if named and isinstance(payload, dict):
        return f"event: {payload['type']}\ndata: {data}\n\n".encode()
    return f"data: {data}\n\n".encode()


def sse_lines(events, check, *, error=APIError.body, named: bool = False, done: bool = True):
    """Events as SSE lines, an error event if the stream breaks off, then `[DONE]` (unless
    `done` is false: Anthropic's and the Responses API's streams have no such end marker).

    `check` is the request's StopCheck: a stream cut by a timeout or a shutdown says so
    in-band (the status line is long gone); a client that has gone gets nothing more.
    `error` turns an APIError into the protocol's error event (or a list of events).
    """
    def failed(err: APIError):
        out = error(err)
        return b"".join(sse(e, named) for e in (out if isinstance(out, list) else [out]))

    try:
        for event in events:
            yield sse(event, named)
        if check.reason in ("timeout", "shutdown"):
            yield failed(check.error())
    except APIError as e:
        yield failed(e)
    except Exception:  # noqa: BLE001 - the status line is gone; tell the client in-band
        log.exception("error while streaming")
        yield failed(APIError(500, "Internal server error while streaming."))
    if done and check.reason != "disconnect":
        yield sse("[DONE]")


class EventStream:
    """The body of a streamed response; it holds the admission slot until the server closes it
    (after the last chunk, or when the client has gone and a write failed)."""

    def __init__(self, chunks, check, on_close):
        self.chunks = chunks
        self.check = check
        self.on_close = on_close
        self.finished = self.closed = False

    def __iter__(self):
        yield from self.chunks
        self.finished = True

    def close(self):
        if not self.closed:
            self.closed = True
            if not self.finished and self.check.reason is None:
                self.check.reason = "disconnect"  # a write failed: the client has gone
            self.chunks.close()  # stops the engine's generator where it is
            self.on_close()
