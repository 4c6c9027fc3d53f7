"""Chat messages → prompt text, with the model's own Jinja chat template.

GGUF files carry the Hugging Face chat template (`tokenizer.chat_template`), written for
`transformers.apply_chat_template`; this renders it the same way: a sandboxed, immutable Jinja
environment with `trim_blocks` and `lstrip_blocks`, the `raise_exception` and `strftime_now`
helpers, a `tojson` that leaves non-ASCII and `<>&` alone, and the variables `messages`,
`bos_token`, `eos_token`, `add_generation_prompt` and `tools`. A model without a template
gets a fallback (`fallback_template`). Whatever goes wrong while rendering — a syntax error, a
template calling `raise_exception`, an attribute the sandbox refuses — comes out as one
`ChatTemplateError` carrying the template's message.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
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


def fallback_template(tokens_present: set[str]) -> str:
    """The template for a model whose GGUF has none: Gemma's turn format when its vocabulary
    has `<start_of_turn>`, else ChatML."""
    if "<start_of_turn>" in tokens_present:
        return GEMMA_TEMPLATE
    return CHATML_TEMPLATE


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True, tools=None,
                **extra) -> str:
    """Render `messages` (OpenAI-style dicts) with a Hugging Face chat template.

    `template=None` means ChatML. Content given as a list of text parts is joined into one
    string first. `extra` are passed to the template as further variables.
    """
    compiled = _compile(template if template is not None else CHATML_TEMPLATE)
    try:
        return compiled.render(
            messages=[_normalize(m) for m in messages], bos_token=bos_token,
            eos_token=eos_token, add_generation_prompt=add_generation_prompt, tools=tools,
            **extra,
        )
    except ChatTemplateError:
        raise
    except TemplateRaised as e:
        raise ChatTemplateError(f"chat template: {e}") from None
    except Exception as e:  # a template is code: any failure in it is the template's error
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


class TemplateRaised(Exception):
    """What `raise_exception(message)` raises inside a template."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' tojson: unlike Jinja's own, it does not escape < > & ' for HTML
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
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
