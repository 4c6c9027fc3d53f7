"""`load_model`: a GGUF file (or registry id) → a ready model with tokenizer and generate().

This is the public face of the engine (docs/internals.md): `LLM` implements
`engine.api.LanguageModel`, the surface the server and the CLI reach the engine through.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np

from . import chat
from .backends import DEFAULT_BACKEND, get_backend
from .batch import scratch_batch
from .compute import COMPUTE
from .errors import CapabilityError, ContextOverflowError, EngineError, GGUFError, TokenizerError
from .generate import Decoding, GeneratedToken, check_prompt
from .gguf_file import GGUFFile, open_gguf
from .kv import BLOCK, KVPool
from .models import build_model, capabilities, no_chat_message
from .repack_cache import RepackCache
from .sampling import SamplingParams
from .scheduler import STEP_TOKENS, Scheduler, TokenStream
from .tokenizer import Tokenizer, check_token_ids

MAX_BATCH_TOKENS = 8192  # tokens per forward pass when embedding many inputs
KV_CACHE_MB = 1024  # the KV pool of one model, shared by all its running generations
MIN_SHARD_TOKENS = 48  # a smaller pass is not worth a second thread (BLAS is slow below)
_POOL_LOCK = threading.Lock()


class LLM:
    """A loaded model: tokenizer, forward pass, generation, embeddings."""

    def __init__(self, gf: GGUFFile, backend: str | None = None, model_id: str | None = None,
                 n_ctx: int | None = None, kv_cache_mb: float = KV_CACHE_MB,
                 step_tokens: int = STEP_TOKENS, chat_template: str | None = None,
                 repack_cache: RepackCache | None = None):
        started = time.perf_counter()
        self.id = model_id or os.path.splitext(os.path.basename(gf.path))[0]
        self.path = gf.path
        self.architecture = gf.architecture
        self.metadata = gf.metadata
        self.backend = get_backend(backend)
        self.backend_name: str = self.backend.name
        # the fast backend's repacked weights, mapped from disk when an earlier load wrote
        # them (engine/repack_cache.py; `load_model` opens it)
        cache = repack_cache if self.backend_name == "fast" else None
        if cache is not None:
            cache.match(gf)
        try:
            self.tokenizer = Tokenizer.from_metadata(gf.metadata)
        except TokenizerError as e:  # the vocabulary is part of the file
            raise GGUFError(f"{gf.path}: {e}") from None
        if cache is None:
            _, self.args, self.model = build_model(gf, self.backend)
        else:
            self.backend.repack_cache = cache
            try:
                _, self.args, self.model = build_model(gf, self.backend)
            finally:
                self.backend.repack_cache = None
            cache.close()  # writes the file when weights had to be repacked
        self._encoder_pool: ThreadPoolExecutor | None = None  # made on first big batch
        self.n_ctx = min(n_ctx or self.args.n_ctx, self.args.n_ctx)
        self.n_vocab = self.args.n_vocab
        self.dim = self.args.dim
        # A template given by the user wins over the file's; without either the model is a
        # base model: it completes text but does not chat (engine.models.capabilities).
        self.chat_template = chat_template or gf.get("tokenizer.chat_template")
        self.capabilities = capabilities(gf.architecture, bool(self.chat_template), gf.path)
        self.scheduler: Scheduler | None = None  # decoders: made on first generate
        self._kv_cache_bytes = int(kv_cache_mb * 2**20)
        self._step_tokens = step_tokens
        self._scheduler_lock = threading.Lock()
        self.load_seconds = time.perf_counter() - started

    def __repr__(self) -> str:
        return f"LLM({self.id!r}, {self.architecture}, backend={self.backend.name})"

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids`, from a fresh context: (len(ids), n_vocab) f32."""
        self.require("completion")
        ids = [int(t) for t in ids]
        check_prompt(ids, self.n_ctx + 1, self.n_vocab)
        return COMPUTE.call(self._logits, ids)

    def _logits(self, ids: list[int]) -> np.ndarray:
        hidden = self.model.forward(scratch_batch([ids], self.model.kv_layout()))
        return self.model.logits(hidden).astype(np.float32)

    def trace(self, prompt, **options):
        """The forward pass over `prompt` (text, token ids or chat messages), layer by layer:
        an `engine.trace.Trace` (logit lens, norms, attention weights, interventions). The
        options are `engine.trace.trace`'s; docs/inspect.md shows how to read it."""
        from .trace import trace

        return trace(self, prompt, **options)

    def generate(self, prompt_ids: list[int], *, max_tokens: int = 256, stop=(),
                 should_stop=None, grammar=None, **sampling) -> TokenStream:
        """Start a generation; iterate the result for one GeneratedToken per sampled token.

        It runs at once, on the compute thread (engine/scheduler.py), batched with
        every other generation of this model: call `generate` for several prompts, then read
        the streams, and they run together. `should_stop()` is polled once per step (the
        generation then ends with finish_reason "cancelled"); closing the stream cancels it.

        `grammar` (an `engine.constrain.Grammar`) constrains the output: its mask is applied
        after penalties and logit_bias, before temperature/top-k/top-p/min-p (greedy picks
        the best allowed token); end of turn is allowed only once the grammar accepts; the
        generation ends with finish_reason "stop" as soon as the grammar is complete, or
        "length" when max_tokens cuts it short. A grammar's reply lands within max_tokens
        (engine/landing.py): when the budget runs short the choice is narrowed to tokens
        that still let the grammar finish, so the text is complete (it then ends "length"),
        unless even the shortest ending known from the start was longer than max_tokens.
        Log-probs, when asked, are those of the masked distribution.
        """
        return self.submit(prompt_ids, 1, max_tokens=max_tokens, stop=stop,
                           should_stop=should_stop, grammar=grammar, **sampling)[0]

    def submit(self, prompt_ids: list[int], n: int = 1, *, max_tokens: int = 256, stop=(),
               should_stop=None, grammar=None, seed: int | None = None,
               **sampling) -> list[TokenStream]:
        """`n` generations after one prompt, which is computed once: a list of n streams.
        Choice i samples with seed `seed + i` (mod 2**32) when a seed is given; otherwise as
        `generate`."""
        self.require("completion")
        if n < 1:
            raise EngineError(f"n must be at least 1, got {n}")
        if grammar is not None:
            self.compile_grammar(grammar)
        prompt_ids = [int(t) for t in prompt_ids]
        decodings = [Decoding(self.tokenizer, prompt_ids, n_ctx=self.n_ctx,
                              max_tokens=max_tokens, stop=stop, grammar=grammar,
                              params=SamplingParams(
                                  seed=None if seed is None else (seed + i) % 2**32, **sampling))
                     for i in range(n)]
        return self._scheduler().submit(prompt_ids, decodings, should_stop)

    def generate_many(self, prompts: list[list[int]], **options) -> list[list[GeneratedToken]]:
        """Run many prompts at once (batched) and return each one's tokens, in order."""
        streams = [self.generate(ids, **options) for ids in prompts]
        return [list(stream) for stream in streams]

    def serving_stats(self) -> dict | None:
        """What the scheduler and its KV pool have done, as plain numbers (None before the
        first generation): steps, step_seconds, rows, prefill_rows, sequences (summed batch
        sizes), preempted, running, waiting, kv_blocks, kv_blocks_used, prefix_hit_tokens,
        prefix_miss_tokens (prompt tokens found / not found in the prefix cache)."""
        if self.scheduler is None:
            return None
        pool = self.scheduler.pool
        return {**asdict(self.scheduler.stats), "kv_blocks": pool.n_blocks,
                "kv_blocks_used": pool.n_used, "prefix_hit_tokens": pool.hits * BLOCK,
                "prefix_miss_tokens": pool.misses * BLOCK}

    def _scheduler(self) -> Scheduler:
        with self._scheduler_lock:
            if self.scheduler is None:
                layout = self.model.kv_layout()
                n_blocks = max(1, self._kv_cache_bytes // KVPool.bytes_per_block(*layout))
                self.scheduler = Scheduler(self.model, KVPool(*layout, n_blocks),
                                           self._step_tokens, name=self.id)
            return self.scheduler

    def compile_grammar(self, grammar):
        """Check `grammar` against this model's vocabulary and build its matcher once (also
        the llguidance tokenizer, ~0.2 s on first use); raises GrammarError. Returns it.

        The one check of a grammar: `generate` calls it, and the server calls it before a
        request waits for a slot."""
        from .constrain import Grammar

        if not isinstance(grammar, Grammar):
            raise EngineError(f"grammar must be an engine.constrain.Grammar, not "
                              f"{type(grammar).__name__}")
        grammar.compile_for(self.tokenizer)
        return grammar

    def require(self, capability: str) -> None:
        """Raise CapabilityError unless this model can do `capability` ("completion", …)."""
        if capability == "chat" and "completion" in self.capabilities \
                and capability not in self.capabilities:
            raise CapabilityError(no_chat_message(self.id))
        if capability not in self.capabilities:
            can = ", ".join(sorted(self.capabilities))
            what = {"completion": "generate text", "chat": "chat"}.get(capability, capability)
            raise CapabilityError(f"model {self.id!r} ({self.architecture}) cannot {what}: "
                                  f"it serves {can} only")

    def embed(self, inputs, pooling: str | None = None, normalize: bool = True,
              truncate: bool = False) -> np.ndarray:
        """Texts or token-id lists → (len(inputs), dim) float32 sentence vectors.

        The final hidden states are pooled over each input's tokens: `mean`, `last`, or
        `cls`/`first` (None: the model's own, bert.pooling_type for encoders, else mean);
        then L2-normalized unless `normalize=False`. An input longer than `n_ctx` is an
        error (ContextOverflowError) unless `truncate=True`. The inputs run packed, a few
        forward passes for all of them (a decoder's with a KV cache of their own).
        """
        self.require("embeddings")
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], (int, np.integer))):
            inputs = [inputs]
        pooling = pooling or getattr(self.args, "pooling", "mean")
        if pooling not in POOLINGS:
            raise EngineError(f"unknown pooling {pooling!r} (choose mean, last or cls)")
        ids_lists = [self._embedding_ids(item, i, truncate) for i, item in enumerate(inputs)]
        out = self._encode_packed(ids_lists, pooling)
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _embedding_ids(self, item, i: int, truncate: bool) -> list[int]:
        """One input → checked token ids (truncated to n_ctx when asked, keeping a final [SEP])."""
        ids = self.tokenizer.encode(item) if isinstance(item, str) else [int(t) for t in item]
        if not ids:
            raise EngineError(f"input {i} has no tokens to embed")
        if len(ids) > self.n_ctx:
            if not truncate:
                raise ContextOverflowError(
                    f"input {i} has {len(ids)} tokens but model {self.id!r} embeds at most "
                    f"{self.n_ctx}: shorten it or pass truncate=True")
            sep = getattr(self.tokenizer, "eos_id", None)
            keep_last = self.architecture == "bert" and ids[-1] == sep
            ids = ids[: self.n_ctx - 1] + [ids[-1]] if keep_last else ids[: self.n_ctx]
        check_token_ids(ids, self.n_vocab, f"input {i}")
        return ids

    def _encode_packed(self, ids_lists: list[list[int]], pooling: str) -> np.ndarray:
        """Inputs packed back to back (no padding), at most MAX_BATCH_TOKENS per forward
        pass; an encoder's big pass is split by sentences over the backend's worker threads
        (its kernels are single-threaded; a decoder's are parallel already)."""
        out = np.empty((len(ids_lists), self.dim), dtype=np.float32)
        first = 0
        while first < len(ids_lists):
            last, n = first, 0
            while last < len(ids_lists) and (last == first or
                                             n + len(ids_lists[last]) <= MAX_BATCH_TOKENS):
                n += len(ids_lists[last])
                last += 1
            shards = split_tokens(first, last, ids_lists, self._encoder_workers())
            jobs = [(a, b, self._encoder_pool.submit(self._encode_shard, ids_lists[a:b], pooling))
                    for a, b in shards[1:]]
            a, b = shards[0]
            out[a:b] = self._encode_shard(ids_lists[a:b], pooling)  # this thread's share
            for a, b, job in jobs:
                out[a:b] = job.result()
            first = last
        return out

    def _encode_shard(self, group: list[list[int]], pooling: str) -> np.ndarray:
        """One forward pass over `group` packed → (len(group), dim) pooled vectors."""
        batch = scratch_batch(group, self.model.kv_layout())
        if self.model.kv_layout() is None:  # an encoder: single-threaded kernels, any thread
            hidden = self.model.forward(batch)
        else:  # a decoder's parallel kernels run on the compute thread
            hidden = COMPUTE.call(self.model.forward, batch)
        return pool_packed(hidden, batch.starts, pooling)  # (B, dim)

    def _encoder_workers(self) -> int:
        if self.model.kv_layout() is not None:
            return 1
        n = self.backend.encoder_workers()
        if n > 1 and self._encoder_pool is None:
            with _POOL_LOCK:
                if self._encoder_pool is None:
                    self._encoder_pool = ThreadPoolExecutor(n - 1, thread_name_prefix="encode")
        return n

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools=None) -> str:
        """Render messages with the model's chat template (the file's, or the one given)."""
        self.require("chat")
        tokens = self.metadata["tokenizer.ggml.tokens"]
        tok = self.tokenizer
        return chat.render_chat(
            self.chat_template, messages,
            bos_token=tokens[tok.bos_id] if tok.bos_id is not None else "",
            eos_token=tokens[tok.eos_id] if tok.eos_id is not None else "",
            add_generation_prompt=add_generation_prompt, tools=tools,
        )

    def chat_prompt_ids(self, messages: list[dict], tools=None) -> list[int]:
        """Messages → prompt token ids, control tokens parsed, BOS as the metadata says.

        A template that already starts with the BOS text does not get a second one.
        """
        text = self.apply_chat_template(messages, tools=tools)
        ids = self.tokenizer.encode(text, add_bos=None, special=True)
        bos = self.tokenizer.bos_id
        if len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids


