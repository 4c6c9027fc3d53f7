"""Random ids for responses and tool calls, in OpenAI's alphabet (letters and digits)."""

from __future__ import annotations

import secrets
import string

ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 29) -> str:
    """`prefix` and `length` random letters and digits, e.g. new_id("chatcmpl-")."""
    return prefix + "".join(secrets.choice(ALPHABET) for _ in range(length))
