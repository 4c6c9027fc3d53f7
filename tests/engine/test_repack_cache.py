"""engine/repack_cache.py: the fast backend's repacked weights on disk.

A cached load must give the very bytes a fresh repack gives (and so the same logits); a
damaged, truncated, stale or half-written cache must be rebuilt, never trusted; a cache that
cannot be written must only cost the cache.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import engine
from engine import repack_cache
from engine.backends.fast import FusedWeight
from engine.registry import Registry
from kernels import qpack
from tests.tiny_models import write_tiny

IDS = [1, 259, 260, 261, 100, 7]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A model cache of its own, and tiny models cached too (they are under MIN_BYTES)."""
    monkeypatch.setenv("NUMBALM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(repack_cache.ENV, raising=False)
    monkeypatch.setattr(repack_cache, "MIN_BYTES", 0)
    return tmp_path / "home"


def tiny(tmp_path, qtype=Q.Q8_0, name="tiny.gguf"):
    path = tmp_path / name
    write_tiny(path, qtype=qtype)
    return str(path)


def the_cache(home) -> list:
    return sorted((home / "repacked").glob("*.repack"))


def weights(llm) -> dict:
    """Every prepared weight of a llama model, by name: its packed bytes or dense floats."""
    out = {"output": llm.model.output}
    for i, layer in enumerate(llm.model.layers):
        for name, w in vars(layer).items():
            if isinstance(w, FusedWeight):
                for j, p in enumerate(w.weights()):
                    out[f"{i}.{name}.{j}"] = p
            elif isinstance(w, qpack.PackedWeight):
                out[f"{i}.{name}"] = w
    return out


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        x, y = wa[key], wb[key]
        assert (x.qtype, x.n_out, x.n_in, x.layout) == (y.qtype, y.n_out, y.n_in, y.layout), key
        xa = x.data if x.data is not None else x.dense
        ya = y.data if y.data is not None else y.dense
        assert xa.dtype == ya.dtype and xa.shape == ya.shape, key
        assert xa.tobytes() == ya.tobytes(), key


def mapped(arr) -> bool:
    """True when `arr` is a view of a memory-mapped file (it came from the cache)."""
    while arr is not None:
        if isinstance(arr, np.memmap):
            return True
        arr = arr.base
    return False


def from_cache(llm) -> bool:
    w = llm.model.output
    return mapped(w.data if w.data is not None else w.dense)


def load(path, **kw):
    return engine.load_model(path, backend="fast", **kw)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.F32])
def test_cached_weights_are_a_fresh_repack_byte_for_byte(home, tmp_path, qtype):
    path = tiny(tmp_path, qtype)
    fresh = load(path, repack_cache=False)
    assert not the_cache(home)
    first = load(path)  # repacks and writes the cache
    assert len(the_cache(home)) == 1 and not from_cache(first)
    second = load(path)
    assert from_cache(second)
    assert_same_weights(fresh, second)
    np.testing.assert_array_equal(fresh.logits(IDS), second.logits(IDS))
    assert [t.id for t in second.generate(IDS, max_tokens=6, temperature=0.0)] == \
        [t.id for t in fresh.generate(IDS, max_tokens=6, temperature=0.0)]


def rebuilt(home, path, damage, caplog):
    """Damage the cache file with `damage(file)`; the next load must repack (same weights as
    a fresh repack) and leave a good cache, which the load after uses."""
    fresh = load(path, repack_cache=False)
    load(path)
    (cache,) = the_cache(home)
    good = cache.read_bytes()
    damage(cache)
    with caplog.at_level(logging.INFO, logger="engine.repack_cache"):
        again = load(path)
    assert not from_cache(again)
    assert_same_weights(fresh, again)
    np.testing.assert_array_equal(fresh.logits(IDS), again.logits(IDS))
    assert cache.read_bytes() == good  # rewritten whole
    assert from_cache(load(path))
    return caplog.text


def test_truncated_cache_is_rebuilt(home, tmp_path, caplog):
    def cut(f):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    assert "unusable" in rebuilt(home, tiny(tmp_path), cut, caplog)


