"""Server fixtures: apps around the fake model, a live waitress server, an openai client."""

from __future__ import annotations

import openai
import pytest

from server import ModelPool, create_app
from server.http.wsgi import ServerThread
from tests.server.fake_engine import FakeModel


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
