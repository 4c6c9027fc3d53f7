"""A small deterministic stand-in for `engine.LLM`: it implements `engine.api.LanguageModel`.

Byte-level tokenizer (ids 0..255 are bytes) plus four control tokens; a ChatML chat template;
`generate` writes a fixed script when greedy and seeded random words when sampling, honouring
max_tokens, stop (held back, never emitted), seed, logit_bias, logprobs and should_stop, with an
optional per-token delay so admission and disconnect tests exercise real timing. Given a
`grammar` it writes `model.grammar_output` instead (a canned reply a test sets: JSON, tool
calls), enforcing nothing; the grammar itself is in `model.calls` for tests to inspect. The
chat template is ChatML through `engine.chat.render_chat`, so tools and tool messages get the
engine's fallback rendering.
"""

from __future__ import annotations

import codecs
import random
import threading
import time

import numpy as np

from engine.chat import CHATML_TEMPLATE, render_chat
from engine.errors import CapabilityError, ChatTemplateError, ContextOverflowError
from engine.generate import GeneratedToken, StopMatcher
from engine.tokenizer import valid_unicode

BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
SPECIALS = {"<s>": BOS, "</s>": EOS, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
SPECIAL_TEXT = {v: k for k, v in SPECIALS.items()}

# Greedy output: multi-byte characters check that text deltas stay UTF-8 safe.
SCRIPT = "Hello there, caf\u00e9 \U0001f642 friend. The quick brown fox jumps over the lazy dog."
GRAMMAR_OUTPUT = '{"answer": 42}'
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]


class FakeTokenizer:
    n_vocab = 260
    bos_id = BOS
    eos_id = EOS
    eot_ids = (EOS, IM_END)

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        ids = [BOS] if add_bos else []
        text = valid_unicode(text)  # as the engine's tokenizers: a lone surrogate is U+FFFD
        while text:
            hit = special and next((s for s in SPECIALS if text.startswith(s)), None)
            if hit:
                ids.append(SPECIALS[hit])
                text = text[len(hit) :]
            else:
                ids.extend(text[0].encode("utf-8"))
                text = text[1:]
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else SPECIAL_TEXT[token_id].encode()

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def decoder(self):
        return IncrementalDecoder(self)


class IncrementalDecoder:
    def __init__(self, tokenizer: FakeTokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        return self.utf8.decode(self.tokenizer.token_bytes(id))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


class FakeStream:
    """A generation's tokens, as `engine.scheduler.TokenStream` hands them out (lazily here)."""

    def __init__(self, n_prompt: int, tokens):
        self.prompt_tokens = n_prompt
        self.cached_tokens = 0
        self._tokens = tokens

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._tokens)

    def close(self) -> None:
        self._tokens.close()


