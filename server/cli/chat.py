"""`numbalm chat`: an interactive chat on the terminal, as Ollama's REPL is.

Line editing and history come from GNU readline (the history is kept in the cache directory,
`chat_history`); a message of several lines goes between `\"\"\"` marks; slash commands change
the settings as the chat goes (`/set temperature 0.3`, `/set system ...`, `/show`, `/clear`,
`/bye`, `/help`). A reply cut by the token limit ends with a visible mark; `--verbose` prints
tokens/s after each reply. The first reply of a process may wait for the kernels to compile,
and says so when it takes long.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

from engine.errors import EngineError
from engine.registry import cache_dir

HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000
MULTILINE = '"""'
PROMPT, MORE = ">>> ", "... "
HELP = f"""Available commands:
  /set temperature 0.3    set a sampling option: {{names}}
  /set system TEXT        set the system prompt (the conversation stays)
  /set verbose | quiet    show or hide the token counts and tokens/s after each reply
  /show                   the model, the settings and the system prompt
  /clear                  forget the conversation (the system prompt stays)
  /bye                    leave (or Ctrl-D)
  /? or /help             this help

Use {MULTILINE} to begin and end a message of several lines. Ctrl-C stops a reply; Up and
Down walk the history (kept in {{history}})."""

# `/set NAME VALUE`: Ollama's option names (and the engine's) → (engine keyword, type)
SETTINGS = {"temperature": ("temperature", float), "top_k": ("top_k", int),
            "top_p": ("top_p", float), "min_p": ("min_p", float), "seed": ("seed", int),
            "repeat_penalty": ("repetition_penalty", float),
            "repetition_penalty": ("repetition_penalty", float),
            "repeat_last_n": ("repeat_last_n", int), "max_tokens": ("max_tokens", int),
            "num_predict": ("max_tokens", int)}


def history_path() -> str:
    return os.path.join(cache_dir(), HISTORY_FILE)


