"""Per-request plumbing: request ids, API keys, CORS, access logs and HTTP metrics."""

from __future__ import annotations

import hmac
import logging
import math
import re
import secrets
import time

from flask import Flask, current_app, g, request

from server.http.errors import APIError
from server.http.logs import request_id

access_log = logging.getLogger("numbalm.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
OPEN_ROUTES = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")
OPEN_PREFIX = "/ui"  # the web page's static files (it sends the API key it is given)
EXPOSED_HEADERS = ", ".join(["X-Request-Id", "Retry-After"] + [
    f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset")
    for kind in ("requests", "tokens")])


def _start_request():
    incoming = request.headers.get("X-Request-Id", "")
    g.request_id = incoming if REQUEST_ID.match(incoming) else "req_" + secrets.token_hex(12)
    request_id.set(g.request_id)
    g.start = time.perf_counter()
    g.access = {}
    current_app.extensions["numbalm"].metrics.in_flight.inc()


def _open_route() -> bool:
    """Routes that need no API key (and count against no rate limit); /metrics too unless
    --metrics-auth."""
    if request.path == "/metrics":
        return not current_app.extensions["numbalm"].config.metrics_auth
    return (request.path in OPEN_ROUTES or request.path == OPEN_PREFIX
            or request.path.startswith(OPEN_PREFIX + "/"))


def _check_api_key():
    keys = current_app.extensions["numbalm"].config.api_keys
    g.api_key = None
    if not keys or request.method == "OPTIONS" or _open_route():
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        given = request.headers.get("X-Api-Key", "")  # Anthropic's clients send this one
    if not given.strip():
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer "
                       "YOUR_KEY' (or 'x-api-key: YOUR_KEY').", code="missing_api_key")
    given_bytes = given.strip().encode()
    # Compare against every key, each in constant time, so timing says nothing about which.
    matches = [hmac.compare_digest(given_bytes, k.encode()) for k in keys]
    if not any(matches):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    g.api_key = keys[matches.index(True)]


def _check_rate_limits():
    """Take this request from its client's buckets (server/http/ratelimit.py), or 429."""
    rt = current_app.extensions["numbalm"]
    limits = rt.rate_limits
    g.rate_clients = None
    if not limits.enabled or request.method == "OPTIONS" or _open_route():
        return
    address = request.remote_addr or "-"
    key = g.get("api_key")
    g.rate_clients = clients = {"key": "key:" + key if key else "address:" + address,
                                "address": address}
    refused = limits.admit(clients)
    if refused:
        rt.metrics.rate_limited.labels(refused.scope, refused.kind).inc()
        retry = max(1, math.ceil(refused.retry_after))
        per = "API key" if refused.scope == "key" and key else "client address"
        raise APIError(429, f"Rate limit reached for {refused.kind} per minute ({refused.limit} "
                       f"per {per}); retry in {retry} s.", code="rate_limit_exceeded",
                       headers={"Retry-After": str(retry)})


def _allowed_origin() -> str | None:
    origins = current_app.extensions["numbalm"].config.cors_origins
    origin = request.headers.get("Origin")
    if not origin or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def _preflight():
    """Answer a CORS preflight before auth (browsers send no credentials with it)."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    response = current_app.make_default_options_response()
    response.status_code = 204
    if _allowed_origin():
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Authorization, Content-Type")
        response.headers["Access-Control-Max-Age"] = "600"
    return response


def _finish_response(response):
    response.headers["X-Request-Id"] = g.request_id
    if g.get("rate_clients"):
        response.headers.update(
            current_app.extensions["numbalm"].rate_limits.headers(g.rate_clients))
    origin = _allowed_origin()
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        response.vary.add("Origin")
    record = dict(request_id=g.request_id, method=request.method, path=request.path,
                  route=request.url_rule.rule if request.url_rule else "unmatched",
                  status=response.status_code, remote=request.remote_addr, start=g.start,
                  access=g.access, rate_clients=g.get("rate_clients"))
    rt = current_app.extensions["numbalm"]
    response.call_on_close(lambda: _log_request(rt, record))
    return response


def _log_request(rt, r: dict) -> None:
    """Runs when the response is closed, i.e. after the last byte of a stream too."""
    metrics = rt.metrics
    elapsed = time.perf_counter() - r["start"]
    metrics.in_flight.dec()
    metrics.requests.labels(r["method"], r["route"], str(r["status"])).inc()
    metrics.latency.labels(r["route"]).observe(elapsed)
    fields = {"method": r["method"], "path": r["path"], "status": r["status"],
              "duration_ms": round(elapsed * 1000, 1), "remote": r["remote"]}
    access = r["access"]
    stats = access.get("stats")
    if r["rate_clients"]:
        used = access.get("prompt_tokens", 0) + (stats.completion_tokens if stats else 0)
        rt.rate_limits.charge(r["rate_clients"], used)
    if stats is not None:
        fields.update(model=access["model"], stream=access["stream"],
                      prompt_tokens=access["prompt_tokens"],
                      completion_tokens=stats.completion_tokens)
    token = request_id.set(r["request_id"])
    try:
        access_log.info("%s %s %s", r["method"], r["path"], r["status"],
                        extra={"fields": fields, "request_id": r["request_id"]})
    finally:
        request_id.reset(token)


def init_app(app: Flask) -> None:
    app.before_request(_start_request)
    app.before_request(_preflight)
    app.before_request(_check_api_key)
    app.before_request(_check_rate_limits)
    app.after_request(_finish_response)
