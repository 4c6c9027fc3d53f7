"""The OpenAPI 3.1 document at `/openapi.json`, and a readable `/docs` page made from it.

Both are written from the app's own routes: every rule of the URL map is listed, and a view
documented with `server.http.schema.route` contributes its summary, its body schema (the same
object that validates the requests) and its error shape. Nothing here is written by hand per
route, so the document cannot drift from what the server does. The page is plain HTML rendered
on the server (no scripts, no assets from elsewhere), so it works offline.
"""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify, render_template_string

from engine import __version__
from server.http.errors import SHAPES
from server.http.schema import RouteDoc, route

bp = Blueprint("openapi", __name__)
METHODS = ("get", "post", "put", "patch", "delete")
CONVERTER = re.compile(r"<(?:(\w+):)?(\w+)>")


def _path(rule: str) -> tuple[str, list[dict]]:
    """A Werkzeug rule → the OpenAPI path and its path parameters."""
    params = [{"name": name, "in": "path", "required": True,
               "schema": {"type": "integer" if conv == "int" else "string"}}
              for conv, name in CONVERTER.findall(rule)]
    return CONVERTER.sub(lambda m: "{" + m.group(2) + "}", rule), params


def _operation(view, endpoint: str, method: str, params: list[dict]) -> dict:
    api: RouteDoc = getattr(view, "api", None) or RouteDoc(
        (view.__doc__ or view.__name__).strip().splitlines()[0])
    shape = api.errors if api.errors in SHAPES else "openai"
    error = {"$ref": f"#/components/schemas/{shape}_error"}
    success = {api.response: {}}
    if api.streams:
        success[api.stream_media] = {}
    op: dict = {
        "operationId": f"{method}_{endpoint.replace('.', '_')}",
        "summary": api.summary,
        "tags": [api.tag],
        "responses": {
            "200": {"description": "Success.", "content": success},
            "4XX": {"description": "The request cannot be served as sent.",
                    "content": {"application/json": {"schema": error}}},
            "5XX": {"description": "The server cannot serve it now (503: not ready, busy, "
                    "shutting down; retry).",
                    "content": {"application/json": {"schema": error}}},
        },
    }
    if api.description:
        op["description"] = api.description
    query = [{"name": name, "in": "query", "required": False, "schema": s.json_schema()}
             for name, s in api.query.items()]
    if params or query:
        op["parameters"] = params + query
    if api.body is not None and method in ("post", "put", "patch"):
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": api.body.json_schema()}}}
    return op


def document(app) -> dict:
    """The OpenAPI 3.1 document of every route `app` serves."""
    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        path, params = _path(rule.rule)
        for method in sorted(m.lower() for m in rule.methods or ()):
            if method in METHODS:
                paths.setdefault(path, {})[method] = _operation(view, rule.endpoint, method,
                                                                  params)
    schemas = {f"{name}_error": shape.schema for name, shape in SHAPES.items()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "numbalm", "version": __version__,
                 "description": "numbalm's HTTP API: OpenAI's and Anthropic's protocols, "
                 "tokenization, and the operations routes. Generated from the request "
                 "schemas the server validates with."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "x_api_key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        # Keys are checked only when the server has some (--api-key); either header works.
        "security": [{}, {"bearer": []}, {"x_api_key": []}],
    }


@bp.get("/openapi.json")
@route("This document: OpenAPI 3.1 for every route", tag="Operations")
def openapi_json():
    return jsonify(document(current_app))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>numbalm API</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; }
code, .t { font-family: ui-monospace, monospace; font-size: 13px; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2.5rem; }
.op { margin: 1.2rem 0; } .m { font-weight: bold; text-transform: uppercase; }
ul.f { margin: .2rem 0 .2rem 1rem; padding-left: 1rem; } .t { color: #555; } .d { color: #333; }
</style></head><body>
<h1>numbalm API <small>{{ doc.info.version }}</small></h1>
<p>{{ doc.info.description }} The machine-readable form is
<a href="/openapi.json">/openapi.json</a>.</p>
{% macro fields(schema) %}{% if schema.properties %}<ul class="f">
{% for name, f in schema.properties.items() %}<li><code>{{ name }}</code>{%
 if name in (schema.required or []) %} <b>required</b>{% endif %}
 <span class="t">{{ kind(f) }}</span> <span class="d">{{ f.description or "" }}</span>
 {{ fields(f) }}{% if f.items %}{{ fields(f.items) }}{% endif %}</li>
{% endfor %}</ul>{% endif %}{% endmacro %}
{% for tag, ops in groups %}<h2>{{ tag }}</h2>
{% for path, method, op in ops %}<div class="op"><span class="m">{{ method }}</span>
<code>{{ path }}</code> — {{ op.summary }}
{% if op.description %}<p>{{ op.description }}</p>{% endif %}
{% if op.requestBody %}{{ fields(op.requestBody.content["application/json"].schema) }}{% endif %}
</div>{% endfor %}{% endfor %}
</body></html>"""


def _kind(schema: dict) -> str:
    """A field's type and limits, in one short line."""
    if "anyOf" in schema:
        return " | ".join(_kind(s) for s in schema["anyOf"])
    t = schema.get("type", "any")
    text = " | ".join(t) if isinstance(t, list) else t
    if "enum" in schema:
        text += " (" + ", ".join(map(str, schema["enum"])) + ")"
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is not None or hi is not None:
        text += f" [{'' if lo is None else lo}..{'' if hi is None else hi}]"
    if "default" in schema:
        text += f", default {schema['default']}"
    return text


@bp.get("/docs")
@route("This API as a readable page (offline)", tag="Operations", response="text/html")
def docs():
    doc = document(current_app)
    groups: dict[str, list] = {}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            groups.setdefault(op["tags"][0], []).append((path, method, op))
    return render_template_string(PAGE, doc=doc, groups=list(groups.items()), kind=_kind)
