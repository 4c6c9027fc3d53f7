"""What a route asks the runtime to generate, whatever wire format it came in."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.serving.grammar import ToolSpec


@dataclass
class Sampling:
    """Options passed through to `Model.generate`."""

    max_tokens: int | None = None  # None: up to the cap or the end of the context
    # Not given (None): the engine's defaults, llama.cpp's (0.8, 0.95, 40, 0.05).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int | None = None  # the penalties' window (-1: all); None: the engine's
    penalize_prompt: bool | None = None  # whether the penalties count prompt tokens
    logit_bias: dict[int, float] | None = None


@dataclass
class GenerationRequest:
    kind: str                       # "chat" | "completion"
    model: str | None
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None     # top alternatives per token; None: no logprobs at all
    echo: bool = False              # completions: prepend the prompt
    messages: list[dict] = field(default_factory=list)      # chat: [{"role", "content": str}]
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    tools: ToolSpec | None = None   # chat: tools offered, tool_choice, parallel_tool_calls
    response_format: str = "text"   # "text" | "json_object" | "json_schema"
    grammar: object = None          # an engine Grammar the output must match, or None
