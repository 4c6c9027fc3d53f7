"""Chat messages → prompt text, with the model's own Jinja chat template.

GGUF files carry the Hugging Face chat template (`tokenizer.chat_template`), written for
`transformers.apply_chat_template`; this renders it the same way: a sandboxed, immutable Jinja
environment with `trim_blocks` and `lstrip_blocks`, the `raise_exception` and `strftime_now`
helpers, a `tojson` that leaves non-ASCII and `<>&` alone, and the variables `messages`,
`bos_token`, `eos_token`, `add_generation_prompt` and `tools`. A model without a template is
a base model and does not chat, unless the user supplies one (`read_template`: a Jinja file,
or a built-in format by name, `BUILTIN_TEMPLATES`, as llama-server's `--chat-template`).
Whatever goes wrong while rendering — a syntax error, a
template calling `raise_exception`, an attribute the sandbox refuses — comes out as one
`ChatTemplateError` carrying the template's message.

Tools. A template that reads `tools` (Qwen 2.5, Llama 3.1, Hermes, ...) gets them and the
messages as they are: assistant `tool_calls` (arguments as objects, as transformers expects)
and `tool` messages. A template without tool support — SmolLM2's ChatML, our built-in ones —
gets the Hermes / Qwen convention spelled out in plain messages (`tools_in_messages`): the
tool signatures in the system prompt, each past call as
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` in the assistant's turn, and
tool results as a user turn of `<tool_response>\n...\n</tool_response>` blocks (consecutive
results share one turn). A user turn, not a `tool` one: a model never trained on tools has
seen only system, user and assistant, and Qwen's own template does the same.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError

# ChatML, the format of SmolLM2, Qwen and many others.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turns: roles `user` and `model`; a system message is put in front of the first user
# turn (Gemma has no system role), as Google's own template does.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}


def read_template(spec: str) -> str:
    """`--chat-template SPEC` → the template's text: a built-in format's name (chatml, gemma)
    or the path of a Jinja file. A file that cannot be read or does not parse is one
    ChatTemplateError."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    try:
        with open(os.path.expanduser(spec), encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        names = ", ".join(BUILTIN_TEMPLATES)
        raise ChatTemplateError(f"chat template {spec!r}: {e.strerror or e} (give a Jinja "
                                f"file or one of {names})") from None
    except UnicodeDecodeError:
        raise ChatTemplateError(f"chat template {spec!r} is not UTF-8 text") from None
    if not text.strip():
        raise ChatTemplateError(f"chat template {spec!r} is empty")
    _compile(text)  # a syntax error is reported now, naming the line
    return text


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True, tools=None,
                **extra) -> str:
    """Render `messages` (OpenAI-style dicts) with a Hugging Face chat template.

    `template=None` means ChatML. Content given as a list of text parts is joined into one
    string first. `extra` are passed to the template as further variables.
    """
    template = template if template is not None else CHATML_TEMPLATE
    compiled = _compile(template)
    if supports_tools(template):
        messages = [_with_argument_objects(m) for m in messages]
    elif tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        messages, tools = tools_in_messages(messages, tools), None
    try:
        with _deadline(RENDER_SECONDS):
            return _joined(compiled.generate(
                messages=[_normalize(m) for m in messages], bos_token=bos_token,
                eos_token=eos_token, add_generation_prompt=add_generation_prompt, tools=tools,
                **extra,
            ))
    except ChatTemplateError:
        raise
    except TemplateRaised as e:
        raise ChatTemplateError(f"chat template: {e}") from None
    except Exception as e:  # a template is code: any failure in it is the template's error
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=16)
def supports_tools(template: str) -> bool:
    """Whether a chat template reads the `tools` variable (and so knows tool messages)."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False  # rendering reports it


TOOLS_PROMPT = """# Tools

