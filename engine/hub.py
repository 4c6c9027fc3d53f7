"""Hugging Face names → download URLs, for `numbalm model pull` (and `run`, `/api/pull`):

    hf.co/OWNER/REPO[:QUANT]          the repo's GGUF file of that quant (default Q4_K_M, or the
                                      repo's only GGUF file), as `ollama pull hf.co/...` and
                                      `llama-server -hf` pick one
    [hf.co/]OWNER/REPO/FILE.gguf      that file (also huggingface.co/...; FILE may sit in a
                                      folder of the repo)

The hub's base URL is `HF_ENDPOINT` (huggingface_hub's variable; default
https://huggingface.co), so a mirror, or a local server in the tests, can stand in for it.
The file list comes from the hub's model API (`/api/models/OWNER/REPO`, its `siblings`); the
file itself from `/OWNER/REPO/resolve/main/FILE`, the URL every GGUF download link uses.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request

from .errors import RegistryError

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_QUANT = "Q4_K_M"
PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
REPO = re.compile(rf"^(?P<repo>{PART}/{PART})(?::(?P<quant>[A-Za-z0-9_.-]+))?$")
FILE = re.compile(rf"^(?P<repo>{PART}/{PART})/(?P<file>(?:{PART}/)*{PART}\.gguf)$")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def is_hub_name(target: str) -> bool:
    """A Hugging Face name (rather than a catalog id, a path or a URL)?"""
    if target.startswith(PREFIXES):
        return True
    return bool(FILE.match(target)) and not os.path.exists(target)


def resolve(target: str) -> str:
    """A Hugging Face name → the URL of its GGUF file; RegistryError if it names none."""
    name = target
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    m = FILE.match(name)
    if m:
        return file_url(m["repo"], m["file"])
    m = REPO.match(name)
    if not m:
        raise RegistryError(f"{target!r} is not a Hugging Face name: use hf.co/OWNER/REPO"
                            f"[:QUANT] or OWNER/REPO/FILE.gguf")
    return file_url(m["repo"], pick_file(m["repo"], gguf_files(m["repo"]), m["quant"]))


def file_url(repo: str, filename: str) -> str:
    return f"{endpoint()}/{repo}/resolve/main/{urllib.parse.quote(filename)}"


def gguf_files(repo: str) -> list[str]:
    """The repo's GGUF files (projectors for images left out), from the hub's model API."""
    url = f"{endpoint()}/api/models/{repo}"
    req = urllib.request.Request(url, headers={"User-Agent": "numbalm"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            info = json.load(resp)
    except urllib.error.HTTPError as e:
        hint = " (no such repo, or a private or gated one)" if e.code in (401, 403, 404) else ""
        raise RegistryError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RegistryError(f"{url}: cannot read the repo's files: "
                            f"{getattr(e, 'reason', e)}") from None
    names = [s.get("rfilename", "") for s in info.get("siblings") or [] if isinstance(s, dict)]
    return sorted(n for n in names if n.endswith(".gguf") and "mmproj" not in n.lower())


def pick_file(repo: str, files: list[str], quant: str | None) -> str:
    """The file of `quant` (case-insensitive, as a word of the name: Q4_K_M, q8_0, ...);
    without one, Q4_K_M or the repo's only GGUF file."""
    if not files:
        raise RegistryError(f"hf.co/{repo} has no GGUF files")
    wanted = quant or DEFAULT_QUANT
    pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(wanted)}(?![A-Za-z0-9])", re.IGNORECASE)
    matches = [f for f in files if pattern.search(os.path.basename(f))]
    if len(matches) == 1:
        return matches[0]
    if not quant and len(files) == 1:
        return files[0]
    choices = ", ".join(os.path.basename(f) for f in files)
    if len(matches) > 1:
        raise RegistryError(f"hf.co/{repo}:{wanted} matches several files ({', '.join(matches)})"
                            f"; name one: hf.co/{repo}/FILE.gguf")
    raise RegistryError(f"hf.co/{repo} has no {wanted} file; its GGUF files: {choices} "
                        f"(pick one with hf.co/{repo}:QUANT or hf.co/{repo}/FILE.gguf)")