@pytest.mark.parametrize("where", [0, 12, 40, "data"])
def test_damaged_cache_is_rebuilt(home, tmp_path, caplog, where):
    """A flipped byte in the header, the index or the weights."""
    def flip(f):
        raw = bytearray(f.read_bytes())
        at = len(raw) - 1000 if where == "data" else where
        raw[at] ^= 0x5A
        f.write_bytes(bytes(raw))

    text = rebuilt(home, tiny(tmp_path), flip, caplog)
    assert ("checksum" in text) if where == "data" else ("unusable" in text)


def test_empty_and_garbage_cache_files_are_rebuilt(home, tmp_path, caplog):
    rebuilt(home, tiny(tmp_path), lambda f: f.write_bytes(b""), caplog)
    rebuilt(home, tiny(tmp_path), lambda f: f.write_bytes(b"NBREPACK" + b"\xff" * 100), caplog)


def test_a_cache_of_another_file_is_not_used(home, tmp_path):
    """The same path rewritten with other weights: the cache is stale and rebuilt."""
    path = tiny(tmp_path)
    load(path)
    write_tiny(path, seed=1)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime, surely
    fresh = load(path, repack_cache=False)
    again = load(path)
    assert not from_cache(again)
    assert_same_weights(fresh, again)
    assert from_cache(load(path))


def test_a_new_layout_version_invalidates(home, tmp_path, monkeypatch):
    path = tiny(tmp_path)
    load(path)
    assert from_cache(load(path))
    monkeypatch.setattr(qpack, "LAYOUT_VERSION", qpack.LAYOUT_VERSION + 1)
    assert not from_cache(load(path))  # rebuilt for the new layout...
    assert from_cache(load(path))  # ...and used from then on
    monkeypatch.undo()
    monkeypatch.setenv("NUMBALM_HOME", str(home))
    monkeypatch.setattr(repack_cache, "MIN_BYTES", 0)
    assert not from_cache(load(path))


def test_a_part_file_is_never_read(home, tmp_path):
    """A killed writer leaves `<name>.<random>.part`: readers ignore it; a writer removes it
    once it is an hour old."""
    path = tiny(tmp_path)
    load(path)
    (cache,) = the_cache(home)
    complete = cache.read_bytes()
    cache.unlink()
    young = cache.parent / (cache.name + ".young.part")
    old = cache.parent / (cache.name + ".old.part")
    young.write_bytes(complete)  # even a whole one: only a rename makes a cache
    old.write_bytes(complete[:100])
    hours_ago = time.time() - 2 * repack_cache.PART_MAX_AGE
    os.utime(old, (hours_ago, hours_ago))
    assert not from_cache(load(path))
    assert the_cache(home) == [cache] and cache.read_bytes() == complete
    assert young.exists() and not old.exists()


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_an_unwritable_cache_only_costs_the_cache(home, tmp_path, monkeypatch, caplog, err):
    path = tiny(tmp_path)
    real_fsync = os.fsync

    def fail(fd):
        real_fsync(fd)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(repack_cache.os, "fsync", fail)  # after the bytes were written
    with caplog.at_level(logging.INFO, logger="engine.repack_cache"):
        llm = load(path)
    np.testing.assert_array_equal(llm.logits(IDS), load(path, repack_cache=False).logits(IDS))
    assert "not cached" in caplog.text
    assert not list((home / "repacked").iterdir())  # no cache, no .part left behind


def test_a_cache_dir_that_cannot_exist(tmp_path, monkeypatch, caplog):
    """NUMBALM_HOME is a file (so repacked/ cannot be made), as good as a read-only mount."""
    home = tmp_path / "home"
    home.write_text("not a directory")
    monkeypatch.setenv("NUMBALM_HOME", str(home))
    monkeypatch.setattr(repack_cache, "MIN_BYTES", 0)
    path = tiny(tmp_path)
    with caplog.at_level(logging.INFO, logger="engine.repack_cache"):
        llm = load(path)
    assert "not cached" in caplog.text
    llm.logits(IDS)


