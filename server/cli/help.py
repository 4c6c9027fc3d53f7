"""The help text of every `numbalm` command: each option's default is shown."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, less the noise: a default is shown when there
    is one to show (not None or False) and the help text does not give it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default in (None, False, [], argparse.SUPPRESS) or "default" in text.lower() \
                or action.option_strings == [] and action.nargs is None:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class ArgumentParser(argparse.ArgumentParser):
    """numbalm's parsers: HelpFormatter by default. Sub-commands are made with the parser's
    own class, so the one at the top gives every command its defaults in --help."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
