"""SIGTERM: in-flight work finishes (or is cancelled after the grace period), then exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def start(delay: float, grace: float):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.server.fake_serve", str(port),
                             str(delay), str(grace)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not start: {proc.communicate()[1]}")


def stream_in_background(url: str, max_tokens: int):
    """Start a streamed completion; returns (started event, list of SSE data lines)."""
    started, lines = threading.Event(), []

    def run():
        body = {"prompt": "x", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    started.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(10)
    return thread, lines


def test_sigterm_drains_in_flight_stream():
    proc, url = start(delay=0.02, grace=10)
    thread, lines = stream_in_background(url, max_tokens=40)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    assert httpx.get(url + "/readyz").status_code == 503
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
    thread.join(10)
    assert lines[-1] == "[DONE]"
    assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(10) == 0


def test_sigterm_cancels_after_the_grace_period():
    proc, url = start(delay=0.05, grace=0.3)
    thread, lines = stream_in_background(url, max_tokens=400)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    thread.join(10)
    assert json.loads(lines[-2])["error"]["code"] == "server_shutting_down"
    assert proc.wait(10) == 0 and time.monotonic() - t0 < 5
    _, err = proc.communicate()
    assert "cancelling in-flight" in err
