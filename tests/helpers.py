"""Helpers the tests share: the real models (through the registry) and the golden data.

`make test` pulls the models into the cache first (`make models`) and installs the tools the
deploy tests run (`make deploy-tools`). Outside CI a missing model or tool skips the tests that
need it; in CI (CI=true) it fails them, so a broken set-up can never pass as a green run.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
MODEL_IDS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m",
             "minilm": "all-minilm-l6-v2"}


def model_path(key: str) -> str:
    """The real model file for `key` ("smollm2" or "gemma3"), or skip/fail the test."""
    from engine.errors import EngineError
    from engine.registry import resolve_model_path

    try:
        return resolve_model_path(MODEL_IDS[key])
    except EngineError as e:
        unavailable(f"model {MODEL_IDS[key]} is not in the registry ({e}); run `make models`")


def unavailable(message: str):
    """Something a test needs is missing (a model, a tool `make test` installs): skip it, but
    fail it in CI (CI=true), where the set-up should have provided it."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_data(name: str):
    with open(DATA / name, encoding="utf-8") as f:
        return json.load(f)


def chat_body(**extra) -> dict:
    """A minimal chat-completions body for the fake model, with `extra` fields."""
    return {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], **extra}
