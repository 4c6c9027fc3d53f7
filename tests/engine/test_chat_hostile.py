"""A chat template is code from a model file: in the sandbox it cannot read files, import,
reach Python's internals, run forever or eat the memory; whatever it tries ends as one
ChatTemplateError on one line."""

from __future__ import annotations

import pytest

from engine import chat
from engine.chat import render_chat
from engine.errors import ChatTemplateError

MESSAGES = [{"role": "user", "content": "hi"}]


def refused(template: str, *patterns: str) -> str:
    with pytest.raises(ChatTemplateError) as exc:
        render_chat(template, MESSAGES)
    message = str(exc.value)
    assert "\n" not in message, message
    assert any(p in message for p in patterns), message
    return message


@pytest.mark.parametrize("template", [
    "{% include '/etc/passwd' %}",
    "{% import '/etc/passwd' as p %}{{ p }}",
    "{% extends '/etc/passwd' %}",
    "{% from 'os' import system %}{{ system('id') }}",
])
def test_no_files_and_no_imports(template, tmp_path):
    message = refused(template, "no loader", "TemplateNotFound", "template")
    assert "root:" not in message


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('id') }}",
    "{{ raise_exception.__globals__['sys'].modules['os'].system('id') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ (messages|first).update({'role': 'x'}) }}",  # immutable: no changing the input
])
def test_no_python_internals_and_no_mutation(template):
    refused(template, "unsafe", "access to attribute", "is undefined", "SecurityError")


@pytest.mark.parametrize("template", [
    "{{ strftime_now.__code__ }}", "{{ range.__self__ }}", "{{ messages.__class__ }}",
    "{{ self._TemplateReference__context }}",
])
def test_private_attributes_are_undefined(template):
    assert render_chat(template, MESSAGES) == ""


def test_loops_forever_are_stopped(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.3)
    refused("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
            "took longer than 0.3 s")
    refused("{% for c in 'x' * 99999 %}{% for d in 'x' * 99999 %}{% endfor %}{% endfor %}",
            "took longer than 0.3 s")
    refused("{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
            "took longer than", "recursion")


@pytest.mark.parametrize("template", [
    "{{ 'x' * 10000000000 }}",
    "{% set a = [0] * 10000000000 %}",
    "{{ 10 ** 100000 }}",
    "{{ (10 ** 60) ** 60 }}",
    "{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}",
])
def test_values_and_output_are_bounded(template):
    refused(template, "over the limit", "over the size limit", "too large", "grew past")


def test_control_characters_in_a_template_error_stay_escaped():
    message = refused("{{ raise_exception('bad\\n2026 INFO forged\\x1b[2K') }}", "bad")
    assert "bad\\n2026 INFO forged\\x1b[2K" in message


def test_real_templates_still_render_under_the_limits():
    text = render_chat(None, MESSAGES * 500)
    assert text.count("<|im_start|>user\nhi<|im_end|>") == 500
    text = render_chat(chat.GEMMA_TEMPLATE, [{"role": "system", "content": "s"}] + MESSAGES,
                       bos_token="<bos>")
    assert text.startswith("<bos><start_of_turn>user\ns\n\nhi<end_of_turn>")
