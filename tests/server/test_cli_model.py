"""`numbalm model ...` end to end through server.cli.main, on a tiny GGUF in a temp cache."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from server.cli import main


def write_tiny_gguf(path, chat_template=None):
    """A small valid llama GGUF (a few KB)."""
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(64)])
    if chat_template:
        w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBALM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NUMBALM_VERBOSE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf", chat_template="{{ messages }}")


def run(capsys, *argv):
    code = main(["model", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_list_inspect_verify_rm(capsys, tiny, home):
    code, out, _ = run(capsys, "add", str(tiny), "--id", "t", "--name", "Tiny")
    assert code == 0 and "t: added, referenced in place" in out

    code, out, _ = run(capsys, "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "ARCH", "PARAMS"]
    assert out.splitlines()[1].split()[:2] == ["t", "llama"] and "reference" in out

    code, out, _ = run(capsys, "list", "--json")
    [entry] = json.loads(out)
    assert entry["id"] == "t" and entry["name"] == "Tiny" and entry["path"] == str(tiny)

    code, out, _ = run(capsys, "inspect", "t", "--json")
    info = json.loads(out)
    assert code == 0 and info["tensor_count"] == 1 and info["quant_mix"] == {"F32": 1}
    assert info["vocab_size"] == 64 and info["context_length"] == 128
    assert info["chat_template"] is True and info["parameter_count"] == 64 * 32
    assert info["metadata"]["tokenizer.ggml.tokens"].startswith("[64 items:")
    # one tensor only: numbalm cannot run it, and says why
    assert info["supported"] is False and "missing tensor" in info["refused"]

    code, out, _ = run(capsys, "inspect", str(tiny))  # a path works too
    assert code == 0 and "architecture:     llama" in out and "chat_template:    True" in out

    code, out, _ = run(capsys, "verify", "t")
    assert code == 0 and "OK" in out

    code, out, _ = run(capsys, "rm", "t")
    assert code == 0 and "left in place" in out and tiny.exists()
    assert json.loads(run(capsys, "list", "--json")[1]) == []


def test_add_copy_and_rm_deletes_the_cached_file(capsys, tiny, home):
    code, out, _ = run(capsys, "add", str(tiny), "--copy")
    assert code == 0 and "copied into the cache" in out
    cached = home / "models" / "tiny.gguf"
    assert cached.exists()
    code, out, _ = run(capsys, "rm", "tiny")
    assert code == 0 and "deleted" in out and not cached.exists() and tiny.exists()


def test_verify_mismatch_exits_nonzero(capsys, tiny):
    run(capsys, "add", str(tiny))
    data = bytearray(tiny.read_bytes())
    data[-1] ^= 1
    tiny.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", "tiny")
    assert code != 0 and "MISMATCH" in err and "expected" in err and "actual" in err


@pytest.mark.parametrize("argv, message", [
    (["inspect", "nope"], "no model 'nope'"),
    (["verify", "nope"], "no model 'nope'"),
    (["rm", "nope"], "no model 'nope'"),
    (["add", "/no/such/file.gguf"], "no such file"),
    (["add", "ftp://example.com/x.gguf"], "only http"),
    (["add", "http://127.0.0.1:9/x.gguf"], "cannot connect"),
    (["pull", "not-a-model"], "not a catalog model"),
])
def test_user_mistakes_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code != 0 and message in err
    assert err.count("\n") == 1 and err.startswith("numbalm: error:")


def test_corrupt_gguf_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(write_tiny_gguf(tmp_path / "ok.gguf").read_bytes()[:300])
    code, _, err = run(capsys, "add", str(bad))
    assert code != 0 and "bad.gguf" in err and "truncated" in err and err.count("\n") == 1


def test_verbose_shows_the_traceback(capsys):
    code = main(["--verbose", "model", "inspect", "nope"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" in err and "ModelNotFoundError" in err


def test_pull_a_path_twice(capsys, tiny):
    code, out, _ = run(capsys, "pull", str(tiny))
    assert code == 0 and "pulled" in out
    code, out, _ = run(capsys, "pull", str(tiny))
    assert code == 0 and "already present" in out


def test_numbalm_model_help_says_referenced(home):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "model", "add", "--help"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0 and "referenced, not copied" in proc.stdout
    assert "--copy" in proc.stdout


def test_inspect_shows_architecture_capabilities_and_features(capsys):
    from tests.arch_models import DATA

    code, out, _ = run(capsys, "inspect", str(DATA / "phi3.q8_0.gguf"))
    assert code == 0 and "architecture:     phi3" in out and "supported:        True" in out
    # the tiny phi3 file has no chat template: a base model, which does not chat
    assert "capabilities:     completion, embeddings" in out
    assert "rope scaling longrope" in out and "attention.sliding_window = 16" in out


def test_list_says_which_models_chat(capsys, tmp_path):
    write_tiny_gguf(tmp_path / "chat.gguf", chat_template="{{ messages }}")
    write_tiny_gguf(tmp_path / "base.gguf")
    for name in ("chat", "base"):
        assert run(capsys, "add", str(tmp_path / f"{name}.gguf"), "--id", name)[0] == 0
    code, out, _ = run(capsys, "list")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert rows["chat"][6] == "chat,completion,embeddings"
    assert rows["base"][6] == "completion,embeddings"
    assert "base: no chat template (a base model): use `numbalm generate`" in out
    _, out, _ = run(capsys, "list", "--json")
    assert {e["id"]: e["capabilities"] for e in json.loads(out)}["base"] == [
        "completion", "embeddings"]
