"""Shared fixtures: the real models, loaded once per session (see tests/helpers.py)."""

from __future__ import annotations

import pytest

from tests.helpers import model_path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


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
