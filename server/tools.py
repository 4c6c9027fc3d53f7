"""Tool calling and structured output: validate `tools` / `tool_choice`, build the grammar
for them and `response_format` (before the request waits for a slot), parse calls back.

Whatever the model, calls are written in the Hermes / Qwen form, one tagged JSON object each:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and the grammar (llguidance Lark, JSON schemas inlined with `%json`) makes the model write
exactly that: `required` → one or more calls (exactly one without `parallel_tool_calls`), a
named function → one call of it, `auto` → either free text (never holding the `<tool_call>`
tag, nor starting with "<") or calls, `none` → such text only. Each call's JSON is one
`anyOf` branch per tool, so the arguments always match the schema of the function they name.
`ToolCallParser` turns the generated text back into OpenAI's `tool_calls`, incrementally, so
a stream sends the same calls as a whole response.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from server.engine_api import JSON_STYLE as RESPONSE_JSON_STYLE
from server.engine_api import Grammar, GrammarError
from server.errors import APIError, bad_request

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ALPHABET = string.ascii_letters + string.digits
MAX_TOOLS = 128
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A call's JSON has fixed separators, as the fallback chat format writes past calls: a 135M
# model given free whitespace between JSON tokens may wander into runs of spaces and newlines.
# (response_format JSON beside tools follows the engine's bounded style, RESPONSE_JSON_STYLE.)
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
# Free text beside tools: never the call tag, so no tag reaches `content`, and not starting
# with "<": a small model shown <tool_call> and <tool_response> blocks likes to open its
# reply with one of them (llguidance's own docs keep Llama's text from starting with "{").
TEXT_RULE = r"TEXT: /[^<](.|\n)*/ & ~/(.|\n)*<tool_call>(.|\n)*/"


@dataclass
class ToolSpec:
    tools: list[dict]                    # validated, as the chat template gets them
    choice: str = "auto"                 # "none" | "auto" | "required" | "function"
    function: str | None = None          # the named function when choice == "function"
    parallel: bool = True

    @property
    def calls_allowed(self) -> bool:
        return self.choice != "none"

    def offered(self) -> list[dict]:
        """The tools a call may name."""
        if self.choice == "function":
            return [t for t in self.tools if t["function"]["name"] == self.function]
        return self.tools if self.calls_allowed else []


# A request without tools whose history holds calls: the reply may not make one.
NO_CALLS = ToolSpec([], "none")


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


# --- grammar ----------------------------------------------------------------------------------

def call_schema(tools: list[dict]) -> dict:
    """JSON schema of one call's object: an `anyOf` branch per tool, name first."""
    branches = [{"type": "object",
                 "properties": {"name": {"const": t["function"]["name"]},
                                "arguments": t["function"]["parameters"]},
                 "required": ["name", "arguments"], "additionalProperties": False}
                for t in tools]
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return {**schema, "x-guidance": JSON_STYLE}


def lark_grammar(spec: ToolSpec, text_rule: str | None = None) -> str:
    """The Lark grammar for `spec`. `text_rule` is what the reply may be instead of calls
    (a rule body such as `%json {...}` from `response_format`); default: free text."""
    text = "text" if text_rule else "TEXT"
    lines = [f"text: {text_rule}" if text_rule else TEXT_RULE]
    if not spec.calls_allowed:
        return "\n".join([f"start: {text}", *lines])
    one = spec.choice == "function" or not spec.parallel
    calls = "call" if one else 'call ("\\n" call)* "\\n"?'
    start = calls if spec.choice in ("required", "function") else f"{text} | calls"
    return "\n".join([
        f"start: {start}",
        f"calls: {calls}",
        'call: "<tool_call>\\n" call_json "\\n</tool_call>"',
        "call_json: %json " + json.dumps(call_schema(spec.offered())),
        *(lines if start != calls else []),
    ])


# --- compiling, before the request waits for a slot ------------------------------------------

def _compile(build, param: str) -> Grammar:
    try:
        return build()
    except GrammarError as e:
        keyword = getattr(e, "keyword", None)
        if keyword:
            raise bad_request(f"Invalid '{param}': this server enforces schemas while it "
                              f"generates and cannot enforce the keyword {keyword!r} ({e}).",
                              param=param, code="unsupported_schema_keyword") from None
        raise bad_request(f"Invalid '{param}': {e}", param=param,
                          code="invalid_schema") from None


def build_grammar(kind: str, schema: dict | None, tools: ToolSpec | None) -> Grammar | None:
    """The grammar for response_format and tools together (None: free text)."""
    grammar = None
    if kind == "json_object":
        grammar = _compile(lambda: Grammar.json_object(where="response_format"),
                           "response_format")
        schema = {"type": "object"}
    elif schema is not None:
        where = "response_format.json_schema.schema"
        grammar = _compile(lambda: Grammar.json_schema(schema, where=where), "response_format")
    if tools is None:
        return grammar
    for i, tool in enumerate(tools.tools):  # each on its own, so a 400 names the tool
        where = f"tools[{i}].function.parameters"
        params = tool["function"]["parameters"]
        _compile(lambda p=params, w=where: Grammar.json_schema(p, where=w), where)
    text_rule = None if schema is None else "%json " + json.dumps(
        {**schema, "x-guidance": RESPONSE_JSON_STYLE})
    return _compile(lambda: Grammar.lark(lark_grammar(tools, text_rule), where="tools"),
                    "tools")


