"""A loopback cluster for the deploy tests: `numbalm serve` replicas, Debian's nginx with the
repo's config in front, and a steady streaming load through it.

Replicas run as operators run them: the model cache and the code are mounted read-only (a
private mount namespace per replica, `unshare --mount`, which needs root), and the JIT cache is
a writable directory of its own (NUMBA_CACHE_DIR). Everything listens on 127.0.0.1 only; every
wait is bounded.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers import free_port, unavailable

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "numbalm.conf"
MODEL = "smollm2-135m-instruct"
COLD_START_SECONDS = 240  # the first replica compiles every kernel (~20 s alone, more when busy)
START_SECONDS = 60
# Small and bounded: the machine is shared. One compute thread per replica (3 on 2 cores).
REPLICA_OPTIONS = ["--compute-threads", "1", "--max-concurrent", "4", "--queue-size", "8",
                   "--kv-cache-mb", "64", "--shutdown-grace", "20"]


def nginx_binary() -> str:
    """Debian's nginx (`make deploy-tools` installs it), or skip/fail."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None)
    if not found:
        unavailable("nginx is not installed; run `make deploy-tools` (as root, with apt-get)")
    return found


def require_readonly_mounts(tmp: Path) -> None:
    """Replicas see the caches read-only through `unshare --mount`; skip/fail without it."""
    probe = tmp / "ro-probe"
    probe.mkdir(exist_ok=True)
    script = 'mount --bind -o ro "$1" "$1" && ! touch "$1/x" 2>/dev/null'
    try:
        ok = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(probe)],
                            capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        unavailable("read-only bind mounts need root and `unshare --mount` (util-linux)")


# ---------------------------------------------------------------------------------------------
# Replicas


class Replica:
    """One `numbalm serve` process on 127.0.0.1:port, with `readonly` paths mounted read-only."""

    def __init__(self, name: str, port: int, env: dict, readonly: list[Path], logs: Path):
        self.name, self.port, self.env, self.readonly, self.logs = name, port, env, readonly, logs
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def command(self) -> list[str]:
        mounts = " && ".join(f'mount --bind -o ro "{p}" "{p}"' for p in self.readonly)
        serve = [sys.executable, "-m", "server.cli", "serve", "-m", MODEL,
                 "--host", "127.0.0.1", "--port", str(self.port), *REPLICA_OPTIONS]
        # unshare execs sh, which execs python: the Popen pid is the server's own
        return ["unshare", "--mount", "sh", "-c", mounts + ' && exec "$@"', "sh", *serve]

    def start(self) -> None:
        self.starts += 1
        log = open(self.logs / f"{self.name}.{self.starts}.log", "w")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float) -> float:
        """Seconds from now until /readyz says 200; fails if the process dies or time runs out."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}: "
                                     f"{self.last_log()}")
            if self.ready():
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready after {timeout} s: {self.last_log()}")

    def generations_in_flight(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=2).text
        match = re.search(r"^numbalm_generations_in_flight (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def wait_busy(self, timeout: float = 20) -> None:
        """Until at least one generation runs here (so a signal lands mid-stream)."""
        deadline = time.monotonic() + timeout
        while self.generations_in_flight() < 1:
            assert time.monotonic() < deadline, f"{self.name} got no work in {timeout} s"
            time.sleep(0.05)

    def signal(self, sig: int) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def mount_options(self, path: Path) -> list[str]:
        """The options of the mount at `path` as this replica sees it (its own namespace)."""
        for line in Path(f"/proc/{self.proc.pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == str(path):
                return fields[5].split(",")
        return []

    def last_log(self, lines: int = 15) -> str:
        path = self.logs / f"{self.name}.{self.starts}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ---------------------------------------------------------------------------------------------
# nginx


def nginx_config(tmp: Path, listen: int, ports: list[int]) -> Path:
    """The repo's deploy/nginx/numbalm.conf with loopback addresses, in a top-level config
    whose pid, logs and temp files are under `tmp` and which runs in the foreground."""
    conf = NGINX_CONF.read_text()
    conf, n_servers = re.subn(
        r"^(\s*)server numbalm:8080(.*);$",
        lambda m: "\n".join(f"{m.group(1)}server 127.0.0.1:{p}{m.group(2)};" for p in ports),
        conf, flags=re.M)
    conf, n_listen = re.subn(r"^(\s*)listen 8080;$", rf"\1listen 127.0.0.1:{listen};", conf,
                             flags=re.M)
    assert (n_servers, n_listen) == (1, 1), "deploy/nginx/numbalm.conf changed shape"
    (tmp / "numbalm.conf").write_text(conf)
    temp = "\n".join(f"    {kind}_temp_path {tmp}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    top = tmp / "nginx.conf"
    top.write_text(f"""daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;
