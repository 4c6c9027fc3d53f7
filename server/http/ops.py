"""Operations routes: liveness, readiness and Prometheus metrics (open without an API key)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.http.schema import route

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
@route("Liveness: the process answers HTTP", tag="Operations")
def healthz():
    """Alive: the process answers HTTP."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@route("Readiness: models loaded and warmed up, not draining", tag="Operations")
def readyz():
    """Ready: models loaded and warmed up (kernels compiled), and not shutting down."""
    rt = current_app.extensions["numbalm"]
    status = "draining" if rt.draining else rt.pool.status
    body = {"status": status, "models": [s.id for s in rt.pool.list()]}
    response = jsonify(body)
    if not rt.ready:
        response.status_code = 503
        response.headers["Retry-After"] = "5"
    return response


@bp.get("/metrics")
@route("Prometheus metrics", tag="Operations", response="text/plain")
def metrics():
    rt = current_app.extensions["numbalm"]
    return Response(generate_latest(rt.metrics.registry), mimetype=CONTENT_TYPE_LATEST)
