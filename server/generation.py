"""From a validated request to tokens: tokenize, check the context, run `Model.generate`.

The server calls the engine only through `model.generate(...)` (plus the tokenizer, the chat
template and, for echo with logprobs, `model.logits`). All of it runs in the request's thread
while it holds an admission slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from server.engine_api import ChatTemplateError, ContextOverflowError, EngineError, GrammarError
from server.errors import APIError, bad_request
from server.models import ServedModel
from server.schema import GenerationRequest
from server.tools import Delta, ToolCallParser


@dataclass
class Prompt:
    ids: list[int]
    text: str         # what echo prepends
    max_tokens: int   # completion budget for this prompt


@dataclass
class Plan:
    req: GenerationRequest
    served: ServedModel
    prompts: list[Prompt]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    def jobs(self):
        """(choice index, prompt) for every choice: prompt-major, n per prompt."""
        for p, prompt in enumerate(self.prompts):
            for i in range(self.req.n):
                yield p * self.req.n + i, prompt


def _chat_prompt(req: GenerationRequest, model) -> tuple[list[int], str]:
    try:
        tools = req.tools.tools if req.tools else None
        text = model.apply_chat_template(req.messages, add_generation_prompt=True, tools=tools)
    except ChatTemplateError as e:
        raise APIError(422, f"Cannot build a chat prompt for this model: {e}. Use "
                       "/v1/completions for models without a chat template.",
                       param="messages", code="chat_template_error") from None
    ids = model.tokenizer.encode(text, add_bos=None, special=True)
    bos = getattr(model.tokenizer, "bos_id", None)
    if len(ids) > 1 and ids[0] == ids[1] == bos:  # the template wrote BOS and so did encode
        ids = ids[1:]
    return ids, text


def _completion_prompt(prompt, model) -> tuple[list[int], str]:
    if isinstance(prompt, str):
        return model.tokenizer.encode(prompt, add_bos=None, special=True), prompt
    bad = [t for t in prompt if not 0 <= t < model.n_vocab]
    if bad:
        raise bad_request(f"Token id {bad[0]} in 'prompt' is outside the vocabulary "
                          f"(0..{model.n_vocab - 1}).", param="prompt", code="invalid_value")
    return list(prompt), model.tokenizer.decode(prompt)


def _budget(n_prompt: int, req: GenerationRequest, model, cap: int) -> int:
    """max_tokens for one prompt, or a 400 when prompt + completion cannot fit the context."""
    n_ctx = model.n_ctx
    what = "messages" if req.kind == "chat" else "prompt"
    if n_prompt == 0:
        raise bad_request(f"The {what} is empty.", param=what, code="invalid_value")
    wanted = req.sampling.max_tokens
    if n_prompt >= n_ctx or (wanted is not None and n_prompt + wanted > n_ctx):
        asked = f"{n_prompt + (wanted or 1)} tokens ({n_prompt} in the {what}, " \
                f"{wanted or 1} in the completion)"
        raise bad_request(f"This model's maximum context length is {n_ctx} tokens. However, "
                          f"you requested {asked}. Please reduce the length of the {what} or "
                          "completion.", param=what, code="context_length_exceeded")
    return wanted if wanted is not None else min(cap, n_ctx - n_prompt)


def plan(req: GenerationRequest, served: ServedModel, cap: int) -> Plan:
    """Tokenize and check everything that can be checked before taking a slot."""
    model = served.model
    bias = req.sampling.logit_bias or {}
    bad = [t for t in bias if not 0 <= t < model.n_vocab]
    if bad:
        raise bad_request(f"Token id {bad[0]} in 'logit_bias' is outside the vocabulary "
                          f"(0..{model.n_vocab - 1}).", param="logit_bias", code="invalid_value")
    try:
        if req.kind == "chat":
            raw = [_chat_prompt(req, model)]
        else:
            raw = [_completion_prompt(p, model) for p in req.prompts]
    except EngineError as e:  # tokenizer trouble with user text
        raise APIError(422, str(e), code="tokenizer_error") from None
    prompts = [Prompt(ids, text, _budget(len(ids), req, model, cap)) for ids, text in raw]
    _check_grammar(req, model)
    return Plan(req, served, prompts)


def _check_grammar(req: GenerationRequest, model) -> None:
    """Fit the grammar to this model's vocabulary now (built once per model and grammar), so
    a grammar naming tokens the model lacks is a 400 before the request takes a slot."""
    compile_grammar = getattr(model, "compile_grammar", None)
    if req.grammar is None or compile_grammar is None:
        return
    try:
        compile_grammar(req.grammar)
    except GrammarError as e:
        param = "tools" if req.tools else "response_format"
        raise bad_request(f"Invalid '{param}' for this model: {e}", param=param,
                          code="invalid_schema") from None


# --- running ----------------------------------------------------------------------------------

class StopCheck:
    """`should_stop` for the engine: client gone, request timed out, or server shutting down."""

    def __init__(self, disconnected=None, timeout: float = 600.0, shutdown=None):
        self.disconnected = disconnected
        self.deadline = time.monotonic() + timeout
        self.shutdown = shutdown
        self.reason: str | None = None

    def __call__(self) -> bool:
        if self.reason is None:
            if self.shutdown is not None and self.shutdown.is_set():
                self.reason = "shutdown"
            elif time.monotonic() > self.deadline:
                self.reason = "timeout"
            elif self.disconnected is not None and self.disconnected():
                self.reason = "disconnect"
        return self.reason is not None

    def error(self) -> APIError:
        if self.reason == "disconnect":  # nobody reads it; 499 keeps it apart in the metrics
            return APIError(499, "The client closed the connection.", code="client_disconnected")
        if self.reason == "shutdown":
            return APIError(503, "The server is shutting down; the generation was cancelled.",
                            code="server_shutting_down")
        return APIError(503, "The generation ran past the request timeout and was cancelled.",
                        code="request_timeout")


@dataclass
class ChoiceResult:
    index: int
    prompt: Prompt
    tokens: list = field(default_factory=list)   # GeneratedToken, sampled ones only
    text: str = ""
    finish_reason: str | None = None
    parser: ToolCallParser | None = None  # when the reply may hold tool calls
    delta: Delta | None = None  # what the parser let through for the latest token; after the
    #                             last one, what it let go at the end


@dataclass
class Stats:
    """Per-request timing and counts for usage and metrics."""

    start: float                       # request arrival (perf_counter)
    admitted: float = 0.0              # slot taken
    first_token: float | None = None
    completion_tokens: int = 0


def engine_options(plan: Plan, choice: int, prompt: Prompt, should_stop) -> dict:
    s = plan.req.sampling
    seed = None if s.seed is None else (s.seed + choice) % 2**32  # n>1: distinct, reproducible
    opts = dict(max_tokens=prompt.max_tokens, stop=tuple(s.stop), temperature=s.temperature,
                top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, seed=seed,
                repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty, logit_bias=s.logit_bias,
                logprobs=plan.req.logprobs, should_stop=should_stop, grammar=plan.req.grammar)
    # "not given" is left out rather than passed as None: the engine's defaults apply
    return {k: v for k, v in opts.items() if v is not None}


def is_sampled(tok) -> bool:
    """False for the marker a cancelled generation ends with (id -1, or None)."""
    return tok.id is not None and tok.id >= 0


def run_choice(plan: Plan, result: ChoiceResult, should_stop, stats: Stats):
    """Yield each GeneratedToken of one choice, filling `result` as it goes."""
    opts = engine_options(plan, result.index, result.prompt, should_stop)
    tools = plan.req.tools
    if tools is not None and tools.calls_allowed and plan.req.kind == "chat":
        result.parser = ToolCallParser()
    try:
        tokens = plan.served.model.generate(result.prompt.ids, **opts)
        for tok in tokens:
            if stats.first_token is None:
                stats.first_token = time.perf_counter()
            if is_sampled(tok):
                result.tokens.append(tok)
                stats.completion_tokens += 1
            result.text += tok.text or ""
            result.finish_reason = tok.finish_reason or result.finish_reason
            if result.parser is not None:
                result.delta = result.parser.push(tok.text or "")
            yield tok
            if result.parser is not None and result.parser.repeated:  # a call loop: end it
                tokens.close()
                result.finish_reason = "stop"
                break
    except ContextOverflowError as e:
        raise bad_request(str(e), param="messages" if plan.req.kind == "chat" else "prompt",
                          code="context_length_exceeded") from None
    except EngineError as e:  # the engine refused an option value: the user's to fix
        raise bad_request(str(e), code="invalid_value") from None
    if result.finish_reason is None:  # the engine ended without saying why: it was stopped
        result.finish_reason = "cancelled"
    if result.parser is not None:
        result.delta = result.parser.finish()


def collect(plan: Plan, should_stop, stats: Stats) -> list[ChoiceResult]:
    """Run every choice to the end (non-streaming)."""
    results = []
    for choice, prompt in plan.jobs():
        result = ChoiceResult(choice, prompt)
        for _ in run_choice(plan, result, should_stop, stats):
            pass
        results.append(result)
        if result.finish_reason == "cancelled":
            break
    return results


def prompt_logprobs(model, ids: list[int], k: int) -> list[tuple[float | None, list]]:
    """(logprob, top-k [(id, logprob)]) of each prompt token given the ones before it."""
    logits = np.asarray(model.logits(ids), dtype=np.float64)  # (n_tokens, n_vocab)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    out: list[tuple[float | None, list]] = [(None, [])]
    for i in range(1, len(ids)):
        row = logp[i - 1]
        top = np.argsort(-row)[:k] if k else []
        out.append((float(row[ids[i]]), [(int(t), float(row[t])) for t in top]))
    return out
