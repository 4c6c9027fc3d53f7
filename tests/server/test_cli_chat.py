"""`numbalm chat`: the REPL's commands on the fake model, then the real command on SmolLM2
through a pseudo-terminal (readline history recall with Up, a slash command, the mark of a
reply cut at the token limit, the history kept under the cache directory)."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pexpect
import pytest

from server.cli.chat import ChatSession
from tests.server.fake_engine import SCRIPT, FakeModel

ROOT = Path(__file__).resolve().parents[2]


def session(lines: list[str], model=None, **options):
    out = io.StringIO()
    chat = ChatSession(model or FakeModel(), {"temperature": 0.0, **options}, out=out, err=out)
    feed = iter(lines)

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    assert chat.run(read) == 0
    return chat, out.getvalue()


def test_slash_commands_change_the_settings():
    chat, out = session(["/set temperature 0.3", "/set system Be brief.", "/set top_k x",
                         "/set parameter repeat_penalty 1.2", "/show", "/nope", "/?"])
    assert chat.options["temperature"] == 0.3 and chat.system == "Be brief."
    assert chat.options["repetition_penalty"] == 1.2
    assert "Set parameter 'temperature' to '0.3'" in out and "Set system message." in out
    assert "'x' is not a valid int for top_k" in out
    assert "System: Be brief." in out and "temperature 0.3" in out
    assert "Unknown command '/nope'. Type /? for help" in out
    assert "/set temperature 0.3" in out and '"""' in out  # the help


def test_replies_keep_the_conversation_and_clear_forgets_it():
    chat, out = session(["Hi", "Again", "/clear", "Fresh"])
    assert out.count(SCRIPT) == 3
    assert [m["content"] for m in chat.messages] == ["Fresh", SCRIPT]
    assert chat.model.templates[1]["messages"][0]["content"] == "Hi"  # the 2nd saw the 1st
    assert "Cleared session context" in out


def test_a_message_of_several_lines():
    chat, _ = session(['"""First line', "second line", 'third"""'])
    assert chat.messages[0]["content"] == "First line\nsecond line\nthird"


def test_a_reply_cut_at_the_limit_says_so_and_bye_leaves():
    chat, out = session(["Hi", "/bye", "never read"], max_tokens=5)
    assert "Hello [... cut at the token limit (5); /set max_tokens N" in out
    assert len(chat.messages) == 2


def test_an_engine_error_is_said_and_the_chat_goes_on():
    chat, out = session(["x" * 300, "Hi"], model=FakeModel(n_ctx=200))
    assert "error: prompt of" in out and out.count(SCRIPT) == 1
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_verbose_prints_tokens_per_second():
    _, out = session(["/set verbose", "Hi"])
    assert "tokens/s" in out and f"reply {len(SCRIPT.encode()) + 1} tokens" in out


def test_a_base_model_refuses_to_chat_with_a_hint(tmp_path):
    from server.cli import main
    from tests.tiny_models import write_tiny

    path = str(write_tiny(tmp_path / "base.gguf"))
    code = main(["chat", "-m", path, "--backend", "reference"])
    assert code == 1  # the message: tests/engine/test_chat.py


@pytest.mark.slow
def test_chat_in_a_terminal_recalls_history_and_marks_a_cut_reply(smollm2_path, tmp_path):
    env = dict(os.environ, NUMBALM_HOME=str(tmp_path), TERM="xterm")
    child = pexpect.spawn(sys.executable, ["-m", "server.cli", "chat", "-m", smollm2_path,
                                           "--temperature", "0", "--max-tokens", "4"],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=600)
    try:
        child.expect_exact(">>> ")
        child.sendline("/set temperature 0.3")
        child.expect_exact("Set parameter 'temperature' to '0.3'")
        child.expect_exact(">>> ")
        child.sendline("Hi")
        child.expect_exact("[... cut at the token limit (4); /set max_tokens N")
        child.expect_exact(">>> ")
        child.send("\x1b[A\x1b[A")  # Up twice: back to the /set line
        child.expect_exact("/set temperature 0.3")  # readline redraws it
        child.sendline("")
        child.expect_exact("Set parameter 'temperature' to '0.3'")  # run again
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    history = (tmp_path / "chat_history").read_text().splitlines()
    assert history[-4:] == ["/set temperature 0.3", "Hi", "/set temperature 0.3", "/bye"]
