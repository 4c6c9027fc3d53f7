"""The repacked weights of a model, kept on disk so that a load maps them instead of repacking.

The fast backend runs on weights repacked into 16-row groups (kernels/qpack.py), ~1-2 s of
NumPy for Gemma-3 270M at every start. The first load writes the result here; later loads
memory-map it (`np.memmap`, copy-on-write: the arrays are writeable, as the kernels were
compiled for, and the pages are shared with the page cache), so they cost a header read and
a checksum, and the pages come in as the first forward pass reads them.

Where: `<model cache>/repacked/` (engine.registry.cache_dir, so $NUMBALM_HOME moves it too;
`NUMBALM_REPACK_CACHE=<directory>` puts it elsewhere, e.g. beside a read-only model cache),
one file per model file:

    <sha256 of the GGUF>.repack       a registered model (the registry knows its sha256);
                                      `numbalm model rm` deletes it with the model
    path-<sha256 of its path>.repack  a .gguf given by path (one file per path: a changed
                                      file rebuilds it in place, nothing piles up)

A file is trusted only when it describes the same GGUF file and the same packed layout
(`identity`: the registry's sha256, or for a bare path its size, mtime_ns and the sha256 of
its header, which holds every tensor's name, type, shape and offset; plus
`kernels.qpack.LAYOUT_VERSION` and this module's FORMAT_VERSION), its size is the one its
index records (a truncated file fails), its index passes its CRC-32, and each array passes
its own CRC-32 (~0.1 s for 250 MB, in a thread while the GGUF header is parsed and the
tokenizer built: `for_file` opens it before the parse, `match` then binds it). Anything else
is a miss: the weights are repacked and the file is rewritten. A file is written to a
`.part` beside it, flushed to disk and renamed into place, so a killed process leaves at most
a `.part`, which no reader opens (and a later writer removes once it is an hour old).
A cache directory that cannot be written (read-only, full) means no cache: a log line.
Weights under MIN_BYTES (tiny test models) are not cached, and writing a cache also removes
those of .gguf paths that no longer exist.
`NUMBALM_REPACK_CACHE=0`, or `load_model(..., repack_cache=False)`, turns it off. It is the
one thing a load writes: serving from a read-only model cache stays read-only (it repacks).

File layout (little-endian):

    HEADER   magic b"NBREPACK", u32 FORMAT_VERSION, u32 CRC-32 of the index, u64 index bytes
    index    JSON: {"identity": {...}, "data_bytes": n, "entries": {key: [array, ...]}},
             an array {"qtype", "n_out", "n_in", "layout", "dtype", "shape", "offset",
             "nbytes", "crc"}: one PackedWeight (`data` for a layout, else `dense`)
    data     from the first multiple of ALIGN after the index: the arrays, each at a
             multiple of ALIGN (`offset` counts from the start of the data)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from kernels import qpack
from kernels.qpack import PackedWeight

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the file layout below; kernels.qpack.LAYOUT_VERSION covers the bytes
MAGIC = b"NBREPACK"
HEADER = struct.Struct("<8sIIQ")  # magic, format version, index crc32, index length
ALIGN = 64  # array offsets: a cache line, so the kernels' 64-byte loads stay aligned
PART_MAX_AGE = 3600.0  # seconds: an older .part was left by a process that died
MIN_BYTES = 8 * 2**20  # smaller repacked weights take milliseconds to make: not cached
ENV = "NUMBALM_REPACK_CACHE"


OFF = ("0", "false", "no", "off")
ON = ("", "1", "true", "yes", "on")


def enabled(option: bool | None = None) -> bool:
    """The load_model option if given, else $NUMBALM_REPACK_CACHE (on unless 0/false/no/off)."""
    if option is not None:
        return bool(option)
    return os.environ.get(ENV, "").strip().lower() not in OFF


def cache_folder(root: str | os.PathLike | None = None) -> Path:
    """The directory $NUMBALM_REPACK_CACHE names, else `repacked/` in the model cache `root`
    (default: engine.registry.cache_dir())."""
    named = os.environ.get(ENV, "").strip()
    if named.lower() not in ON + OFF:
        return Path(named).expanduser()
    if root is None:
        from .registry import cache_dir

        root = cache_dir()
    return Path(root) / "repacked"


def cache_path(gguf_path: str, sha256: str | None = None,
               root: str | os.PathLike | None = None) -> Path:
    """Where the repacked weights of `gguf_path` live (module docstring)."""
    if sha256:
        return cache_folder(root) / f"{sha256.lower()}.repack"
    where = os.path.realpath(gguf_path).encode("utf-8", "surrogateescape")
    return cache_folder(root) / f"path-{hashlib.sha256(where).hexdigest()[:32]}.repack"


def file_identity(gf, sha256: str | None = None) -> dict:
    """What the cache must have been made from. With the registry's sha256 the content is
    known; for a bare path: size, mtime_ns and a hash of the header (tensor names, types,
    shapes, offsets), cheap and enough to catch a replaced or rewritten file."""
    ident = {"format": FORMAT_VERSION, "layout": qpack.LAYOUT_VERSION}
    if sha256:
        return {**ident, "sha256": sha256.lower()}
    st = os.stat(gf.path)
    header = _read_head(gf.path, gf.data_offset)
    return {**ident, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "header_sha256": hashlib.sha256(header).hexdigest()}


def _read_head(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


class RepackCache:
    """The repacked weights of one model file: `get` what an earlier load wrote, `put` what
    had to be repacked; `close` writes a new file when anything was missing."""

    def __init__(self, path: Path, sha256: str | None = None, source: str = ""):
        self.path = path
        self.sha256 = sha256  # the registry's, if the model is registered
        self.source = source  # the .gguf path, for clearing caches of deleted files
        self.identity: dict | None = None  # the model file's (`match`)
        self.entries: dict[str, list[PackedWeight]] = {}  # what `close` would write, in order
        self.missed = 0
        self._found: dict[str, list[dict]] = {}  # key -> its arrays' index records
        self._found_identity: dict | None = None
        self._map: np.ndarray | None = None
        self._checked: Future | None = None  # -> set of keys whose arrays failed their CRC
        self._stop = False  # tells the checksum thread its work is not wanted
        self._told = False  # the checksum failures were logged
        self._open()

    @classmethod
    def for_file(cls, gguf_path: str, sha256: str | None = None,
                 option: bool | None = None) -> RepackCache | None:
        """The cache of the .gguf file at `gguf_path`, or None when it is off. It is opened
        (and its checksums start in a thread) before the model file is parsed, which they
        then overlap; `match` binds it to the parsed file before any `get`."""
        if not enabled(option):
            return None
        return cls(cache_path(gguf_path, sha256), sha256, os.path.realpath(gguf_path))

    def match(self, gf) -> None:
        """Bind the cache to the parsed model file `gf` (engine.gguf_file.GGUFFile): weights
        made from another file or another layout are dropped (and rewritten at `close`)."""
        self.identity = file_identity(gf, self.sha256)
        if self._found and self._found_identity != self.identity:
            log.info("repacked weights %s were made from another file or layout; repacking",
                     self.path)
            self._stop = True
            self._found = {}

    # -- reading ------------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            index = self._read_index()
            if index is None:
                return
            # copy-on-write: writeable arrays (as the kernels were compiled for) whose pages
            # are the page cache's; a plain ndarray view, as Numba dispatches an np.memmap
            # more slowly
            self._map = np.asarray(np.memmap(self.path, dtype=np.uint8, mode="c"))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # damaged
            log.warning("repacked weights %s are unusable (%s); repacking", self.path, e)
            return
        self._found = index["entries"]
        self._found_identity = index["identity"]
        pool = ThreadPoolExecutor(1, thread_name_prefix="repack-crc")
        self._checked = pool.submit(self._check_arrays)  # zlib.crc32 releases the GIL
        pool.shutdown(wait=False)

    def _read_index(self) -> dict | None:
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                raise ValueError("truncated header")
            magic, version, crc, n = HEADER.unpack(head)
            if magic != MAGIC:
                raise ValueError("not a repack cache file")
            if version != FORMAT_VERSION:
                log.info("repacked weights %s are format %d, not %d; repacking", self.path,
                         version, FORMAT_VERSION)
                return None
            if n > size:
                raise ValueError("truncated index")
            raw = f.read(n)
        if len(raw) != n or zlib.crc32(raw) != crc:
            raise ValueError("index checksum mismatch")
        index = json.loads(raw)
        index["start"] = start = _aligned(HEADER.size + n)
        if start + index["data_bytes"] != size:
            raise ValueError(f"{size} bytes, its index says {start + index['data_bytes']}")
        for arrays in index["entries"].values():
            for a in arrays:
                if not all(type(a[k]) is int for k in ("offset", "nbytes", "crc")):
                    raise ValueError("an array record is not numbers")
                a["offset"] += start  # from the start of the file
                if not (start <= a["offset"] and 0 <= a["nbytes"] <= size - a["offset"]):
                    raise ValueError("an array lies outside the file")
        return index

    def _check_arrays(self) -> set[str]:
        bad = set()
        for key, arrays in self._found.items():
            for a in arrays:
                if self._stop:
                    return bad
                if zlib.crc32(self._map[a["offset"]:a["offset"] + a["nbytes"]]) != a["crc"]:
                    bad.add(key)
        return bad

    def get(self, key: str) -> list[PackedWeight] | None:
        """The weights stored under `key` (views of the mapped file), or None: not there,
        or damaged. The caller checks that they have the shapes it expects."""
        assert self.identity is not None, "match the cache to its model file first"
        arrays = self._found.get(key)
        if arrays is None or key in self._bad():
            return None
        try:
            weights = [self._weight(a) for a in arrays]
        except (KeyError, TypeError, ValueError, IndexError):  # a record that makes no sense
            return None
        self.entries[key] = weights  # kept if the file is rewritten
        return weights

    def _bad(self) -> set[str]:
        bad = self._checked.result() if self._checked is not None else set()
        if bad and not self._told:
            self._told = True
            log.warning("repacked weights %s: %d entries fail their checksum; repacking them",
                        self.path, len(bad))
        return bad

    def _weight(self, a: dict) -> PackedWeight:
        dtype = np.dtype(a["dtype"])
        shape = tuple(a["shape"])
        if dtype.itemsize * int(np.prod(shape, dtype=np.int64)) != a["nbytes"]:
            raise ValueError("array size")
        arr = self._map[a["offset"]:a["offset"] + a["nbytes"]].view(dtype).reshape(shape)
        w = PackedWeight(a["qtype"], a["n_out"], a["n_in"], a["layout"])
        if w.layout >= 0:
            if dtype != np.uint8 or arr.size != w.n_groups * (w.n_in // w.blk) * w.block_bytes:
                raise ValueError("packed size")
            w.data = arr
        else:
            if dtype != np.float32 or shape != (w.n_out, w.n_in):
                raise ValueError("dense shape")
            w.dense = arr
        w.qtype = GGMLQuantizationType(w.qtype)
        return w

    # -- writing ------------------------------------------------------------------------------

    def put(self, key: str, weights: list[PackedWeight]) -> None:
        """Weights that were repacked because `get` had none: written at `close`."""
        self.entries[key] = weights
        self.missed += 1

    def close(self) -> None:
        """Write the cache file if anything was repacked; any failure only logs."""
        if self._checked is not None:
            self._checked.result()
        if not self.missed:
            return
        total = sum(w.nbytes for ws in self.entries.values() for w in ws)
        if total < MIN_BYTES:
            return
        try:
            self._write()
        except OSError as e:
            log.info("repacked weights not cached (%s: %s); the next load repacks again",
                     self.path.parent, e.strerror or e)

    def _write(self) -> None:
        started = time.perf_counter()
        records, arrays, offset = {}, [], 0
        for key, weights in self.entries.items():
            records[key] = []
            for w in weights:
                arr = w.data if w.data is not None else w.dense
                records[key].append({"qtype": int(w.qtype), "n_out": w.n_out, "n_in": w.n_in,
                                     "layout": w.layout, "dtype": arr.dtype.str,
                                     "shape": list(arr.shape), "offset": offset,
                                     "nbytes": arr.nbytes, "crc": zlib.crc32(arr)})
                arrays.append(arr)
                offset += _aligned(arr.nbytes)
        index = {"identity": self.identity, "source": self.source, "data_bytes": offset,
                 "entries": records}
        raw = json.dumps(index).encode()
        start = _aligned(HEADER.size + len(raw))
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(folder)
        fd, part = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(raw), len(raw)))
                f.write(raw)
                f.write(b"\0" * (start - f.tell()))
                for arr in arrays:
                    f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
                    f.write(b"\0" * (_aligned(arr.nbytes) - arr.nbytes))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(part, 0o644)  # mkstemp's 0600 would hide it from other users of the cache
            os.replace(part, self.path)
        except BaseException:
            _unlink(part)
            raise
        log.info("repacked weights cached in %s (%.0f MB, %.2f s)", self.path,
                 (start + offset) / 2**20, time.perf_counter() - started)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_leftovers(folder: Path) -> None:
    """.part files an hour old (left by a process killed while writing; a live writer's is
    younger), and the caches of .gguf paths that no longer exist."""
    now = time.time()
    for p in folder.glob("*.part"):
        try:
            if now - p.stat().st_mtime > PART_MAX_AGE:
                p.unlink()
        except OSError:
            pass
    for p in folder.glob("path-*.repack"):
        source = _source_of(p)
        if source is not None and not os.path.exists(source):
            _unlink(p)


def _source_of(path: Path) -> str | None:
    """The .gguf path a cache file was made from (None: unreadable)."""
    try:
        with open(path, "rb") as f:
            magic, _, crc, n = HEADER.unpack(f.read(HEADER.size))
            raw = f.read(n) if magic == MAGIC and n < 2**26 else b""
        return json.loads(raw)["source"] if raw and zlib.crc32(raw) == crc else None
    except (OSError, ValueError, KeyError, struct.error):
        return None


def remove(root: str | os.PathLike, sha256: str | None, gguf_path: str) -> bool:
    """Delete a model's repacked weights from the model cache `root` (`numbalm model rm`):
    those made under its sha256 (`sha256` None: another entry still has those bytes) and
    those made when its file was loaded by path. True if there were any."""
    paths = [cache_path(gguf_path, None, root)] + ([cache_path("", sha256, root)] if sha256
                                                    else [])
    removed = False
    for path in paths:
        try:
            path.unlink()
            removed = True
        except FileNotFoundError:
            pass
    return removed