events {{ worker_connections 512; }}
http {{
{temp}
    include {tmp}/numbalm.conf;
}}
""")
    return top


class Nginx:
    """nginx in the foreground, a child of the test; its access log (JSON lines) is its
    stdout, which the config sends to /dev/stdout."""

    def __init__(self, tmp: Path, ports: list[int]):
        self.tmp = tmp
        self.port = free_port()
        self.conf = nginx_config(tmp, self.port, ports)
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = tmp / "nginx-access.log"
        self.proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        return [nginx_binary(), "-p", str(self.tmp), "-e", str(self.tmp / "nginx-error.log"),
                "-c", str(self.conf)]

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.args() + ["-t"], capture_output=True, text=True, timeout=30)

    def start(self) -> None:
        with open(self.access_log, "w") as out:
            self.proc = subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.tmp / "nginx-error.log").read_text()
            try:
                httpx.get(self.url + "/healthz", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("nginx did not start")

    def log(self) -> dict[str, dict]:
        """Access-log records by request id."""
        records = {}
        for line in self.access_log.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                records[record["request_id"]] = record
        return records

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Result:
    """One streamed chat completion through nginx."""

    id: str
    start: float
    end: float = 0.0
    first_token: float | None = None
    ok: bool = False
    error: str = ""
    upstream: str = ""  # from nginx's log: the replica(s) tried, e.g. "127.0.0.1:1, 127.0.0.1:2"
    upstream_status: str = ""

    @property
    def served_by(self) -> str:
        """The port of the replica that gave the answer (the last one nginx tried)."""
        return self.upstream.split(",")[-1].strip().rsplit(":", 1)[-1]


def stream_once(client: httpx.Client, url: str, rid: str, n: int, max_tokens: int) -> Result:
    result = Result(rid, time.monotonic())
    body = {"model": MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0.8,
            "seed": n, "messages": [{"role": "user", "content": f"Say something about {n}."}]}
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body,
                           headers={"X-Request-Id": rid}) as r:
            if r.status_code != 200:
                r.read()
                result.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return result
            done = False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                elif '"error"' in data:
                    result.error = data[:200]
                elif result.first_token is None and '"content"' in data:
                    result.first_token = time.monotonic()
            result.ok = done and not result.error
            if not done and not result.error:
                result.error = "stream ended without [DONE]"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.end = time.monotonic()
    return result


@dataclass
class Load:
    """`clients` threads streaming chat completions through `url` back to back."""

    url: str
    clients: int = 4
    max_tokens: int = 12
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _client(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(60, connect=5)) as client:
            while not self._stop.is_set():
                with self._lock:
                    self._count += 1
                    n = self._count
                result = stream_once(client, self.url, f"load-{n}", n, self.max_tokens)
                with self._lock:
                    self.results.append(result)

    def attach_log(self, nginx: Nginx) -> list[Result]:
        """Fill each result's upstream from nginx's log; returns the results sorted by start."""
        time.sleep(0.2)  # nginx writes a line when the response ends
        log = nginx.log()
        for r in self.results:
            record = log.get(r.id, {})
            r.upstream, r.upstream_status = record.get("upstream", ""), record.get(
                "upstream_status", "")
        return sorted(self.results, key=lambda r: r.start)