You may call functions to help with the user's request. Their signatures, as JSON, are \
inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, write a JSON object with its name and arguments inside \
<tool_call></tool_call>, one block per call:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-object>}}
</tool_call>
Each result comes back inside <tool_response></tool_response>."""


def tools_in_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages with tools, calls and results written as plain text (Hermes style), for a
    template that knows only system, user and assistant turns."""
    out: list[dict] = []
    if tools:
        spec = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = TOOLS_PROMPT.format(tools=spec)
        if messages and messages[0].get("role") == "system":
            first = _normalize(messages[0])["content"]
            system = f"{first}\n\n{system}" if first else system
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_response>\n{_normalize(message)['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        elif role == "assistant" and message.get("tool_calls"):
            parts = [_normalize({**message, "tool_calls": None})["content"]]
            parts += [_call_text(c) for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(p for p in parts if p)})
        else:
            out.append(message)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def _call_text(call: dict) -> str:
    """One call as the model writes it (the separators match the server's tool grammar)."""
    fn = call.get("function", call)
    body = {"name": fn.get("name"), "arguments": _arguments_object(fn.get("arguments"))}
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


def _arguments_object(arguments):
    """OpenAI sends arguments as a JSON string; templates want the object (kept as the string
    when it is not JSON)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return {} if arguments is None else arguments


def _with_argument_objects(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"],
                                "arguments": _arguments_object(c["function"].get("arguments"))}}
             if isinstance(c.get("function"), dict) else c for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


class TemplateRaised(Exception):
    """What `raise_exception(message)` raises inside a template."""


# A chat template is code from a model file. The sandbox keeps it from files, imports and
# Python internals; these limits keep it from the CPU and memory: a render stops after
# RENDER_SECONDS, and no string, list or output it builds may exceed MAX_TEXT characters
# (items), nor a number MAX_INT_BITS bits. Real templates render in well under 10 ms.
RENDER_SECONDS = 2.0
MAX_TEXT = 1 << 24
MAX_INT_BITS = 4096
TEMPLATE_FILE = "<template>"  # the file name Jinja gives code compiled from a string


def _too_big(value) -> bool:
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > MAX_TEXT
    return isinstance(value, int) and value.bit_length() > MAX_INT_BITS


class GuardedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the size limits checked wherever a template can grow a
    value: `*`, `**` and `+`, every attribute or item it reads, every call's result."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 64 and (
                isinstance(left, int) and abs(left) > 1):
            raise ChatTemplateError(f"chat template: {left} ** {right} is too large a number")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                        and len(seq) * n > MAX_TEXT):
                    raise ChatTemplateError(f"chat template: a value of {len(seq) * n} "
                                            f"characters or items is over the limit")
        return self._checked(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        return self._checked(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        return self._checked(super().getitem(obj, argument))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        return __self._checked(super().call(__context, __obj, *args, **kwargs))

    @staticmethod
    def _checked(value):
        if _too_big(value):
            raise ChatTemplateError("chat template: built a value over the size limit "
                                    f"({MAX_TEXT} characters or items, {MAX_INT_BITS}-bit "
                                    f"numbers)")
        return value


class _RenderTimeout(Exception):
    pass


@contextmanager
def _deadline(seconds: float):
    """Stop template code that runs past `seconds`: a trace function on this thread, active
    only in frames of compiled templates, checks the clock at each line they run. (When a
    debugger or coverage already traces the thread, it is left alone and there is no limit.)"""
    previous = sys.gettrace()
    if previous is not None:
        yield
        return
    end = time.monotonic() + seconds

    def in_template(frame, event, arg):
        if time.monotonic() > end:
            raise _RenderTimeout()
        return in_template

    def on_call(frame, event, arg):
        return in_template if frame.f_code.co_filename == TEMPLATE_FILE else None

    sys.settrace(on_call)
    try:
        yield
    except _RenderTimeout:
        raise ChatTemplateError(f"chat template: rendering took longer than {seconds:g} s; "
                                f"stopped") from None
    finally:
        sys.settrace(None)


def _joined(pieces) -> str:
    """The template's output pieces joined, stopping once they pass MAX_TEXT characters."""
    out, size = [], 0
    for piece in pieces:
        size += len(piece)
        if size > MAX_TEXT:
            raise ChatTemplateError(f"chat template: the prompt grew past {MAX_TEXT} "
                                    f"characters; stopped")
        out.append(piece)
    return "".join(out)


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' tojson: unlike Jinja's own, it does not escape < > & ' for HTML
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.cache
def _environment() -> GuardedSandbox:
    env = GuardedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): "
                                f"{e.message}") from None


def _normalize(message: dict) -> dict:
    """A copy of `message` whose content is a string: a list of text parts is joined with
    newlines (as llama.cpp's server does), None becomes "" unless the message has tool calls."""
    message = dict(message)
    content = message.get("content")
    if isinstance(content, list):
        message["content"] = "\n".join(_part_text(part) for part in content)
    elif content is None and not message.get("tool_calls"):
        message["content"] = ""
    return message


def _part_text(part) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise ChatTemplateError(f"message content part of type {kind!r} is not supported: "
                            f"numbalm models read text parts only")
