"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure."""

from __future__ import annotations

import logging

from flask import Flask, g, jsonify
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


def error_response(err: APIError):
    response = jsonify(err.body())
    response.status_code = err.status
    response.headers.update(err.headers)
    return response


def _http_error(e: HTTPException):
    """Werkzeug's own errors (404 route, 405, 413, ...) in OpenAI's shape."""
    messages = {
        404: "Unknown route; see /v1/models, /v1/chat/completions, /v1/completions.",
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
