"""Server fixtures: apps around the fake model, a live waitress server, an openai client."""

from __future__ import annotations

import sys
from pathlib import Path

# `tests/` is on sys.path (rootdir-relative imports), so `import server` could resolve to the
# namespace package `tests/server` when pytest is run as `.venv/bin/pytest`; the repo wins.
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import openai  # noqa: E402
import pytest  # noqa: E402
from fake_engine import FakeModel  # noqa: E402

from server import ModelPool, create_app  # noqa: E402
from server.http.wsgi import ServerThread  # noqa: E402


@pytest.fixture
def model():
    return FakeModel()


@pytest.fixture
def make_app(model):
    """make_app(models=None, **config) -> a Flask app serving the fake model(s)."""

    def make(models=None, aliases=None, **config):
        pool = ModelPool.from_models(models or [model], aliases=aliases)
        return create_app(config, pool=pool)

    return make


@pytest.fixture
def app(make_app):
    return make_app(aliases={"gpt-4o-mini": "fake-model"})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def serve():
    """serve(app) -> base URL of waitress running `app` on a free loopback port."""
    servers = []

    def start(app) -> str:
        server = ServerThread(app).__enter__()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live(app, serve):
    return serve(app)


@pytest.fixture
def oai(live):
    return openai.OpenAI(base_url=live + "/v1", api_key="sk-test", max_retries=0, timeout=20)


def chat_body(**extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], **extra}
