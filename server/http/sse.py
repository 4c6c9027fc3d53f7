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


def sse(payload) -> bytes:
    """One event: a JSON payload (or a bare string such as "[DONE]") as a `data:` line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False,
                                                               separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def sse_lines(events, check):
    """Events as SSE lines, an error event if the stream breaks off, then `[DONE]`.

    `check` is the request's StopCheck: a stream cut by a timeout or a shutdown says so
    in-band (the status line is long gone); a client that has gone gets nothing more.
    """
    try:
        for event in events:
            yield sse(event)
        if check.reason in ("timeout", "shutdown"):
            yield sse(check.error().body())
    except APIError as e:
        yield sse(e.body())
    except Exception:  # noqa: BLE001 - the status line is gone; tell the client in-band
        log.exception("error while streaming")
        yield sse(APIError(500, "Internal server error while streaming.").body())
    if check.reason != "disconnect":
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