def test_the_switches_turn_it_off(home, tmp_path, monkeypatch):
    path = tiny(tmp_path)
    load(path, repack_cache=False)
    assert not the_cache(home)
    monkeypatch.setenv(repack_cache.ENV, "0")
    load(path)
    assert not the_cache(home)
    assert load(path, repack_cache=True) and the_cache(home)  # the argument wins
    assert not from_cache(load(path))  # and off means not read either
    monkeypatch.setenv(repack_cache.ENV, "1")
    assert from_cache(load(path))


def test_small_models_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBALM_HOME", str(tmp_path / "home"))
    load(tiny(tmp_path))
    assert not (tmp_path / "home" / "repacked").exists()


def test_the_reference_backend_has_no_cache(home, tmp_path):
    engine.load_model(tiny(tmp_path), backend="reference")
    assert not (home / "repacked").exists()


def test_registered_model_is_keyed_by_sha256_and_rm_removes_it(home, tmp_path):
    reg = Registry()
    entry = reg.add(tiny(tmp_path), id="t", copy=True)
    load("t")
    cache = home / "repacked" / f"{entry.sha256}.repack"
    assert the_cache(home) == [cache]
    assert from_cache(load("t"))
    load(entry.path)  # by path: a cache of its own
    assert len(the_cache(home)) == 2
    reg.remove("t")
    assert not the_cache(home)


def test_caches_of_deleted_files_are_cleared(home, tmp_path):
    gone = tiny(tmp_path, name="gone.gguf")
    load(gone)
    os.unlink(gone)
    load(tiny(tmp_path, name="other.gguf"))  # writing a cache clears the orphan
    assert len(the_cache(home)) == 1


def test_a_real_model_from_the_cache_is_its_fresh_repack(gemma3_path, tmp_path, monkeypatch):
    """Gemma-3's mix: Q4_K, Q5_0, Q6_K and Q8_0 matrices, and a tied 262k-row output."""
    monkeypatch.setenv("NUMBALM_HOME", str(tmp_path))
    fresh = load(gemma3_path, repack_cache=False)
    load(gemma3_path)  # writes it
    cached = load(gemma3_path)
    assert from_cache(cached)
    assert_same_weights(fresh, cached)
    ids = fresh.tokenizer.encode("The capital of France is", add_bos=True)
    np.testing.assert_array_equal(fresh.logits(ids), cached.logits(ids))


def test_the_directory_can_be_named(home, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv(repack_cache.ENV, str(elsewhere))
    path = tiny(tmp_path)
    load(path)
    assert not (home / "repacked").exists() and len(list(elsewhere.glob("*.repack"))) == 1
    assert from_cache(load(path))


@pytest.mark.parametrize("record", [
    {"layout": 99}, {"layout": -1}, {"qtype": 12345}, {"dtype": "<f8"}, {"dtype": "nonsense"},
    {"shape": [1, 2, 3]}, {"shape": "x"}, {"offset": "0"}, {"nbytes": -5}, {"nbytes": 10**12},
    {"n_out": 17}, {"crc": None},
])
def test_a_well_sealed_index_that_lies_is_not_trusted(home, tmp_path, record):
    """An index with a right CRC but records that make no sense: repacked, never a crash."""
    import json
    import zlib

    path = tiny(tmp_path)
    fresh = load(path, repack_cache=False)
    load(path)
    (cache,) = the_cache(home)
    raw = cache.read_bytes()
    magic, version, _, n = repack_cache.HEADER.unpack_from(raw)
    index = json.loads(raw[repack_cache.HEADER.size:repack_cache.HEADER.size + n])
    for arrays in index["entries"].values():
        arrays[0].update(record)
    body = json.dumps(index).encode()
    start = -(-(repack_cache.HEADER.size + len(body)) // repack_cache.ALIGN) * repack_cache.ALIGN
    data = raw[-(-(repack_cache.HEADER.size + n) // repack_cache.ALIGN) * repack_cache.ALIGN:]
    cache.write_bytes(repack_cache.HEADER.pack(magic, version, zlib.crc32(body), len(body))
                      + body + b"\0" * (start - repack_cache.HEADER.size - len(body)) + data)
    again = load(path)
    assert_same_weights(fresh, again)
    np.testing.assert_array_equal(fresh.logits(IDS), again.logits(IDS))
