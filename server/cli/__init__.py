"""The `numbalm` command line: model management, convert, generate, chat, inspect, serve.

Each command group lives in its own module of this package and registers itself with
`add_parser(sub)`; this module only wires them together and turns a user's mistake into one
line on stderr and a non-zero exit code (`--verbose` shows the traceback too). The CLI is a
client of the engine (`engine.load_model`) and of the HTTP app (`server.create_app`).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from engine import __version__
from engine.errors import EngineError, clean_text
from server.cli import convert, generate, model, run, serve, trace
from server.cli.help import ArgumentParser

COMMANDS = (model, convert, generate, trace, run, serve)  # each adds its subcommands to the parser

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="numbalm", description="A readable LLM inference engine with an OpenAI server."
    )
    parser.add_argument("--verbose", action="store_true",
                        default=os.environ.get("NUMBALM_VERBOSE", "") not in ("", "0"),
                        help="show tracebacks on errors (env NUMBALM_VERBOSE)")
    parser.add_argument("--version", action="version", version=f"numbalm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EngineError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"numbalm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("numbalm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # missing files, permissions, a full disk: the user's to fix
        if args.verbose:
            traceback.print_exc()
        print(f"numbalm: error: {clean_text(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