POOLINGS = ("mean", "last", "cls", "first")


def pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """(n, dim) hidden states → (dim,) one vector for the sequence (`pooling` in POOLINGS)."""
    if pooling == "mean":
        return hidden.mean(axis=0)
    if pooling == "last":
        return hidden[-1]
    return hidden[0]  # cls / first


def pool_packed(hidden: np.ndarray, starts: np.ndarray, pooling: str) -> np.ndarray:
    """(n, dim) hidden states of B inputs packed at `starts` (B+1,) → (B, dim), each pooled
    over its own tokens only."""
    if pooling == "mean":
        sums = np.add.reduceat(hidden, starts[:-1], axis=0, dtype=np.float64)  # (B, dim)
        return (sums / np.diff(starts)[:, None]).astype(np.float32)
    if pooling == "last":
        return hidden[starts[1:] - 1]
    return hidden[starts[:-1]]  # cls / first


def split_tokens(first: int, last: int, ids_lists: list[list[int]],
                 workers: int) -> list[tuple[int, int]]:
    """Inputs first..last-1 → up to `workers` runs (a, b) of about equal token counts, each
    at least MIN_SHARD_TOKENS long (one run when the batch is small)."""
    lengths = np.array([len(ids) for ids in ids_lists[first:last]])
    total = int(lengths.sum())
    k = max(1, min(workers, total // MIN_SHARD_TOKENS, last - first))
    if k == 1:
        return [(first, last)]
    ends = np.searchsorted(np.cumsum(lengths), [total * (i + 1) / k for i in range(k - 1)])
    bounds = [first] + [first + int(e) + 1 for e in ends] + [last]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def load_model(name_or_path: str, backend: str | None = None, n_ctx: int | None = None,
               kv_cache_mb: float = KV_CACHE_MB, step_tokens: int = STEP_TOKENS,
               chat_template: str | None = None, repack_cache: bool | None = None) -> LLM:
    """A registry id, alias or path to a .gguf file → a loaded model. `kv_cache_mb` bounds
    the KV cache of all its running generations together; `step_tokens` is how many prompt
    tokens one batched step may prefill (engine/scheduler.py). `chat_template` (a Jinja
    template's text, e.g. from `engine.chat.read_template`) replaces the file's own; a model
    with neither does not chat. `repack_cache=False` repacks the fast backend's weights
    without keeping them on disk (None: on unless $NUMBALM_REPACK_CACHE=0;
    engine/repack_cache.py)."""
    from .registry import Registry, canonical_id

    registry = Registry()
    path = registry.resolve(name_or_path)
    is_path = os.path.exists(name_or_path)
    entry = None if is_path else registry.find(name_or_path)  # its sha256 keys the cache
    model_id = None if is_path else canonical_id(name_or_path)
    # opened first: its checksums (a thread, without the GIL) overlap the parse below
    cache = RepackCache.for_file(path, entry.sha256 if entry else None, repack_cache) \
        if (backend or DEFAULT_BACKEND) == "fast" else None
    return LLM(open_gguf(path), backend=backend, model_id=model_id,
               n_ctx=n_ctx, kv_cache_mb=kv_cache_mb, step_tokens=step_tokens,
               chat_template=chat_template, repack_cache=cache)