@contextmanager
def slow_notice(text: str, err, after: float = 1.0):
    """Say `text` on `err` if the block is still running after `after` seconds, and how long
    it took when it ends (first runs compile the kernels; later ones read them from disk)."""
    shown = threading.Event()
    started = time.perf_counter()

    def show():
        shown.set()
        err.write(f"{text} ...")
        err.flush()

    timer = threading.Timer(after, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if shown.is_set():
            err.write(f" done ({time.perf_counter() - started:.1f} s)\n")
            err.flush()


class History:
    """readline's history, read from and written to the cache directory; nothing when the
    input is not a terminal (or readline is missing)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.readline = path, None
        if not enabled:
            return
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input()
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        try:
            readline.read_history_file(path)
        except OSError:
            pass  # the first chat: no history yet

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.readline.write_history_file(self.path)
        except OSError:
            pass  # a read-only cache: the history is only lost, the chat is not


class ChatSession:
    """One conversation with a model: messages, settings, and the replies printed as they come."""

    def __init__(self, model, options: dict, system: str | None = None, *, stats: bool = False,
                 out=None, err=None):
        self.model = model
        self.options = dict(options)  # generate()'s keywords: max_tokens, temperature, ...
        self.system = system
        self.stats = stats
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.messages: list[dict] = []
        self.replies = 0

    # -- the loop -------------------------------------------------------------------------

    def run(self, read=input) -> int:
        """Read messages and commands until /bye or end of input."""
        while True:
            try:
                line = self.read_message(read)
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:  # at the prompt, as Ollama: say how to leave
                self.out.write("\nUse Ctrl + d or /bye to exit.\n")
                continue
            if line is None or not line.strip():
                continue
            if line.lstrip().startswith("/") and not self.command(line.strip()):
                return 0
            if not line.lstrip().startswith("/"):
                self.say(line)

    def read_message(self, read) -> str | None:
        """One message: a line, or the lines between two \"\"\" marks."""
        line = read(PROMPT)
        if not line.lstrip().startswith(MULTILINE):
            return line
        lines = [line.lstrip()[len(MULTILINE):]]
        while not lines[-1].rstrip().endswith(MULTILINE):
            lines.append(read(MORE))
        lines[-1] = lines[-1].rstrip()[:-len(MULTILINE)]
        return "\n".join(lines).strip("\n")

    # -- commands ---------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a slash command; False to leave."""
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word in ("/bye", "/exit", "/quit"):
            return False
        if word in ("/?", "/help"):
            names = ", ".join(k for k in SETTINGS if k not in ("repetition_penalty",
                                                                "num_predict"))
            self.out.write(HELP.format(names=names, history=history_path()) + "\n")
        elif word == "/clear":
            self.messages.clear()
            self.out.write("Cleared session context\n")
        elif word == "/show":
            self.show()
        elif word == "/set":
            self.set(rest)
        else:
            self.out.write(f"Unknown command '{word}'. Type /? for help\n")
        return True

    def set(self, rest: str) -> None:
        name, _, value = rest.partition(" ")
        if name == "parameter":  # Ollama's long form: /set parameter temperature 0.3
            name, _, value = value.strip().partition(" ")
        value = value.strip()
        if name == "system":
            self.system = value or None
            self.out.write("Set system message.\n")
        elif name in ("verbose", "quiet"):
            self.stats = name == "verbose"
            self.out.write(f"Set '{name}' mode.\n")
        elif name in SETTINGS:
            key, kind = SETTINGS[name]
            try:
                self.options[key] = kind(value)
            except ValueError:
                self.out.write(f"'{value}' is not a valid {kind.__name__} for {name}\n")
                return
            self.out.write(f"Set parameter '{name}' to '{value}'\n")
        else:
            self.out.write(f"Unknown setting '{name}'. Type /? for help\n")

    def show(self) -> None:
        m = self.model
        self.out.write(f"Model: {m.id} ({m.architecture}, {m.backend_name} backend, context "
                       f"{m.n_ctx} tokens)\n")
        settings = ", ".join(f"{k} {v}" for k, v in sorted(self.options.items())
                             if k != "stop" and v is not None)
        self.out.write(f"Settings: {settings}\n")
        self.out.write(f"System: {self.system or '(none)'}\n")
        self.out.write(f"Conversation: {len(self.messages) // 2} exchanges\n")

    # -- a reply ----------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """Send one user message and print the reply as it comes."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        self.messages.append({"role": "user", "content": text})
        started = time.perf_counter()
        pieces, first, finish, n = [], None, None, 0
        try:
            ids = self.model.chat_prompt_ids(system + self.messages)
            stream = self.model.generate(ids, **self.options)
        except EngineError as e:  # a conversation past the context, a bad /set value, ...
            self.messages.pop()
            self.out.write(f"error: {e}\n")
            return
        try:
            notice = slow_notice("(compiling the kernels for this CPU: the first run only)",
                                 self.err, after=2.0) if self.replies == 0 else _nothing()
            with notice:
                tok = next(stream, None)
            while tok is not None:
                first = first or time.perf_counter()
                n += tok.id is not None and tok.id >= 0
                self.out.write(tok.text)
                self.out.flush()
                pieces.append(tok.text)
                finish = tok.finish_reason
                tok = next(stream, None)
        except KeyboardInterrupt:  # stops this reply; the session goes on
            stream.close()
            finish = "cancelled"
            self.out.write(" [stopped]")
        self.replies += 1
        if finish == "length":
            limit = self.options.get("max_tokens")
            self.out.write(f" [... cut at the token limit ({limit}); /set max_tokens N for "
                           f"longer replies]")
        self.out.write("\n")
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        if self.stats:
            self.print_stats(len(ids), n, started, first)

    def print_stats(self, n_prompt: int, n: int, started: float, first: float | None) -> None:
        end = time.perf_counter()
        first = first or end
        rate = (n - 1) / (end - first) if n > 1 and end > first else 0.0
        self.err.write(f"prompt {n_prompt} tokens, first token after {first - started:.2f} s; "
                       f"reply {n} tokens, {rate:.1f} tokens/s\n")


@contextmanager
def _nothing():
    yield


def interactive(model, options: dict, system: str | None, stats: bool) -> int:
    """The REPL on this terminal, with readline history under the cache directory."""
    model.require("chat")  # a base model says so now, not after the first question
    tty = sys.stdin.isatty()
    history = History(history_path(), enabled=tty)
    if tty:
        print(f"numbalm chat with {model.id}. Type /? for help, /bye or Ctrl-D to leave.",
              file=sys.stderr)
    try:
        return ChatSession(model, options, system, stats=stats).run()
    finally:
        history.save()
