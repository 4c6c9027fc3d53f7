"""`numbalm generate` and `numbalm chat` end to end, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest


def numbalm(*args, input=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], input=input,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_generate_says_paris(smollm2_path, backend):
    r = numbalm("generate", "-m", "smollm2-135m-instruct", "The capital of France is",
                "--temperature", "0", "--max-tokens", "4", "--backend", backend)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris.")


def test_chat_answers_with_the_chatml_template(smollm2_path):
    r = numbalm("chat", "-m", "smollm2", "--temperature", "0", "--max-tokens", "24",
                input="What is 2+2?\n")
    assert r.returncode == 0, r.stderr
    assert "4" in r.stdout
    assert "<|im_start|>" not in r.stdout and "<|im_end|>" not in r.stdout


def test_unknown_model_is_one_line_and_nonzero():
    r = numbalm("generate", "-m", "no-such-model", "hi")
    assert r.returncode != 0
    assert r.stderr.strip().startswith("numbalm: error:")
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