# --- parsing the output -----------------------------------------------------------------------

HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def call_id() -> str:
    """OpenAI's form: "call_" and 24 letters and digits."""
    return "call_" + "".join(secrets.choice(ALPHABET) for _ in range(24))


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str = ""  # the JSON text of the arguments, exactly as generated

    def openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def head(self) -> dict:
        """The first stream delta of this call."""
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": ""}}

    def fragment(self, text: str) -> dict:
        return {"index": self.index, "function": {"arguments": text}}


@dataclass
class Delta:
    """What one push let through: content text and/or OpenAI `delta.tool_calls` entries."""

    content: str = ""
    calls: list[dict] = field(default_factory=list)


class ToolCallParser:
    """Generated text → content or tool calls, incrementally.

    The reply is text (it cannot start with the tag, the grammar sees to that) or a run of
    tagged calls. Text is passed on at once, except a start that could still become the tag.
    The first call is announced once its name is known and its arguments go out as they come,
    up to the end of their JSON value (a small string-aware bracket counter finds it).

    Small models asked for calls tend to repeat the last one until max_tokens. So a later
    call is held back until its arguments are complete: an exact repeat of an earlier call
    (same name, same arguments) is dropped and sets `repeated`, on which the server ends the
    generation; any other goes out whole (its head, then its arguments in one fragment).
    """

    def __init__(self, new_id=call_id):
        self.new_id = new_id
        self.mode = "start"      # start | text | tag | header | args | tail | done
        self.buf = ""
        self.calls: list[ToolCall] = []
        self.content = ""
        self.repeated = False
        self._depth = 0
        self._in_string = self._escape = False

    def push(self, text: str) -> Delta:
        delta = Delta()
        self.buf += text
        while self.buf and getattr(self, "_" + self.mode)(delta):
            pass
        self.content += delta.content
        return delta

    def finish(self) -> Delta:
        """End of generation: a start still held back (a tag that never came) is content; a
        later call cut short goes out as far as it got, as the whole reply has it."""
        delta = Delta()
        if self.mode == "start":
            delta.content, self.buf = self.buf, ""
            self.content += delta.content
        elif self.mode == "args" and self.calls[-1].index > 0:
            call = self.calls[-1]
            delta.calls += [call.head(), call.fragment(call.arguments)]
        return delta

    # each state consumes from self.buf and says whether to go on

    def _start(self, delta: Delta) -> bool:
        if self.buf.startswith(OPEN):
            self.mode = "tag"
            return True
        if OPEN.startswith(self.buf):
            return False  # could still be the tag: wait
        self.mode = "text"
        return True

    def _text(self, delta: Delta) -> bool:
        delta.content += self.buf
        self.buf = ""
        return False

    def _tag(self, delta: Delta) -> bool:
        stripped = self.buf.lstrip()
        if stripped.startswith(OPEN):
            self.buf = stripped[len(OPEN):]
            self.mode = "header"
            return True
        if stripped and not OPEN.startswith(stripped):  # not a call: the grammar forbids it
            self.buf = ""
        return False

    def _header(self, delta: Delta) -> bool:
        m = HEADER.match(self.buf)
        if not m:
            return False
        call = ToolCall(len(self.calls), self.new_id(), json.loads(f'"{m.group(1)}"'))
        self.calls.append(call)
        if call.index == 0:
            delta.calls.append(call.head())
        self.buf = self.buf[m.end():]
        self.mode, self._depth, self._in_string, self._escape = "args", 0, False, False
        return True

    def _args(self, delta: Delta) -> bool:
        call = self.calls[-1]
        end = self._scan(self.buf)
        piece = self.buf[:end] if call.arguments else self.buf[:end].lstrip()
        self.buf = self.buf[end:]
        call.arguments += piece
        done = self._depth == 0 and bool(call.arguments)
        if call.index == 0:
            if piece:
                delta.calls.append(call.fragment(piece))
        elif done:
            if any((c.name, c.arguments) == (call.name, call.arguments) for c in self.calls[:-1]):
                self.calls.pop()
                self.repeated, self.mode, self.buf = True, "done", ""
                return False
            delta.calls += [call.head(), call.fragment(call.arguments)]
        if done:
            self.mode = "tail"
        return done

    def _scan(self, text: str) -> int:
        """How much of `text` belongs to the arguments value (all of it if it is not done)."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(text)

    def _tail(self, delta: Delta) -> bool:
        at = self.buf.find(CLOSE)
        if at < 0:
            return False
        self.buf = self.buf[at + len(CLOSE):]
        self.mode = "tag"
        return True

    def _done(self, delta: Delta) -> bool:
        self.buf = ""
        return False


def finish_reason(reason: str | None, calls: list) -> str | None:
    """OpenAI's: "tool_calls" when the reply ended (not cut short) after calling tools."""
    return "tool_calls" if calls and reason == "stop" else reason


def parse_output(text: str, new_id=call_id) -> tuple[str | None, list[ToolCall]]:
    """A whole reply → (content or None, calls)."""
    parser = ToolCallParser(new_id)
    parser.push(text)
    parser.finish()
    if parser.calls:
        return None, parser.calls
    return parser.content, []
