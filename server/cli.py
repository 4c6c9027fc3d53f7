"""The `numbalm` command line: model management, generate, chat, serve.

Each command group lives in its own module and registers itself with `add_parser(sub)`;
this module only wires them together and turns a user's mistake into one line on stderr and
a non-zero exit code (`--verbose` shows the traceback too).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# (module, function) pairs; each function adds its subcommands to the parser.
COMMAND_MODULES = (
    ("server.cli_model", "add_parser"),
    ("server.cli_convert", "add_parser"),
    ("server.cli_generate", "add_parser"),
    ("server.serve", "add_serve_parser"),
)

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numbalm", description="A readable LLM inference engine with an OpenAI server."
    )
    parser.add_argument("--verbose", action="store_true",
                        default=os.environ.get("NUMBALM_VERBOSE", "") not in ("", "0"),
                        help="show tracebacks on errors (env NUMBALM_VERBOSE)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, func_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a real import error inside the module
                raise
            continue
        getattr(module, func_name)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from engine.errors import EngineError

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
        print(f"numbalm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
