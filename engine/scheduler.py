"""Continuous batching: every generation of a model runs in steps of one forward pass.

    loop:  schedule → run → postprocess
    schedule:     every running sequence that decodes takes one row; sequences still
                  prefilling take chunks of their prompt while the step's token budget lasts;
                  waiting sequences join while rows and KV blocks remain
    run:          one forward pass over the packed batch (engine/batch.py), each weight matrix
                  read once for all of them; the output head only for rows that need logits
    postprocess:  each finished row's logits go to its sequence's `Decoding`, which samples
                  the next token; the token goes to the sequence's `TokenStream`

The steps run on the process's compute thread (engine/compute.py); requests are submitted
from any thread and read their tokens from a `TokenStream`. A sequence joins at the next step
and leaves as soon as it finishes or is cancelled. Its
keys and values live in the KV pool (engine/kv.py): blocks are allocated as it grows, shared
with earlier sequences through the prefix cache, and given back when it ends. When the pool
runs out, the sequence that started last is preempted: its blocks are released and it waits
to be recomputed (its own tokens so far, much of it from the prefix cache), then goes on.

Every kernel computes a row the same way whatever else is in the batch (the matmuls round
each row's activations on their own, attention loops over each row's own keys), so a
sequence's tokens do not depend on the company it keeps. The structure follows nano-vllm
(`scheduler.py`, `block_manager.py`, `sequence.py`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .batch import Batch
from .compute import COMPUTE
from .errors import ContextOverflowError, EngineError
from .generate import Decoding, GeneratedToken
from .kv import BLOCK, KVFull, KVPool

log = logging.getLogger(__name__)

STEP_TOKENS = 128  # rows per step beyond the decoding ones: prefill's share of a step
MAX_SEQS = 64  # sequences in a batch at most
_END = object()  # what a TokenStream's queue holds after the last token


class Channel:
    """What the compute thread and one TokenStream share: the tokens made so far, and
    whether the reader has gone. The scheduler holds only this, so a TokenStream that its
    reader drops is collected, and its finalizer cancels the generation."""

    def __init__(self, n_prompt: int):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.prompt_tokens = n_prompt
        self.cached_tokens = 0
        self.cancelled = False

    def put(self, item) -> None:
        self.queue.put(item)


class TokenStream:
    """One generation's tokens as they are made: iterate it for `GeneratedToken`s.

    It is filled by the compute thread; `close()` (or dropping it) cancels the generation,
    which leaves the batch at the next step. `prompt_tokens` and `cached_tokens` (prompt
    tokens whose keys and values came from the prefix cache) are known once the generation
    has started.
    """

    def __init__(self, channel: Channel):
        self._channel = channel
        self._done = False

    @property
    def prompt_tokens(self) -> int:
        return self._channel.prompt_tokens

    @property
    def cached_tokens(self) -> int:
        return self._channel.cached_tokens

    def __iter__(self):
        return self

    def __next__(self) -> GeneratedToken:
        if self._done:
            raise StopIteration
        item = self._channel.queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        """Stop the generation (a no-op once it has ended)."""
        self._channel.cancelled = True

    def __del__(self):
        self._channel.cancelled = True


class Sequence:
    """One generation as the scheduler sees it: its tokens, its KV blocks, its Decoding."""

    def __init__(self, tokens: list[int], decoding: Decoding, out: Channel,
                 should_stop: Callable[[], bool] | None, forks=()):
        self.tokens = list(tokens)  # the prompt, then every sampled token
        self.n_prompt = len(tokens)
        self.n_computed = 0  # leading tokens whose keys and values are in the cache
        self.blocks: list[int] = []  # KV blocks, in position order
        self.n_registered = 0  # leading blocks entered in the prefix cache
        self.chain = 0  # the prefix-cache hash of the last registered block
        self.decoding = decoding
        self.out = out
        self.should_stop = should_stop
        self.forks = list(forks)  # (Decoding, Channel) of the other choices (n > 1)
        self.started = False  # has it been admitted once (its prefix looked up)

    @property
    def n_todo(self) -> int:
        """Tokens whose keys and values still have to be computed."""
        return len(self.tokens) - self.n_computed

    def channels(self) -> list[Channel]:
        return [self.out] + [c for _, c in self.forks]


@dataclass
class Stats:
    """What the scheduler has done, for metrics (read without a lock: counters only grow)."""

    steps: int = 0
    step_seconds: float = 0.0
    rows: int = 0  # tokens run through the model
    prefill_rows: int = 0
    sequences: int = 0  # sum of batch sizes over steps
    preempted: int = 0
    running: int = 0
    waiting: int = 0


class Scheduler:
    """Runs `network`'s generations with its KV pool; they are submitted from any thread and
    stepped on the compute thread."""

    def __init__(self, network, pool: KVPool, step_tokens: int = STEP_TOKENS,
                 max_seqs: int = MAX_SEQS, name: str = "model"):
        self.network = network
        self.pool = pool
        self.step_tokens = step_tokens
        self.max_seqs = max_seqs
        self.name = name
        self.waiting: deque[Sequence] = deque()  # guarded by _cond
        self.running: list[Sequence] = []  # the compute thread's own
        self.stats = Stats()
        self._cond = threading.Condition()
        COMPUTE.add(self)

    @property
    def capacity(self) -> int:
        """The most positions one sequence may ever hold: the whole pool."""
        return self.pool.n_blocks * BLOCK

    # -- the requests' side ---------------------------------------------------------------

    def submit(self, prompt_ids: list[int], decodings: list[Decoding],
               should_stop: Callable[[], bool] | None = None) -> list[TokenStream]:
        """Start one generation per Decoding, all after the same prompt (prefilled once);
        returns their streams, in order."""
        need = len(prompt_ids) + max(d.max_tokens for d in decodings)
        if need > self.capacity:
            raise ContextOverflowError(
                f"the prompt ({len(prompt_ids)} tokens) and the completion "
                f"({need - len(prompt_ids)} tokens) need {need} positions of KV cache, but "
                f"{self.name}'s cache holds {self.capacity}: ask for fewer tokens, or give the "
                f"cache more memory")
        channels = [Channel(len(prompt_ids)) for _ in decodings]
        forks = list(zip(decodings[1:], channels[1:]))
        seq = Sequence(prompt_ids, decodings[0], channels[0], should_stop, forks)
        with self._cond:
            self.waiting.append(seq)
            self.stats.waiting = len(self.waiting)
        COMPUTE.wake()
        return [TokenStream(c) for c in channels]

    # -- the compute thread's side --------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run_step(self) -> None:
        """`step()`, and if it fails (a bug), every sequence in it fails rather than hangs."""
        try:
            self.step()
        except Exception as e:  # noqa: BLE001 - a bug must not hang every generation
            log.exception("scheduler step failed")
            for seq in list(self.running):
                self._end(seq, EngineError(f"generation failed: {e}"))

    def step(self) -> None:
        """One forward pass over everything that can run now."""
        started = time.perf_counter()
        self._drop_stopped()
        plan = self._schedule()  # [(sequence, rows it runs this step)]
        if not plan:
            return
        pieces = [(seq.tokens[seq.n_computed: seq.n_computed + n], seq.n_computed)
                  for seq, n in plan]
        batch = Batch.pack(pieces, self.pool, [seq.blocks for seq, _ in plan])
        hidden = self.network.forward(batch)  # (n, dim)
        for seq, n in plan:
            seq.n_computed += n
            self._register_full_blocks(seq)
        ready = [i for i, (seq, _) in enumerate(plan) if seq.n_todo == 0]
        if ready:
            logits = self.network.logits(hidden[batch.last_rows()[ready]])  # (len, n_vocab)
            for row, i in enumerate(ready):
                self._sample(plan[i][0], logits[row])
        s = self.stats
        s.steps += 1
        s.rows += len(batch.ids)
        s.prefill_rows += sum(n for _, n in plan if n > 1)
        s.sequences += len(plan)
        s.running, s.waiting = len(self.running), len(self.waiting)
        s.step_seconds += time.perf_counter() - started

    # schedule ---------------------------------------------------------------------------

    def _schedule(self) -> list[tuple[Sequence, int]]:
        plan: list[tuple[Sequence, int]] = []
        for seq in [s for s in self.running if s.n_todo == 1]:  # decoding: one row each
            if seq in self.running and self._reserve(seq, 1, plan):
                plan.append((seq, 1))
        budget = self.step_tokens
        for seq in [s for s in self.running if s.n_todo > 1]:  # prefilling: a chunk each
            if budget <= 0:
                break
            n = min(seq.n_todo, budget)
            if seq in self.running and self._reserve(seq, n, plan):
                plan.append((seq, n))
                budget -= n
        while budget > 0 and len(self.running) < self.max_seqs:
            with self._cond:
                if not self.waiting:
                    break
                seq = self.waiting[0]
            if not self._admit(seq):
                break
            n = min(seq.n_todo, budget)
            if not self._reserve(seq, n, plan):
                self._preempt(seq)
                break
            plan.append((seq, n))
            budget -= n
        if not plan and len(self.running) > 1:  # all stuck on a full pool: the newest waits
            self._preempt(self.running[-1])
        elif not plan and self.waiting and not self.running:
            # nothing runs and the first in line cannot start: its prompt alone is too big
            with self._cond:
                seq = self.waiting.popleft()
            self._end(seq, ContextOverflowError("the KV cache is too small for this prompt"))
        return plan

    def _admit(self, seq: Sequence) -> bool:
        """Move the first waiting sequence to running, its prompt's prefix from the cache."""
        limit = len(seq.tokens) - 1  # the last token is always computed: its logits are needed
        seq.blocks = self.pool.lookup(seq.tokens, limit)
        seq.n_computed = len(seq.blocks) * BLOCK
        seq.n_registered = len(seq.blocks)
        seq.chain = self._chain(seq.tokens, len(seq.blocks))
        if not seq.started:
            seq.started = True
            for channel in seq.channels():
                channel.cached_tokens = seq.n_computed
        with self._cond:
            self.waiting.popleft()
        self.running.append(seq)
        return True

    def _reserve(self, seq: Sequence, n: int, plan) -> bool:
        """Blocks for `seq`'s next `n` positions. When the pool is full, a sequence that
        started after `seq` and is not in this step yet is preempted to make room."""
        need = -(-(seq.n_computed + n) // BLOCK) - len(seq.blocks)
        while need > 0:
            try:
                seq.blocks.append(self.pool.allocate())
                need -= 1
            except KVFull:
                later = self.running[self.running.index(seq) + 1:]
                victims = [s for s in later if all(s is not p for p, _ in plan)]
                if not victims:
                    return False
                self._preempt(victims[-1])
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Give back `seq`'s blocks; it waits at the front to be recomputed."""
        self.pool.release(seq.blocks)
        seq.blocks, seq.n_computed, seq.n_registered, seq.chain = [], 0, 0, 0
        if seq in self.running:
            self.running.remove(seq)
        with self._cond:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.waiting.appendleft(seq)
        self.stats.preempted += 1

    # postprocess ------------------------------------------------------------------------

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Enter each block whose positions are now all computed in the prefix cache."""
        while (seq.n_registered + 1) * BLOCK <= seq.n_computed:
            i = seq.n_registered
            key = self.pool.block_key(seq.chain, seq.tokens[i * BLOCK:(i + 1) * BLOCK])
            self.pool.register(seq.blocks[i], key)
            seq.chain = hash(key)
            seq.n_registered += 1

    def _chain(self, tokens: list[int], n_blocks: int) -> int:
        chain = 0
        for i in range(n_blocks):
            chain = hash(self.pool.block_key(chain, tokens[i * BLOCK:(i + 1) * BLOCK]))
        return chain

    def _sample(self, seq: Sequence, logits: np.ndarray) -> None:
        if seq.forks:
            self._fork(seq, logits)
        try:
            token = seq.decoding.step(logits)
        except Exception as e:  # noqa: BLE001 - e.g. a grammar error: this sequence's alone
            self._end(seq, e if isinstance(e, EngineError) else EngineError(str(e)))
            return
        seq.out.put(token)
        if token.finish_reason:
            self._end(seq)
        else:
            seq.tokens.append(token.id)

    def _fork(self, seq: Sequence, logits: np.ndarray) -> None:
        """The other choices of an n > 1 request, once the shared prompt is computed: each
        shares its full blocks and gets a copy of the last, partly filled one."""
        forks, seq.forks = seq.forks, []
        for decoding, channel in forks:
            child = Sequence(seq.tokens, decoding, channel, seq.should_stop)
            child.started = True
            n_full = seq.n_computed // BLOCK
            for block in seq.blocks[:n_full]:
                self.pool.hold(block)
            child.blocks = seq.blocks[:n_full]
            child.n_computed, child.n_registered, child.chain = n_full * BLOCK, \
                seq.n_registered, seq.chain
            if n_full < len(seq.blocks):  # copy on write: the last block is written after
                try:
                    block = self.pool.allocate()
                except KVFull:  # no room to copy: recompute that block later
                    child.n_registered = min(child.n_registered, n_full)
                    self._queue_front(child)
                    continue
                self.pool.copy(seq.blocks[n_full], block)
                child.blocks = child.blocks + [block]
                child.n_computed = seq.n_computed
            self.running.append(child)
            self._sample(child, logits)

    def _queue_front(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.n_computed, seq.n_registered, seq.chain = [], 0, 0, 0
        with self._cond:
            self.waiting.appendleft(seq)

    def _drop_stopped(self) -> None:
        """Cancelled (stream closed, client gone, timeout) sequences leave now."""
        with self._cond:
            candidates = self.running + list(self.waiting)
        for seq in candidates:
            stop = seq.out.cancelled or (seq.should_stop is not None and seq.should_stop())
            if stop:
                seq.out.put(seq.decoding.cancelled())
                for decoding, channel in seq.forks:
                    channel.put(decoding.cancelled())
                self._end(seq)

    def _end(self, seq: Sequence, error: BaseException | None = None) -> None:
        """`seq` is done (or failed): its blocks go back, its stream (and forks') end."""
        self.pool.release(seq.blocks)
        seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        with self._cond:
            if seq in self.waiting:
                self.waiting.remove(seq)
        channels = seq.channels() if error is not None else [seq.out]
        for channel in channels:
            if error is not None:
                channel.put(error)
            channel.put(_END)
        if error is None:
            for _, channel in seq.forks:  # cancelled before the forks were made
                channel.put(_END)
