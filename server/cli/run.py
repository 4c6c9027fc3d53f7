"""`numbalm run`, `numbalm ps` and `numbalm show`: Ollama's everyday commands.

- `run MODEL [PROMPT]`: pull the model if the cache lacks it, then chat (or answer the one
  prompt, or the text piped in, and exit), as `ollama run` does;
- `ps`: what a running `numbalm serve` has loaded, its memory and its queue (it asks the
  server's `/api/ps`);
- `show MODEL`: a model's architecture, size, context, capabilities and template, as
  `ollama show` (`numbalm model inspect` has every metadata key).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

from engine.download import TextProgress
from engine.registry import DEFAULT_MODEL, Registry, capabilities_of
from server.cli import generate
from server.cli.chat import interactive
from server.cli.model import inspect_file

DEFAULT_SERVER = "http://127.0.0.1:8080"


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="pull a model if needed, then chat or answer one prompt",
                       description="Chat with MODEL, pulling it first if the cache lacks it "
                                   "(a catalog id, a URL or a Hugging Face name). With a "
                                   "PROMPT (or text on stdin) answer it and exit.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    p.add_argument("prompt", nargs="*", help="answer this and exit")
    generate.add_sampling(p)
    generate.add_chat_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ps", help="what a running server has loaded, its memory and queue")
    p.add_argument("--server", default=os.environ.get("NUMBALM_SERVER", DEFAULT_SERVER),
                   help="the server's base URL (env NUMBALM_SERVER)")
    p.add_argument("--api-key", default=os.environ.get("NUMBALM_API_KEY"),
                   help="Bearer key, when the server wants one (env NUMBALM_API_KEY)")
    p.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("show", help="a model's architecture, size, capabilities, template")
    p.add_argument("model", metavar="MODEL", help="registered id, alias or .gguf path")
    p.add_argument("--template", action="store_true", help="print the chat template only")
    p.set_defaults(func=cmd_show)


# --- run --------------------------------------------------------------------------------------

def ensure_pulled(name: str) -> str:
    """`name` as `load_model` takes it: a file or a registered model as it is; anything else
    is pulled first (with progress on stderr) and its id returned."""
    reg = Registry()
    if os.path.isfile(name) or reg.find(name) is not None:
        return name
    print(f"pulling {name}", file=sys.stderr)
    entry, _ = reg.pull(name, progress=TextProgress())
    return entry.id


def cmd_run(args) -> int:
    model = generate.load(args, ensure_pulled(args.model))
    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()  # `echo question | numbalm run smollm2`
    if not prompt:
        return interactive(model, generate.sampling(args), args.system, args.stats)
    if "chat" in model.capabilities:
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = model.chat_prompt_ids(system + [{"role": "user", "content": prompt}])
    else:  # a base model continues the text, as `numbalm generate`
        ids = model.tokenizer.encode(prompt, add_bos=None, special=False)
    generate.stream(model, ids, args)
    sys.stdout.write("\n")
    return 0


# --- ps ---------------------------------------------------------------------------------------

def fetch_ps(server: str, api_key: str | None) -> dict:
    from engine.errors import EngineError

    req = urllib.request.Request(server.rstrip("/") + "/api/ps")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        raise EngineError(f"{server}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise EngineError(f"no numbalm server at {server} ({reason}); start one with "
                          f"`numbalm serve` or pass --server URL") from None


def cmd_ps(args) -> int:
    data = fetch_ps(args.server, args.api_key)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("NAME", "SIZE", "CONTEXT", "BACKEND", "RUNNING", "WAITING", "KV BLOCKS")]
    for m in data.get("models", []):
        extra = m.get("numbalm") or {}
        serving = extra.get("serving") or {}
        kv = f"{serving['kv_blocks_used']}/{serving['kv_blocks']}" if serving else "-"
        rows.append((m["name"], _mb(m.get("size") or 0), str(m.get("context_length", "")),
                     extra.get("backend", ""), str(serving.get("running", 0)),
                     str(serving.get("waiting", 0)), kv))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    queue = data.get("numbalm") or {}
    if queue:
        rss = queue.get("rss_bytes")
        print(f"\nrequests: {queue['running']} running (of {queue['max_running']}), "
              f"{queue['waiting']} waiting (of {queue['max_waiting']})"
              + (f"; server memory {_mb(rss)} resident" if rss else ""))
    return 0


# --- show -------------------------------------------------------------------------------------

def cmd_show(args) -> int:
    reg = Registry()
    path = reg.resolve(args.model)
    entry = reg.find(args.model)
    info = inspect_file(path, entry)
    from engine.gguf_file import open_gguf

    template = open_gguf(path).get("tokenizer.chat_template")
    if args.template:
        print(template or "(no chat template: a base model)")
        return 0
    caps = capabilities_of(entry) if entry else _file_capabilities(path)
    params = info["parameter_count"]
    lines = [("architecture", info["architecture"]),
             ("parameters", f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"),
             ("context length", info["context_length"]),
             ("embedding length", info["embedding_length"]),
             ("quantization", ", ".join(f"{k} {v}" for k, v in info["quant_mix"].items())),
             ("size", _mb(info["file_size"])),
             ("capabilities", ", ".join(caps)),
             ("chat template", "yes" if template else "none (a base model: use `numbalm "
                                                       "generate`, or --chat-template FILE)"),
             ("path", path)]
    print(f"  Model {info['name'] or info['id'] or os.path.basename(path)}")
    for key, value in lines:
        print(f"    {key:<18}{value}")
    return 0


def _file_capabilities(path: str) -> list[str]:
    from engine.gguf_file import open_gguf
    from engine.models import capabilities

    gf = open_gguf(path)
    return sorted(capabilities(gf.architecture, "tokenizer.chat_template" in gf.metadata, path))


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
