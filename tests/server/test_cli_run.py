"""`numbalm run`, `ps`, `show` and `--version` on tiny models and the fake server."""

from __future__ import annotations

import pytest

from engine import __version__
from server.cli import main
from tests.engine.test_hub import Hub
from tests.tiny_models import write_tiny


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBALM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"numbalm {__version__}"


def test_run_answers_one_prompt_with_a_base_model(tmp_path, capsys):
    path = str(write_tiny(tmp_path / "base.gguf"))
    code = main(["run", path, "a", "b", "--backend", "reference", "--temperature", "0",
                 "--max-tokens", "3"])
    assert code == 0 and capsys.readouterr().out.endswith("\n")


def test_run_pulls_a_missing_model_first(tmp_path, monkeypatch, capsys):
    hub = Hub(write_tiny(tmp_path / "t.gguf").read_bytes(), files=["T-Q8_0.gguf"])
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        code = main(["run", "hf.co/owner/repo", "a", "--backend", "reference",
                     "--max-tokens", "2"])
    finally:
        hub.close()
    err = capsys.readouterr().err
    assert code == 0 and "pulling hf.co/owner/repo" in err and "T-Q8_0.gguf: " in err
    assert main(["model", "list"]) == 0 and "t-q8_0" in capsys.readouterr().out


def test_show_a_base_model(tmp_path, capsys):
    path = str(write_tiny(tmp_path / "base.gguf"))
    assert main(["show", path]) == 0
    out = capsys.readouterr().out
    assert "architecture      llama" in out and "capabilities      completion, embeddings" in out
    assert "none (a base model" in out


def test_ps_reads_a_running_server(make_app, serve, capsys):
    url = serve(make_app())
    assert main(["ps", "--server", url]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["NAME", "SIZE", "CONTEXT"]
    assert "fake-model" in out and "requests: 0 running (of 8), 0 waiting (of 8)" in out


def test_ps_without_a_server_is_one_line(capsys):
    assert main(["ps", "--server", "http://127.0.0.1:9"]) == 1
    assert "no numbalm server at http://127.0.0.1:9" in capsys.readouterr().err
