"""`numbalm generate` and `numbalm chat`: the engine on a terminal, tokens streamed as made."""

from __future__ import annotations

import argparse
import os
import sys

from engine.backends import BACKENDS, DEFAULT_BACKEND
from engine.registry import DEFAULT_MODEL
from engine.sampling import SamplingParams

DEFAULTS = SamplingParams()  # the engine's sampling defaults, shown in --help


def _env(name: str, default, kind=str):
    """NUMBALM_<NAME> from the environment when set, else `default`."""
    value = os.environ.get(f"NUMBALM_{name}")
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"numbalm: error: NUMBALM_{name}={value!r} is not a valid "
                         f"{kind.__name__}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    """Options of `generate` and `chat`; each also reads NUMBALM_<OPTION> from the environment."""
    p.add_argument("-m", "--model", default=_env("MODEL", DEFAULT_MODEL),
                   help="registry id, alias or .gguf path (env NUMBALM_MODEL)")
    p.add_argument("--backend", choices=BACKENDS, default=_env("BACKEND", None),
                   help=f"{DEFAULT_BACKEND} (Numba, default) or reference (NumPy) "
                        "(env NUMBALM_BACKEND)")
    for flag, kind, default in (("--max-tokens", int, 256),
                                ("--temperature", float, DEFAULTS.temperature),
                                ("--top-k", int, DEFAULTS.top_k),
                                ("--top-p", float, DEFAULTS.top_p),
                                ("--min-p", float, DEFAULTS.min_p),
                                ("--repetition-penalty", float, DEFAULTS.repetition_penalty),
                                ("--seed", int, None)):
        env = flag[2:].replace("-", "_").upper()
        p.add_argument(flag, type=kind, default=_env(env, default, kind),
                       help=f"default {default} (env NUMBALM_{env})")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--chat-template", metavar="FILE", default=_env("CHAT_TEMPLATE", None),
                   help="Jinja chat template instead of the model's own, or a built-in one "
                        "(chatml, gemma); a base model (no template) chats only with one "
                        "(env NUMBALM_CHAT_TEMPLATE)")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming to the terminal")
    _add_common(p)
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="an interactive chat; Ctrl-C stops a reply, Ctrl-D quits")
    _add_common(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _load(args):
    import engine
    from engine.chat import read_template

    template = read_template(args.chat_template) if args.chat_template else None
    return engine.load_model(args.model, backend=args.backend, chat_template=template)


def _stream(model, ids, args, out=sys.stdout) -> str:
    """Print tokens as they come; return the whole reply."""
    pieces = []
    for tok in model.generate(ids, **_sampling(args)):
        out.write(tok.text)
        out.flush()
        pieces.append(tok.text)
    return "".join(pieces)


def cmd_generate(args) -> int:
    model = _load(args)
    if args.chat:
        ids = model.chat_prompt_ids([{"role": "user", "content": args.prompt}])
    else:
        ids = model.tokenizer.encode(args.prompt, add_bos=None, special=False)
    _stream(model, ids, args)
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    model = _load(args)
    model.require("chat")  # a base model says so now, not after the first question
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"numbalm chat with {model.id} — Ctrl-C stops a reply, Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
            print(file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for tok in model.generate(model.chat_prompt_ids(messages), **_sampling(args)):
                sys.stdout.write(tok.text)
                sys.stdout.flush()
                reply.append(tok.text)
        except KeyboardInterrupt:  # stops this reply; the session goes on
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