class FakeModel:
    architecture = "fake"
    backend_name = "fake"
    dim = 8
    capabilities = frozenset({"completion", "chat", "embeddings"})

    def __init__(self, id: str = "fake-model", n_ctx: int = 512, delay: float = 0.0,
                 chat_template: bool = True):
        self.id = id
        self.n_ctx = n_ctx
        self.delay = delay
        self.has_chat_template = chat_template
        self.chat_template = CHATML_TEMPLATE if chat_template else None
        self.metadata = {"general.architecture": "fake", "general.name": id,
                         "fake.context_length": n_ctx}
        if not chat_template:  # a base model: it completes text but does not chat
            self.capabilities = self.capabilities - {"chat"}
        self.tokenizer = FakeTokenizer()
        self.n_vocab = self.tokenizer.n_vocab
        self.calls: list[dict] = []        # the options of every generate call, for assertions
        self.active = 0                    # generations running right now
        self.max_active = 0
        self.cancelled = 0
        self.embed_calls: list[list] = []  # the inputs of every embed call
        self.grammar_output = GRAMMAR_OUTPUT  # what generate writes when given a grammar
        self.templates: list[dict] = []    # the arguments of every apply_chat_template call
        self._lock = threading.Lock()

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> str:
        if not self.has_chat_template:
            raise ChatTemplateError(f"model {self.id} has no chat template")
        self.templates.append({"messages": messages, "tools": tools})
        return render_chat(None, messages, add_generation_prompt=add_generation_prompt,
                           tools=tools)

    def chat_prompt_ids(self, messages, tools=None) -> list[int]:
        text = self.apply_chat_template(messages, tools=tools)
        return self.tokenizer.encode(text, add_bos=None, special=True)

    def compile_grammar(self, grammar):
        """Any grammar fits a byte vocabulary well enough for a fake: nothing to check."""
        return grammar

    def trace(self, prompt, **options):
        """The fake has no layers to look into (tests/server/test_trace.py uses SmolLM2)."""
        raise CapabilityError("the fake model cannot trace")

    def logits(self, ids) -> np.ndarray:
        out = np.zeros((len(ids), self.n_vocab), dtype=np.float32)  # (n_tokens, n_vocab)
        for i, t in enumerate(ids):
            out[i, (t + 1) % 256] = 4.0
        return out

    def embed(self, inputs, pooling="mean", normalize=True, truncate=False) -> np.ndarray:
        """(len(inputs), dim) float32: a deterministic vector per token-id list (or text)."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        with self._lock:
            self.embed_calls.append([list(i) if not isinstance(i, str) else i for i in inputs])
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            out = np.empty((len(inputs), self.dim), dtype=np.float32)
            for row, item in enumerate(inputs):
                ids = self.tokenizer.encode(item) if isinstance(item, str) else list(item)
                if len(ids) > self.n_ctx:
                    raise ContextOverflowError(f"input of {len(ids)} tokens does not fit the "
                                               f"context of {self.n_ctx}")
                if self.delay:
                    time.sleep(self.delay)
                vecs = np.stack([np.cos(np.arange(1, self.dim + 1) * (t + 1) * 0.1)
                                 for t in ids])
                out[row] = vecs.mean(axis=0) + 0.01 * np.arange(self.dim)
            if normalize:
                out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
            return out
        finally:
            with self._lock:
                self.active -= 1

    def generate(self, prompt_ids, *, max_tokens=256, stop=(), temperature=1.0, top_k=0,
                 top_p=1.0, min_p=0.0, seed=None, repetition_penalty=1.0, repeat_last_n=-1,
                 penalize_prompt=True,
                 presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, logprobs=None,
                 should_stop=None, grammar=None):
        if len(prompt_ids) >= self.n_ctx:
            raise ContextOverflowError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.n_ctx}")
        opts = dict(locals())
        del opts["self"], opts["should_stop"]
        self.calls.append(opts)
        return FakeStream(len(prompt_ids), self._run(list(prompt_ids), max_tokens, stop,
                                                     temperature, seed, logit_bias, logprobs,
                                                     should_stop, grammar))

    def submit(self, prompt_ids, n=1, *, seed=None, **options) -> list[FakeStream]:
        """n independent generations (the fake computes nothing, so nothing is shared)."""
        return [self.generate(prompt_ids, seed=None if seed is None else (seed + i) % 2**32,
                              **options) for i in range(n)]

    def serving_stats(self) -> dict | None:
        return None

    def _script(self, temperature, seed, logit_bias, grammar=None):
        forced = [int(t) for t, b in (logit_bias or {}).items() if b >= 50]
        if forced:
            while True:
                yield forced[0]
        if grammar is not None:
            yield from self.grammar_output.encode()
        elif temperature == 0:
            yield from SCRIPT.encode()
        else:
            rng = random.Random(seed)
            yield from " ".join(rng.choice(WORDS) for _ in range(12)).encode()
        yield EOS

    def _run(self, prompt_ids, max_tokens, stop, temperature, seed, logit_bias, logprobs,
             should_stop, grammar):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from self._tokens(prompt_ids, max_tokens, stop, temperature, seed, logit_bias,
                                    logprobs, should_stop, grammar)
        finally:
            with self._lock:
                self.active -= 1

    def _tokens(self, prompt_ids, max_tokens, stop, temperature, seed, logit_bias, logprobs,
                should_stop, grammar):
        decoder, matcher = self.tokenizer.decoder(), StopMatcher(stop)
        room = min(max_tokens, self.n_ctx - len(prompt_ids))
        script = self._script(temperature, seed, logit_bias, grammar)
        for n, id in enumerate(script, start=1):
            if should_stop is not None and should_stop():
                self.cancelled += 1
                yield GeneratedToken(id=-1, text=matcher.flush(), finish_reason="cancelled")
                return
            if self.delay:
                time.sleep(self.delay)
            text, stopped = ("", False) if id == EOS else matcher.push(decoder.push(id))
            finish = "stop" if id == EOS or stopped else ("length" if n >= room else None)
            if finish == "length" or id == EOS:
                text += matcher.flush()
            yield GeneratedToken(id=id, text=text, finish_reason=finish,
                                 **self._logprobs(id, logprobs))
            if finish:
                return

    def _logprobs(self, id, logprobs):
        if logprobs is None:
            return {"logprob": None, "top_logprobs": None}
        others = [(i, -2.0 - k) for k, i in enumerate(x for x in (32, 101, 116, 97) if x != id)]
        return {"logprob": -0.5, "top_logprobs": ([(id, -0.5)] + others)[:logprobs]}
