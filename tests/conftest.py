"""Shared fixtures: the two real models, found through the registry.

`make test` pulls both models into the cache first (`make models`). Outside CI a missing
model skips the tests that need it; in CI (CI=true) it fails them, so a broken pull can
never pass as a green run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
MODEL_IDS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m",
             "minilm": "all-minilm-l6-v2"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def model_path(key: str) -> str:
    """The real model file for `key` ("smollm2" or "gemma3"), or skip/fail the test."""
    from engine.errors import EngineError
    from engine.registry import resolve_model_path

    try:
        return resolve_model_path(MODEL_IDS[key])
    except EngineError as e:
        message = f"model {MODEL_IDS[key]} is not in the registry ({e}); run `make models`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def load_data(name: str):
    with open(DATA / name, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return model_path("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    return model_path("gemma3")


def _load(key: str, backend: str):
    import engine

    return engine.load_model(model_path(key), backend=backend)


@pytest.fixture(scope="session")
def smollm2_ref():
    return _load("smollm2", "reference")


@pytest.fixture(scope="session")
def gemma3_ref():
    return _load("gemma3", "reference")


@pytest.fixture(scope="session")
def smollm2_fast():
    return _load("smollm2", "fast")


@pytest.fixture(scope="session")
def gemma3_fast():
    return _load("gemma3", "fast")
