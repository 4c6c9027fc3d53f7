"""engine.chat: the models' Jinja chat templates, built-in ones and files, errors, the sandbox,
tools; a base model (no template) does not chat unless given one."""

import json

import pytest

import engine
from engine.chat import (
    CHATML_TEMPLATE,
    GEMMA_TEMPLATE,
    read_template,
    render_chat,
    supports_tools,
)
from engine.errors import CapabilityError, ChatTemplateError
from engine.gguf_file import open_gguf
from tests.tiny_models import write_tiny


@pytest.fixture(scope="module")
def smollm2_template(smollm2_path) -> str:
    return open_gguf(smollm2_path).metadata["tokenizer.chat_template"]


def user(text):
    return {"role": "user", "content": text}


def test_smollm2_template_renders_chatml(smollm2_template):
    messages = [{"role": "system", "content": "Be brief."}, user("Hi there")]
    prompt = render_chat(smollm2_template, messages, bos_token="<|im_start|>",
                         eos_token="<|im_end|>")
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\nHi there<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_smollm2_template_adds_its_default_system_prompt(smollm2_template):
    prompt = render_chat(smollm2_template, [user("Hi")], add_generation_prompt=False)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                      "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_builtin_chatml_matches_smollm2_when_system_given(smollm2_template):
    messages = [{"role": "system", "content": "S"}, user("U"),
                {"role": "assistant", "content": "A"}, user("V")]
    assert render_chat(None, messages) == render_chat(smollm2_template, messages)
    assert read_template("chatml") == CHATML_TEMPLATE


def test_builtin_gemma():
    template = read_template("gemma")
    assert template == GEMMA_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, user("Hi "),
                {"role": "assistant", "content": "Hello!"}, user("Bye")]
    assert render_chat(template, messages, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_content_parts_are_joined():
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert render_chat(None, [user(parts)], add_generation_prompt=False) == (
        "<|im_start|>user\nfirst\nsecond<|im_end|>\n")


def test_non_text_part_is_a_clear_error():
    parts = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(ChatTemplateError, match="'image_url' is not supported"):
        render_chat(None, [user(parts)])


def test_messages_are_not_modified():
    messages = [user([{"type": "text", "text": "x"}])]
    render_chat(None, messages)
    assert messages == [user([{"type": "text", "text": "x"}])]


def test_helpers_and_variables():
    template = ("{{ bos_token }}{{ tools | tojson }}|{{ {'k': '<é>'} | tojson }}|"
                "{{ strftime_now('%Y') | length }}|{{ custom }}{{ eos_token }}")
    out = render_chat(template, [], bos_token="<s>", eos_token="</s>",
                      tools=[{"type": "function"}], custom="!")
    assert out == '<s>[{"type": "function"}]|{"k": "<é>"}|4|!</s>'


def test_trim_and_lstrip_blocks():
    template = ("{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n"
                "  {% endif %}\n{% endfor %}")
    assert render_chat(template, [user("a"), user("b")]) == "a\nb\n"


def test_raise_exception_becomes_chat_template_error():
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render_chat(template, [user("x")])


@pytest.mark.parametrize("template", [
    "{% for m in messages %}",  # syntax error
    "{{ messages[0]['content'] + 1 }}",  # type error inside the template
    "{{ undefined_thing.attribute }}",  # undefined
])
def test_template_errors_become_chat_template_error(template):
    with pytest.raises(ChatTemplateError):
        render_chat(template, [user("x")])


def test_sandbox_blocks_dunder_attributes():
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    assert "class" not in render_chat("{{ ''.__class__ }}", [])


def test_sandbox_is_immutable():
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat("{{ messages.append(1) }}", [user("x")])


# --- tools ------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
ROUND_TRIP = [user("Weather in Paris?"),
              {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
              {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]


def test_templates_without_tools_get_the_hermes_fallback(smollm2_template):
    prompt = render_chat(smollm2_template, ROUND_TRIP, tools=TOOLS)
    system, rest = prompt.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(TOOLS[0]) in system and "<tool_call>" in system
    assert "SmolLM" not in prompt  # our system turn replaces the template's default one
    assert rest == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n"
        "<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_fallback_keeps_the_system_prompt_and_assistant_text():
    messages = [{"role": "system", "content": "Be brief."}, user("Hi"),
                {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]}]
    prompt = render_chat(GEMMA_TEMPLATE, messages, tools=TOOLS, add_generation_prompt=False)
    assert prompt.startswith("<start_of_turn>user\nBe brief.\n\n# Tools\n")
    assert prompt.endswith("<start_of_turn>model\nChecking.\n<tool_call>\n"
                           '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                           "</tool_call><end_of_turn>\n")


def test_templates_with_tools_get_them_and_argument_objects():
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}{{ m.role }}:"
                "{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}"
                "{{ m.content or '' }};{% endfor %}")
    assert supports_tools(template) and not supports_tools(CHATML_TEMPLATE)
    assert render_chat(template, ROUND_TRIP[:3], tools=TOOLS) == (
        "[get_weather]user:Weather in Paris?;assistant:Paris;tool:18 C;")


def test_no_tools_no_fallback(smollm2_template):
    plain = [user("Hi")]
    assert render_chat(smollm2_template, plain, tools=None) == render_chat(smollm2_template,
                                                                           plain)


def test_read_template_from_a_file_and_its_errors(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert render_chat(read_template(str(path)), [user("a"), user("b")]) == "[a][b]"
    with pytest.raises(ChatTemplateError, match="chatml, gemma"):
        read_template(str(tmp_path / "missing.jinja"))
    path.write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        read_template(str(path))


def test_a_base_model_does_not_chat_unless_given_a_template(tmp_path):
    path = str(write_tiny(tmp_path / "base.gguf"))  # no tokenizer.chat_template: a base model
    base = engine.load_model(path, backend="reference")
    assert base.capabilities == {"completion", "embeddings"}
    with pytest.raises(CapabilityError, match="no chat template.*numbalm generate.*"
                                              "--chat-template"):
        base.chat_prompt_ids([user("hi")])
    assert len(list(base.generate([1, 5], max_tokens=2, temperature=0.0))) == 2  # completes
    chat = engine.load_model(path, backend="reference", chat_template=read_template("chatml"))
    assert "chat" in chat.capabilities
    assert chat.apply_chat_template([user("hi")]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
