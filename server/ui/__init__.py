"""`/ui`: a web page for chatting with a model and looking inside its forward pass.

Plain HTML, JavaScript and CSS in `static/`, served as they are (no build step, nothing
fetched from elsewhere, so it works offline). The page is a client of the HTTP API like any
other: it streams replies from `/v1/chat/completions` and asks `/v1/trace` for the inspector
(docs/inspect.md says how to read each view). Its files are open to all, as the page holds no
secret; the API key a user types in is sent with the page's API calls.
"""

from __future__ import annotations

import os

from flask import Blueprint, redirect, send_from_directory

STATIC = os.path.join(os.path.dirname(__file__), "static")
bp = Blueprint("ui", __name__, url_prefix="/ui")


@bp.get("")
def slash():
    return redirect("/ui/", code=308)


@bp.get("/")
def index():
    return send_from_directory(STATIC, "index.html", max_age=0)


@bp.get("/<path:name>")
def static_file(name: str):
    return send_from_directory(STATIC, name, max_age=0)  # a 404 for what is not there
