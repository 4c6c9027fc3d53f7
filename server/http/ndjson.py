"""Newline-delimited JSON: the body of a streamed response in Ollama's API.

    {chunk}\n {chunk}\n … {final chunk, "done": true}\n

A stream that breaks off says so in-band with one `{"error": message}` line (the status line
is long gone), as Ollama does. The body is an `server.http.sse.EventStream`, which holds the
request's admission slot until waitress closes it.
"""

from __future__ import annotations

import json
import logging

from server.http.errors import APIError

log = logging.getLogger("numbalm.server")
MIMETYPE = "application/x-ndjson"


def line(payload: dict) -> bytes:
    return (json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def ndjson_lines(events, check=None):
    """Events as NDJSON lines, or an error line where the stream breaks off. `check` (the
    request's StopCheck, if any) names a timeout or shutdown that cut the stream."""
    try:
        for event in events:
            yield line(event)
        if check is not None and check.reason in ("timeout", "shutdown"):
            yield line({"error": check.error().message})
    except APIError as e:
        yield line({"error": e.message})
    except Exception:  # noqa: BLE001 - the status line is gone; tell the client in-band
        log.exception("error while streaming")
        yield line({"error": "Internal server error while streaming."})
