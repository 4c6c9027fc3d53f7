"""Tool calls out of generated text: the Hermes / Qwen form, one tagged JSON object each,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

which the grammar (`server.serving.grammar`) makes the model write. `ToolCallParser` turns
the text back into calls incrementally, so a stream sends the same calls as a whole response.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from server.serving.ids import new_id

OPEN, CLOSE = "<tool_call>", "</tool_call>"

# --- parsing the output -----------------------------------------------------------------------

HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def call_id() -> str:
    """OpenAI's form: "call_" and 24 letters and digits."""
    return new_id("call_", 24)


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
