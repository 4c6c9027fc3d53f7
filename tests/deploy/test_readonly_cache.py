"""A model cache shared by replicas: mounted read-only, and maybe at another path than the one
it was filled at. Serving reads it; only pull/add/rm write, and they say why they cannot."""

from __future__ import annotations

import shutil
import subprocess
import sys

from engine.registry import Registry
from tests.deploy.cluster import ROOT, require_readonly_mounts
from tests.tiny_models import write_tiny


def test_a_cache_mounted_elsewhere_still_resolves_its_own_files(tmp_path):
    filled = Registry(tmp_path / "filled-here")
    entry = filled.add(str(write_tiny(tmp_path / "tiny.gguf")), id="tiny", copy=True)
    assert entry.stored == "cache"
    moved = shutil.move(filled.root, tmp_path / "mounted-there")
    path = Registry(moved).resolve("tiny")
    assert path == str(moved / "models" / "tiny.gguf")
    assert Registry(moved).verify("tiny")[1] == entry.sha256


def readonly_run(readonly, *args, env=None):
    """`python -m server.cli ARGS` with `readonly` mounted read-only (its own namespace)."""
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(readonly),
                           sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_read_only_cache_serves_lookups_and_refuses_changes_clearly(tmp_path):
    require_readonly_mounts(tmp_path)
    cache = Registry(tmp_path / "cache")
    cache.add(str(write_tiny(tmp_path / "tiny.gguf")), id="tiny", copy=True)
    env = {"NUMBALM_HOME": str(cache.root), "PATH": "/usr/bin:/bin"}

    listed = readonly_run(cache.root, "model", "list", env=env)
    assert listed.returncode == 0 and "tiny" in listed.stdout
    pulled = readonly_run(cache.root, "model", "pull", "tiny", env=env)  # here: no write
    assert pulled.returncode == 0, pulled.stderr
    for args in (["model", "rm", "tiny"],
                 ["model", "add", str(tmp_path / "tiny.gguf"), "--id", "other", "--copy"]):
        refused = readonly_run(cache.root, *args, env=env)
        assert refused.returncode == 1, refused.stderr
        assert f"cannot write the model cache {cache.root}" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert (cache.root / "models" / "tiny.gguf").is_file()


def test_serve_refuses_a_jit_cache_it_cannot_write(tmp_path):
    require_readonly_mounts(tmp_path)
    jit = tmp_path / "jit"
    jit.mkdir()
    result = readonly_run(jit, "serve", "--port", "0", env={"NUMBA_CACHE_DIR": str(jit),
                                                           "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert f"NUMBA_CACHE_DIR={jit} is not writable" in result.stderr


def test_warmup_only_loads_and_warms_the_models_then_exits(tmp_path):
    tiny = write_tiny(tmp_path / "tiny.gguf")
    run = [sys.executable, "-m", "server.cli", "serve", "--warmup-only", "--backend",
           "reference", "--port", "1"]
    done = subprocess.run(run + ["-m", str(tiny)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warmed up" in done.stderr and "serving on" not in done.stderr
    missing = subprocess.run(run + ["-m", str(tmp_path / "none.gguf")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "model loading failed" in missing.stderr
