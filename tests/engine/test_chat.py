"""engine.chat: the models' Jinja chat templates, the fallbacks, errors and the sandbox."""


import pytest
from conftest import model_path

from engine.chat import CHATML_TEMPLATE, GEMMA_TEMPLATE, fallback_template, render_chat
from engine.errors import ChatTemplateError
from engine.gguf_file import open_gguf


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    return open_gguf(model_path("smollm2")).metadata["tokenizer.chat_template"]


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


def test_chatml_fallback_matches_smollm2_when_system_given(smollm2_template):
    messages = [{"role": "system", "content": "S"}, user("U"),
                {"role": "assistant", "content": "A"}, user("V")]
    assert render_chat(None, messages) == render_chat(smollm2_template, messages)
    assert fallback_template({"<|im_start|>"}) == CHATML_TEMPLATE


def test_gemma_fallback():
    template = fallback_template({"<start_of_turn>", "<end_of_turn>", "<bos>"})
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
