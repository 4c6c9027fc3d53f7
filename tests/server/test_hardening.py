"""Refusals made before the app sees a request, and log lines a client or a model file
cannot break: waitress's own errors in OpenAI's JSON shape, control characters escaped."""

from __future__ import annotations

import json
import logging
import socket
from urllib.parse import urlparse

import httpx

from server.http.logs import JsonFormatter, TextFormatter


def raw_request(url: str, data: bytes, read_body: bool = True) -> tuple[int, dict, bytes]:
    """Send bytes as they are on a fresh connection; (status, headers, body) of the answer."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before the body is all sent
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def test_a_body_far_over_the_limit_is_json_413_from_waitress(make_app, serve):
    url = serve(make_app(max_body_size=1000))  # waitress itself refuses above ~1 MB here
    size = 8 * 2**20
    status, headers, body = raw_request(url, (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n").encode() + b"{" + b" " * 65536)
    assert status == 413
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"


def test_a_chunked_body_far_over_the_limit_is_json_413(make_app, serve):
    url = serve(make_app(max_body_size=1000))
    chunk = b"%x\r\n%s\r\n" % (2**20, b"x" * 2**20)
    status, headers, body = raw_request(url, (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk * 6))
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_a_broken_chunked_body_is_json_400(make_app, serve):
    url = serve(make_app())
    status, headers, body = raw_request(url, (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nnot hex\r\n0\r\n\r\n"))
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_just_over_the_limit_is_the_apps_413(make_app, serve):
    url = serve(make_app(max_body_size=1000))
    r = httpx.post(url + "/v1/chat/completions", content=b"{" + b" " * 5000 + b"}",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def _record(message: str, *args, **fields) -> logging.LogRecord:
    record = logging.LogRecord("numbalm.access", logging.INFO, __file__, 1, message, args, None)
    record.fields = fields
    record.request_id = "req\n1"
    return record


FORGED = "/v1/models\n2026-01-01 00:00:00 INFO numbalm.access [x] GET /admin 200\x1b[2K\u202e"


def test_text_log_lines_escape_control_characters():
    line = TextFormatter().format(_record("%s %s", "GET", FORGED, path=FORGED, model="m\r\n"))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u202e" not in line
    assert "/v1/models\\n2026-01-01" in line and "\\x1b[2K\\u202e" in line
    assert "model=m\\r\\n" in line and "[req\\n1]" in line


def test_json_log_lines_stay_one_line():
    line = JsonFormatter().format(_record("%s", FORGED, path=FORGED))
    assert "\n" not in line and json.loads(line)["path"] == FORGED


def test_a_traceback_still_spans_lines():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed\nhere", (),
                                   sys.exc_info())
    text = TextFormatter().format(record)
    first, *rest = text.split("\n")
    assert first.endswith("failed\\nhere") and "Traceback" in rest[0]


def test_a_lone_surrogate_in_json_is_text_not_a_500(client):
    body = b'{"model": "fake-model", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = client.post("/v1/chat/completions", data=body, content_type="application/json")
    assert r.status_code == 200, r.get_data()
    line = TextFormatter().format(_record("%s", "a\ud800b"))
    assert line.endswith("a\\ud800b")
    line.encode("utf-8")  # a log stream can write it
