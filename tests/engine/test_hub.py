"""Pulling by Hugging Face name (engine.hub) from a local stand-in for the hub (HF_ENDPOINT),
and the progress a pull prints, on a terminal and off it."""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pexpect
import pytest

from engine import hub
from engine.errors import RegistryError
from engine.registry import Registry
from server.cli import main
from tests.engine.test_registry import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
FILES = ["SmolThing-Q4_K_M.gguf", "SmolThing-Q8_0.gguf", "mmproj-SmolThing-f16.gguf",
         "README.md"]


class Hub:
    """The two routes numbalm reads: the model API's file list and resolve/main downloads."""

    def __init__(self, payload: bytes, files=FILES, slow: bool = False):
        self.payload, self.files, self.paths = payload, files, []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub_.paths.append(self.path)
                if self.path == "/api/models/owner/repo":
                    body = json.dumps({"id": "owner/repo", "siblings": [
                        {"rfilename": f} for f in hub_.files]}).encode()
                elif self.path.startswith("/owner/repo/resolve/main/") and \
                        self.path.endswith(".gguf"):
                    body = hub_.payload
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = max(1, len(body) // 8) if slow else len(body)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    if slow:
                        threading.Event().wait(0.15)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload(tmp_path):
    return write_tiny_gguf(tmp_path / "payload.gguf", n_vocab=256).read_bytes()


@pytest.fixture
def local_hub(payload, monkeypatch, tmp_path):
    server = Hub(payload)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NUMBALM_HOME", str(tmp_path / "home"))
    yield server
    server.close()


@pytest.mark.parametrize("name, path", [
    ("hf.co/owner/repo", "/owner/repo/resolve/main/SmolThing-Q4_K_M.gguf"),  # the default
    ("hf.co/owner/repo:q8_0", "/owner/repo/resolve/main/SmolThing-Q8_0.gguf"),
    ("huggingface.co/owner/repo:Q8_0", "/owner/repo/resolve/main/SmolThing-Q8_0.gguf"),
    ("owner/repo/SmolThing-Q8_0.gguf", "/owner/repo/resolve/main/SmolThing-Q8_0.gguf"),
    ("hf.co/owner/repo/sub/x.gguf", "/owner/repo/resolve/main/sub/x.gguf"),
])
def test_names_resolve_to_the_hubs_download_urls(local_hub, name, path):
    assert hub.is_hub_name(name)
    assert hub.resolve(name) == local_hub.url + path


def test_what_is_not_a_hub_name():
    assert not hub.is_hub_name("smollm2") and not hub.is_hub_name("./a/b/c.gguf")
    assert not hub.is_hub_name("http://example.com/m.gguf")


def test_a_quant_the_repo_lacks_lists_its_files(local_hub):
    with pytest.raises(RegistryError, match="no Q5_K_S file; its GGUF files: "
                                            "SmolThing-Q4_K_M.gguf, SmolThing-Q8_0.gguf"):
        hub.resolve("hf.co/owner/repo:Q5_K_S")
    with pytest.raises(RegistryError, match="HTTP 404.*no such repo"):
        hub.resolve("hf.co/owner/missing")


def test_pull_by_hf_name_downloads_and_registers(local_hub, payload, tmp_path):
    reg = Registry()
    entry, changed = reg.pull("hf.co/owner/repo:Q8_0")
    assert changed and entry.id == "smolthing-q8_0" and entry.stored == "cache"
    assert Path(entry.path).read_bytes() == payload
    assert entry.source == local_hub.url + "/owner/repo/resolve/main/SmolThing-Q8_0.gguf"
    assert reg.pull("hf.co/owner/repo:Q8_0") == (entry, False)


def test_pull_progress_off_a_terminal_is_one_line_per_file(local_hub, payload, capsys):
    assert main(["model", "pull", "hf.co/owner/repo"]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0].startswith("hf.co/owner/repo: " + local_hub.url)
    assert lines[1].startswith(f"SmolThing-Q4_K_M.gguf: {len(payload) / 1e6:.1f} MB in ")
    assert len(lines) == 2 and "\r" not in err
    assert out.startswith("smolthing-q4_k_m: pulled")


@pytest.mark.slow
def test_pull_progress_on_a_terminal_draws_a_bar_to_100(tmp_path):
    big = write_tiny_gguf(tmp_path / "big.gguf", n_vocab=256).read_bytes()
    big += b"\0" * (2_000_000 - len(big) % 32)  # padding after the tensors: still valid
    server = Hub(big, slow=True)
    env = dict(os.environ, HF_ENDPOINT=server.url, NUMBALM_HOME=str(tmp_path / "home"))
    try:
        child = pexpect.spawn(sys.executable, ["-m", "server.cli", "model", "pull",
                                               "hf.co/owner/repo:Q8_0"], cwd=str(ROOT),
                              env=env, encoding="utf-8", timeout=120)
        child.expect(pexpect.EOF)
        text = child.before
    finally:
        server.close()
    frames = [f for f in text.split("\r") if f.startswith("SmolThing-Q8_0.gguf ")]
    assert len(frames) >= 3, text
    assert "MB/s" in frames[1] and "ETA" in frames[1]
    assert " 100% " in frames[-1] and "ETA" not in frames[-1]
    assert "smolthing-q8_0: pulled" in text
