"""The engine's public surface: what the server, the CLI and library users may rely on.

`engine.load_model(...)` returns an `engine.LLM`, which implements `LanguageModel`; the server
holds models only as `LanguageModel`s, so a test can serve a small double that implements the
same protocol (tests/server/fake_engine.py), and nothing outside the engine probes for
attributes. A test holds `LLM` and the fake to this protocol member by member.

Names used across the code base:
- an *architecture's network* is `engine.models.<arch>.Model` (weights + forward pass);
- an *LLM* is a loaded model: tokenizer, network, backend, generation (`engine.LLM`);
- a *served model* is an LLM under the name clients use (`server.serving.pool.ServedModel`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .generate import GeneratedToken


@runtime_checkable
class TextTokenizer(Protocol):
    """Text ↔ token ids (engine.tokenizer.Tokenizer)."""

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    eot_ids: frozenset[int]  # ids that end a turn

    def encode(self, text: str, add_bos: bool | None = None,
               special: bool = False) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def decoder(self):
        """An incremental decoder: `.push(id) -> str` (UTF-8 safe), `.flush() -> str`."""


@runtime_checkable
class TokenStreamLike(Protocol):
    """One running generation (engine.scheduler.TokenStream): iterate it for tokens."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose keys and values came from the prefix cache

    def __iter__(self): ...

    def __next__(self) -> GeneratedToken: ...

    def close(self) -> None:
        """Cancel the generation; it leaves the batch at the next step."""


@runtime_checkable
class LanguageModel(Protocol):
    """A loaded model, as docs/internals.md describes each member."""

    id: str
    architecture: str
    backend_name: str  # "fast" or "reference"
    n_ctx: int
    n_vocab: int
    dim: int
    capabilities: frozenset[str]  # of "completion", "chat", "embeddings"
    tokenizer: TextTokenizer
    metadata: dict  # the GGUF file's key-value metadata (engine.gguf_file.GGUFFile.metadata)
    chat_template: str | None  # the Jinja template chats are rendered with; None: no chat

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), n_vocab) float32, from a fresh context."""

    def generate(self, prompt_ids: list[int], **options) -> TokenStreamLike: ...

    def submit(self, prompt_ids: list[int], n: int = 1, **options) -> list[TokenStreamLike]:
        """n generations after one prompt, computed once; choice i seeded `seed + i`."""

    def serving_stats(self) -> dict | None:
        """The scheduler's counters (engine.LLM.serving_stats), or None."""

    def embed(self, inputs, pooling: str | None = None, normalize: bool = True,
              truncate: bool = False) -> np.ndarray: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools=None) -> str: ...

    def chat_prompt_ids(self, messages: list[dict], tools=None) -> list[int]: ...

    def compile_grammar(self, grammar): ...

    def trace(self, prompt, **options):
        """The forward pass layer by layer: an `engine.trace.Trace` (docs/inspect.md)."""
