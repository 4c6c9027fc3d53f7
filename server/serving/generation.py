"""From a validated request to tokens: tokenize, check the context, run `LLM.generate`.

The server reaches the engine only through the `engine.api.LanguageModel` surface: the
tokenizer, `chat_prompt_ids`, `compile_grammar`, `generate` and, for echo with logprobs,
`logits`. Generation runs in the request's thread while it holds an admission slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.constrain import GrammarError
from engine.errors import ChatTemplateError, ContextOverflowError, EngineError, TokenIdError
from engine.sampling import prompt_logprobs as _prompt_logprobs
from engine.tokenizer import check_token_ids
from server.http.errors import APIError, bad_request
from server.serving.pool import ServedModel
from server.serving.request import GenerationRequest
from server.serving.toolcalls import Delta, ToolCallParser


@dataclass
class Prompt:
    ids: list[int]
    text: str         # what echo prepends (completions; "" for chat)
    max_tokens: int   # completion budget for this prompt


@dataclass
class Plan:
    req: GenerationRequest
    served: ServedModel
    prompts: list[Prompt]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)



def _chat_prompt(req: GenerationRequest, llm) -> tuple[list[int], str]:
    tools = req.tools.tools if req.tools else None
    try:
        return llm.chat_prompt_ids(req.messages, tools=tools), ""
    except ChatTemplateError as e:
        raise APIError(422, f"Cannot build a chat prompt for this model: {e}. Use "
                       "/v1/completions for models without a chat template.",
                       param="messages", code="chat_template_error") from None


def chat_prompt_tokens(req: GenerationRequest, llm) -> int:
    """How many tokens the chat prompt of `req` takes (Anthropic's count_tokens)."""
    return len(_chat_prompt(req, llm)[0])


def _completion_prompt(prompt, llm) -> tuple[list[int], str]:
    if isinstance(prompt, str):
        return llm.tokenizer.encode(prompt, add_bos=None, special=True), prompt
    _check_ids(prompt, llm, "prompt")
    return list(prompt), llm.tokenizer.decode(prompt)


def _check_ids(ids, llm, param: str) -> None:
    try:
        check_token_ids(ids, llm.n_vocab, f"'{param}'")
    except TokenIdError as e:
        raise bad_request(f"Invalid '{param}': {e}.", param=param, code="invalid_value") from None


def _budget(n_prompt: int, req: GenerationRequest, llm, cap: int) -> int:
    """max_tokens for one prompt, or a 400 when prompt + completion cannot fit the context."""
    n_ctx = llm.n_ctx
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
    llm = served.llm
    _check_ids(req.sampling.logit_bias or {}, llm, "logit_bias")
    try:
        if req.kind == "chat":
            raw = [_chat_prompt(req, llm)]
        else:
            raw = [_completion_prompt(p, llm) for p in req.prompts]
    except EngineError as e:  # tokenizer trouble with user text
        raise APIError(422, str(e), code="tokenizer_error") from None
    prompts = [Prompt(ids, text, _budget(len(ids), req, llm, cap)) for ids, text in raw]
    _check_grammar(req, llm)
    return Plan(req, served, prompts)


def _check_grammar(req: GenerationRequest, llm) -> None:
    """Fit the grammar to this model's vocabulary now (built once per model and grammar), so
    a grammar naming tokens the model lacks is a 400 before the request takes a slot."""
    if req.grammar is None:
        return
    try:
        llm.compile_grammar(req.grammar)
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
    stream: object = None  # the engine's TokenStream for this choice
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


def engine_options(plan: Plan, seed_base: int) -> dict:
    s = plan.req.sampling
    seed = None if s.seed is None else (s.seed + seed_base) % 2**32  # distinct, reproducible
    opts = dict(stop=tuple(s.stop), temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                min_p=s.min_p, seed=seed, repetition_penalty=s.repetition_penalty,
                repeat_last_n=s.repeat_last_n, penalize_prompt=s.penalize_prompt,
                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                logit_bias=s.logit_bias, logprobs=plan.req.logprobs, grammar=plan.req.grammar)
    # "not given" is left out rather than passed as None: the engine's defaults apply
    return {k: v for k, v in opts.items() if v is not None}


def start(plan: Plan, should_stop, stats: Stats) -> list[ChoiceResult]:
    """Submit every choice of every prompt at once: they run batched, and the n choices of a
    prompt share its prefill (choice i of prompt p is seeded seed + p * n + i). A value the
    engine refuses is a 400 here, before any byte of the response is sent."""
    n, llm = plan.req.n, plan.served.llm
    calls_possible = plan.req.tools is not None and plan.req.tools.calls_allowed \
        and plan.req.kind == "chat"
    results: list[ChoiceResult] = []
    try:
        for p, prompt in enumerate(plan.prompts):
            streams = llm.submit(prompt.ids, n, max_tokens=prompt.max_tokens,
                                 should_stop=should_stop, **engine_options(plan, p * n))
            results += [ChoiceResult(p * n + i, prompt, stream,
                                     parser=ToolCallParser() if calls_possible else None)
                        for i, stream in enumerate(streams)]
    except ContextOverflowError as e:
        close(results)
        raise bad_request(str(e), param="messages" if plan.req.kind == "chat" else "prompt",
                          code="context_length_exceeded") from None
    except EngineError as e:  # the engine refused an option value: the user's to fix
        close(results)
        raise bad_request(str(e), code="invalid_value") from None
    return results


def close(results: list[ChoiceResult]) -> None:
    """Cancel whatever is still running (a no-op for choices that have ended)."""
    for result in results:
        result.stream.close()


def is_sampled(tok) -> bool:
    """False for the marker a cancelled generation ends with (id -1, or None)."""
    return tok.id is not None and tok.id >= 0


def run_choice(result: ChoiceResult, stats: Stats):
    """Yield each GeneratedToken of one started choice, filling `result` as it goes."""
    try:
        for tok in result.stream:
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
                result.stream.close()
                result.finish_reason = "stop"
                break
    except EngineError as e:  # e.g. the grammar and the model disagree: the user's schema
        raise bad_request(str(e), code="invalid_value") from None
    if result.finish_reason is None:  # the engine ended without saying why: it was stopped
        result.finish_reason = "cancelled"
    if result.parser is not None:
        result.delta = result.parser.finish()


def collect(results: list[ChoiceResult], stats: Stats) -> list[ChoiceResult]:
    """Run every choice to the end (non-streaming)."""
    for result in results:
        for _ in run_choice(result, stats):
            pass
        if result.finish_reason == "cancelled":
            break
    return results


def cached_tokens(plan: Plan, results: list[ChoiceResult]) -> int:
    """Prompt tokens the prefix cache had, summed over the prompts (their first choices)."""
    return sum(r.stream.cached_tokens for r in results if r.index % plan.req.n == 0)


def matched_stop(result: ChoiceResult, tokenizer, stops: list[str]) -> str | None:
    """The stop sequence that ended `result`, or None (it ended on an end-of-turn token, or
    was not stopped). The engine cuts the stop out of the text; decoding the sampled tokens
    again shows which one it was."""
    if result.finish_reason != "stop" or not stops or not result.tokens:
        return None
    if result.tokens[-1].id in tokenizer.eot_ids or result.tokens[-1].id == tokenizer.eos_id:
        return None
    rest = tokenizer.decode([t.id for t in result.tokens])[len(result.text):]
    found = [(rest.find(s), s) for s in stops if s in rest]
    return min(found)[1] if found else None


def prompt_logprobs(llm, ids: list[int], k: int) -> list[tuple[float | None, list]]:
    """(logprob, top-k [(id, logprob)]) of each prompt token given the ones before it."""
    return _prompt_logprobs(llm.logits(ids), ids, k)
