"""Errors in the shape of the route's protocol, for every failure.

OpenAI's `{"error": {"message", "type", "param", "code"}}` is the default; a route documented
with another shape (`server.http.schema.route(errors=...)`, e.g. Anthropic's `{"type": "error",
"error": {"type", "message"}}`) gets its errors in that one, auth and 404/405/413 included.
A protocol package adds its shape to `SHAPES`: a function of the APIError to the body, and
the JSON schema of that body for the OpenAPI document.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("numbalm.server")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A failure to report to the client with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ErrorShape:
    body: Callable[[APIError], dict]   # the response body for an error
    schema: dict                       # its JSON schema, for the OpenAPI document


OPENAI_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}
SHAPES: dict[str, ErrorShape] = {"openai": ErrorShape(APIError.body, OPENAI_SCHEMA)}


def _shape_name() -> str:
    """The error shape of the route this request is for (OpenAI's when none matched)."""
    endpoint = request.endpoint
    if endpoint is None and request.routing_exception is not None:
        try:  # a wrong method: the route that exists for another method decides
            methods = getattr(request.routing_exception, "valid_methods", None) or []
            adapter = current_app.url_map.bind_to_environ(request.environ)
            endpoint = adapter.match(method=methods[0])[0] if methods else None
        except HTTPException:
            endpoint = None
    view = current_app.view_functions.get(endpoint) if endpoint else None
    api = getattr(view, "api", None)
    return api.errors if api is not None else "openai"


def error_response(err: APIError):
    shape = SHAPES.get(_shape_name(), SHAPES["openai"])
    response = jsonify(shape.body(err))
    response.status_code = err.status
    response.headers.update(err.headers)
    return response


def _http_error(e: HTTPException):
    """Werkzeug's own errors (404 route, 405, 413, ...) in OpenAI's shape."""
    messages = {
        404: "Unknown route; /openapi.json lists every route (/docs as a page).",
        405: "Method not allowed for this route.",
        413: "Request body too large.",
    }
    codes = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}
    status = e.code or 500
    err = APIError(status, messages.get(status, e.description or e.name), code=codes.get(status))
    response = error_response(err)
    if status == 405 and e.valid_methods:
        response.headers["Allow"] = ", ".join(e.valid_methods)
    return response


def _unexpected(e: Exception):
    log.exception("unhandled error")
    rid = getattr(g, "request_id", "?")
    return error_response(APIError(500, f"Internal server error (request id {rid}).",
                                   code="internal_error"))


def init_app(app: Flask) -> None:
    app.register_error_handler(APIError, error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
