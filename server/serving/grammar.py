"""The grammar for structured output: `response_format` and `tools` → one engine `Grammar`,
built before the request waits for a slot, so a schema the engine cannot enforce is a 400 at
once, never a silent downgrade.

Calls are written in the Hermes / Qwen form (`server.serving.toolcalls`) and the grammar
(llguidance Lark, JSON schemas inlined with `%json`) makes the model write exactly that:
`required` → one or more calls (exactly one without `parallel_tool_calls`), a named function →
one call of it, `auto` → either free text (never holding the `<tool_call>` tag, nor starting
with "<") or calls, `none` → such text only. Each call's JSON is one `anyOf` branch per tool,
so the arguments always match the schema of the function they name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.constrain import JSON_STYLE as RESPONSE_JSON_STYLE
from engine.constrain import Grammar, GrammarError
from server.http.errors import bad_request

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


