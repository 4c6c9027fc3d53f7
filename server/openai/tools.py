"""OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` fields → a validated `ToolSpec`."""

from __future__ import annotations

from server.http.errors import APIError, bad_request
from server.serving.grammar import ToolSpec


def _invalid(message: str, param: str, code: str = "invalid_value") -> APIError:
    return bad_request(message, param=param, code=code)


def tool(fn: dict, at: str) -> dict:
    """A validated function (name, description, parameters) as the chat template gets it."""
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}  # OpenAI: no parameters, no arguments
    if params.get("type", "object") != "object":
        raise _invalid(f"'{at}.parameters' must be a JSON schema of type 'object'.",
                       f"{at}.parameters")
    out = {"name": fn["name"], "description": fn.get("description"), "parameters": params}
    if out["description"] is None:
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


def tool_spec(tools: list[dict], choice, parallel: bool | None) -> ToolSpec | None:
    """Validated tools (as `tool` makes them), a `tool_choice` and `parallel_tool_calls` →
    a ToolSpec, or None without tools. Shared by every protocol that offers tools."""
    names = [t["function"]["name"] for t in tools]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup:
        raise _invalid(f"'tools' names function {dup!r} twice.", "tools")
    choice, function = _choice(choice, set(names))
    if not tools:
        return None
    return ToolSpec(tools, choice, function, parallel is not False)


def parse_tools(body: dict) -> ToolSpec | None:
    """A body's `tools`, `tool_choice`, `parallel_tool_calls` (validated by
    `schemas.TOOLS`...) → a ToolSpec, or None without tools."""
    tools = [tool(t["function"], f"tools[{i}].function")
             for i, t in enumerate(body.get("tools") or [])]
    return tool_spec(tools, body.get("tool_choice"), body.get("parallel_tool_calls"))


