"""OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` fields → a validated `ToolSpec`."""

from __future__ import annotations

import re

from server.http.errors import APIError, bad_request
from server.serving.grammar import ToolSpec

MAX_TOOLS = 128
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# --- request validation -----------------------------------------------------------------------

def _invalid(message: str, param: str, code: str = "invalid_value") -> APIError:
    return bad_request(message, param=param, code=code)


def _tool(tool, i: int) -> dict:
    at = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise _invalid(f"'{at}' must be an object.", at, "invalid_type")
    if tool.get("type") != "function":
        raise _invalid(f"'{at}.type' must be 'function', got {tool.get('type')!r}.",
                       f"{at}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _invalid(f"Missing or invalid '{at}.function': expected an object.",
                       f"{at}.function", "missing_required_parameter" if fn is None
                       else "invalid_type")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise _invalid(f"'{at}.function.name' must be 1-64 letters, digits, '_' or '-'; "
                       f"got {name!r}.", f"{at}.function.name")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise _invalid(f"'{at}.function.description' must be a string.",
                       f"{at}.function.description", "invalid_type")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}  # OpenAI: no parameters, no arguments
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise _invalid(f"'{at}.function.parameters' must be a JSON schema of type 'object'.",
                       f"{at}.function.parameters")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _invalid(f"'{at}.function.strict' must be a boolean.", f"{at}.function.strict",
                       "invalid_type")
    out = {"name": name, "description": description, "parameters": params}
    if description is None:
        del out["description"]
    return {"type": "function", "function": out}


def _choice(value, names: set[str]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if names else "none"), None
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise _invalid(f"Invalid value for 'tool_choice': {value!r}; expected 'none', "
                           "'auto', 'required' or {'type': 'function', 'function': "
                           "{'name': ...}}.", "tool_choice")
        if value == "required" and not names:
            raise _invalid("'tool_choice' is 'required' but no 'tools' were given.",
                           "tool_choice")
        return value, None
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or \
            not isinstance(name, str):
        raise _invalid("'tool_choice' must be 'none', 'auto', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}.", "tool_choice")
    if name not in names:
        raise _invalid(f"'tool_choice' names function {name!r}, which is not among 'tools'.",
                       "tool_choice")
    return "function", name


def parse_tools(body: dict) -> ToolSpec | None:
    """`tools`, `tool_choice`, `parallel_tool_calls` → a ToolSpec, or None without tools."""
    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise _invalid("'tools' must be an array of tool objects.", "tools", "invalid_type")
    if raw is not None and len(raw) > MAX_TOOLS:
        raise _invalid(f"'tools' holds {len(raw)} tools; at most {MAX_TOOLS} are allowed.",
                       "tools")
    tools = [_tool(t, i) for i, t in enumerate(raw or [])]
    names = [t["function"]["name"] for t in tools]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup:
        raise _invalid(f"'tools' names function {dup!r} twice.", "tools")
    choice, function = _choice(body.get("tool_choice"), set(names))
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _invalid("'parallel_tool_calls' must be a boolean.", "parallel_tool_calls",
                       "invalid_type")
    if not tools:
        return None
    return ToolSpec(tools, choice, function, parallel is not False)


