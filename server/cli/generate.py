"""`numbalm generate` and `numbalm chat`: the engine on a terminal, tokens streamed as made.

Both sample with `engine.sampling.CHAT_DEFAULTS` on top of the engine's defaults (a mild
repetition penalty over the last 64 tokens, as Ollama), which keeps a 135M model out of loops;
`--help` shows every default. The chat loop itself is `server.cli.chat`.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.backends import BACKENDS, DEFAULT_BACKEND
from engine.registry import DEFAULT_MODEL
from engine.sampling import CHAT_DEFAULTS, SamplingParams
from server.cli.chat import interactive, slow_notice

DEFAULTS = SamplingParams(**CHAT_DEFAULTS)  # what the CLI samples with, shown in --help
MAX_TOKENS = 512  # a reply's limit; one cut there ends with a visible mark in `chat`


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
    """Options of `generate`, `chat` and `run`; each also reads NUMBALM_<OPTION>."""
    p.add_argument("-m", "--model", default=_env("MODEL", DEFAULT_MODEL),
                   help="registry id, alias or .gguf path (env NUMBALM_MODEL)")
    add_sampling(p)


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default=_env("BACKEND", None),
                   help=f"{DEFAULT_BACKEND} (Numba, default) or reference (NumPy) "
                        "(env NUMBALM_BACKEND)")
    for flags, kind, default, what in (
            (["--max-tokens"], int, MAX_TOKENS, "tokens per reply at most"),
            (["--temperature"], float, DEFAULTS.temperature, "0: greedy"),
            (["--top-k"], int, DEFAULTS.top_k, "0: off"),
            (["--top-p"], float, DEFAULTS.top_p, "1: off"),
            (["--min-p"], float, DEFAULTS.min_p, "0: off"),
            (["--repeat-penalty", "--repetition-penalty"], float,
             DEFAULTS.repetition_penalty, "1: off; 1.1 as Ollama"),
            (["--repeat-last-n"], int, DEFAULTS.repeat_last_n,
             "tokens of the reply the penalty looks back on; -1: all"),
            (["--seed"], int, None, "a fixed seed makes sampling reproducible")):
        env = flags[0][2:].replace("-", "_").upper()
        p.add_argument(*flags, type=kind, default=_env(env, default, kind),
                       help=f"{what} (env NUMBALM_{env})")
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

    p = sub.add_parser("chat", help="an interactive chat (line editing, history, /help)",
                       description="Chat with a model on the terminal. Type /? for the "
                                   "slash commands; \"\"\" begins and ends a message of "
                                   "several lines; Ctrl-C stops a reply, Ctrl-D quits.")
    _add_common(p)
    add_chat_options(p)
    p.set_defaults(func=cmd_chat)


def add_chat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--verbose", dest="stats", action="store_true",
                   help="print token counts and tokens/s after each reply")


def sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                repeat_last_n=args.repeat_last_n, penalize_prompt=DEFAULTS.penalize_prompt,
                seed=args.seed, stop=args.stop)


def load(args, model: str | None = None):
    """The model the command names, with the chat template it was given; slow loads (a first
    run repacks and compiles) say so."""
    import engine
    from engine.chat import read_template

    template = read_template(args.chat_template) if args.chat_template else None
    name = model or args.model
    with slow_notice(f"loading {name}", sys.stderr):
        return engine.load_model(name, backend=args.backend, chat_template=template)


def stream(model, ids, args, out=sys.stdout) -> str:
    """Print tokens as they come; return the whole reply."""
    pieces = []
    for tok in model.generate(ids, **sampling(args)):
        out.write(tok.text)
        out.flush()
        pieces.append(tok.text)
    return "".join(pieces)


def cmd_generate(args) -> int:
    model = load(args)
    if args.chat:
        ids = model.chat_prompt_ids([{"role": "user", "content": args.prompt}])
    else:
        ids = model.tokenizer.encode(args.prompt, add_bos=None, special=False)
    stream(model, ids, args)
    sys.stdout.write("\n")
    return 0


def refuse_base_model(name: str, args) -> None:
    """A registered base model is refused before it loads (seconds for a 270M model)."""
    from engine.errors import CapabilityError
    from engine.models import no_chat_message
    from engine.registry import Registry, capabilities_of

    entry = None if args.chat_template else Registry().find(name)
    if entry is not None and "chat" not in capabilities_of(entry) \
            and "completion" in capabilities_of(entry):
        raise CapabilityError(no_chat_message(entry.id))


def cmd_chat(args) -> int:
    refuse_base_model(args.model, args)
    return interactive(load(args), sampling(args), args.system, args.stats)
