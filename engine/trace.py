"""The transparent forward pass: a prompt traced layer by layer.

    tr = model.trace("The capital of France is")
    tr.tokens                          # the token pieces, one per position
    tr.logits                          # (n, n_vocab) final logits, as model.logits(ids)
    tr.logit_lens.top_ids[l, t]        # after layer l, at position t: the k likeliest next ids
    tr.logit_lens.target_rank[l, t]    # ... and the rank of the token that came next (1 = top)
    tr.norms["resid"][l, t]            # |residual stream| after layer l ("attn", "mlp": the
                                       # sizes of what attention and the MLP added to it)
    tr.attention[l][h, i, j]           # layer l, head h: the weight of key j for query i
    tr = model.trace(p, ablate_heads=[(3, 1)]); tr.intervened_logits   # beside tr.logits

How it is recorded: the model's own forward pass (engine/models/llama.py, gemma3.py), on
either backend, calls a `Recorder` at four points when its `Batch` carries one
(`batch.recorder`; None in every other pass, which then costs one `is None` test a layer):

    attention_block   o = rec.heads(i, q, batch, window, scale, o)   weights; head ablation
    forward           x + rec.attn_out(i, attn)                      norm; attention ablation
                      x + rec.mlp_out(i, mlp)                        norm; MLP ablation
                      x = rec.resid_post(i, x)                       steering; the residual

The paged attention kernels return the mixed values, never the probabilities, so the recorder
recomputes them from the rotated queries and the keys in the KV cache with the NumPy twin
(`kernels.attention.attention_weights_ref`), on both backends alike. The logit lens
(nostalgebraist 2020) puts each layer's residual stream through the model's final norm and
output head (`Model.final_norm`, `Model.logits`), so its last layer is the model's output.

Traced passes run with exact matmuls: on the fast backend, whose generation rounds activations
to 15 bits and K-quant scales to float16, `_traced` runs the pass and the lens inside
`FastBackend.exact()` (22-bit activations, the scales' residual added back), so a trace matches
the reference backend's to float32 rounding (tests/engine/test_trace.py). So `tr.logits` are
the exact logits: on the fast backend they differ from `model.logits(ids)` by generation's
rounding (up to 0.02 in a logit on SmolLM2's reference prompts, 0.13 on Gemma 3's), on the
reference one they are equal. Generation (`generate` > 0 chooses the tokens first) is the
ordinary kind.

An intervention (zeroed heads, attention or MLP outputs; a vector added to the residual stream
after a layer, as llama.cpp's control vectors) runs as a second pass: `intervened_logits` are
beside the clean `logits`, and everything else in the trace is from the clean pass.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from kernels.attention import attention_weights_ref

from .batch import scratch_batch
from .compute import COMPUTE
from .errors import TraceError, TraceTooLargeError
from .generate import check_prompt

MAX_TRACE_TOKENS = 1024  # positions in one trace (prompt + generated): the lens is L x n rows
MAX_ATTENTION_WEIGHTS = 2_000_000  # layers x heads x query positions x keys, ~8 MB float32
MAX_TOP_K = 20
LENS_ROWS = 128  # residual rows through the output head at a time: (128, n_vocab) logits
NORMS = ("resid", "attn", "mlp")


@dataclass
class Steer:
    """Add `scale * vector` (dim,) to the residual stream after `layer`, at every position.

    Instead of a vector, give texts: the vector is then the residual stream after `layer` at
    the last token of `positive`, minus that of `negative` when given (ActAdd, Turner et al.
    2023)."""

    layer: int
    vector: np.ndarray | list[float] | None = None
    scale: float = 1.0
    positive: str | None = None
    negative: str | None = None


@dataclass
class LogitLens:
    """Each layer's guess of the next token at each position (L layers, n positions, k)."""

    top_ids: np.ndarray  # (L, n, k) int64, likeliest first
    top_probs: np.ndarray  # (L, n, k) float32
    targets: np.ndarray  # (n,) the token that came next; at the last position the model's top
    target_rank: np.ndarray  # (L, n) int64, 1 = the layer's top guess
    target_prob: np.ndarray  # (L, n) float32


@dataclass
class Trace:
    model: str
    backend: str
    ids: list[int]
    tokens: list[str]  # the piece of text each token stands for
    n_prompt: int  # positions 0..n_prompt-1 are the prompt, the rest were generated
    n_layers: int
    n_heads: int
    logits: np.ndarray  # (n, n_vocab) float32, the model's output
    logit_lens: LogitLens
    norms: dict[str, np.ndarray]  # "resid", "attn", "mlp": (L, n) float32
    residuals: np.ndarray  # (L, n, dim) float32: the residual stream after each layer
    attention: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (H, P, n)
    attention_heads: list[int] = field(default_factory=list)  # the H heads recorded
    attention_positions: list[int] = field(default_factory=list)  # the P query positions
    interventions: dict | None = None  # what was changed (as given, vectors as their norms)
    intervened_logits: np.ndarray | None = None  # (n, n_vocab) with the interventions
    vocab: dict[int, str] = field(default_factory=dict, repr=False)  # pieces of listed ids

    def to_json(self, decimals: int = 5) -> dict:
        """The whole trace as plain JSON values (the body of `POST /v1/trace`, `numbalm
        inspect --json`); ids of the lens are explained in `vocab` ({id: piece})."""
        def r(a):
            return np.round(np.asarray(a, np.float64), decimals).tolist()

        lens = self.logit_lens
        out = {
            "object": "trace", "model": self.model, "backend": self.backend,
            "n_layers": self.n_layers, "n_heads": self.n_heads, "n_prompt": self.n_prompt,
            "tokens": [{"position": t, "id": i, "text": s, "generated": t >= self.n_prompt}
                       for t, (i, s) in enumerate(zip(self.ids, self.tokens))],
            "logit_lens": {"top_ids": lens.top_ids.tolist(), "top_probs": r(lens.top_probs),
                           "targets": lens.targets.tolist(),
                           "target_rank": lens.target_rank.tolist(),
                           "target_prob": r(lens.target_prob)},
            "norms": {k: r(v) for k, v in self.norms.items()},
            "attention": None, "intervention": None,
        }
        if self.attention:
            layers = sorted(self.attention)
            out["attention"] = {"layers": layers, "heads": self.attention_heads,
                                "positions": self.attention_positions,
                                "weights": [r(self.attention[layer]) for layer in layers]}
        if self.intervened_logits is not None:
            k = lens.top_ids.shape[-1]
            top, probs = top_k(self.intervened_logits, k)
            clean = softmax(self.logits)
            changed = softmax(self.intervened_logits)
            rows = np.arange(len(self.ids))
            kl = np.sum(clean * (np.log(clean + 1e-30) - np.log(changed + 1e-30)), axis=1)
            self._add_vocab(top)
            out["intervention"] = {**self.interventions, "top_ids": top.tolist(),
                                   "top_probs": r(probs),
                                   "target_prob": r(changed[rows, lens.targets]),
                                   "kl": r(kl)}
        out["vocab"] = {str(i): s for i, s in sorted(self.vocab.items())}
        return out

    def _add_vocab(self, ids: np.ndarray) -> None:
        for i in np.unique(ids).tolist():
            if i not in self.vocab:
                self.vocab[i] = self._piece(i)

    _piece = staticmethod(str)  # replaced per trace by the tokenizer's pieces


class Recorder:
    """What one traced forward pass records (`record`) or changes (the interventions).

    Called by the model code at the points listed in this module's docstring; every hook
    returns the array the forward pass goes on with."""

    def __init__(self, n_heads: int, record: bool = True, attention_layers=(),
                 attention_heads=(), attention_rows=(), ablate_heads=None, ablate_attn=(),
                 ablate_mlp=(), steer=None):
        self.n_heads = n_heads
        self.record = record
        self.attention_layers = set(attention_layers)
        self.attention_heads = list(attention_heads)
        self.attention_rows = np.asarray(attention_rows, np.int64)
        self.ablate_heads = ablate_heads or {}  # layer -> [head, ...]
        self.ablate_attn, self.ablate_mlp = set(ablate_attn), set(ablate_mlp)
        self.steer = steer or {}  # layer -> (dim,) float32
        self.residuals: list[np.ndarray] = []  # one (n, dim) per layer
        self.norms: dict[str, list[np.ndarray]] = {k: [] for k in NORMS}
        self.attention: dict[int, np.ndarray] = {}

    def heads(self, i: int, q: np.ndarray, batch, window: int, scale: float,
              o: np.ndarray, softcap: float = 0.0) -> np.ndarray:
        """q (n, n_heads, hd) rotated queries; o (n, n_heads * hd) the heads' mixed values."""
        if self.record and i in self.attention_layers:
            keys = batch.kv.k[i][:, batch.slots]  # (n_kv, n, hd): one sequence, from 0
            rows = self.attention_rows
            w = attention_weights_ref(q[rows], keys, batch.positions[rows], window, scale,
                                      softcap)
            self.attention[i] = w[:, self.attention_heads].transpose(1, 0, 2)  # (H, P, n)
        heads = self.ablate_heads.get(i)
        if heads:
            n = o.shape[0]
            o = o.reshape(n, self.n_heads, -1).copy()  # (n, n_heads, hd)
            o[:, heads] = 0.0
            o = o.reshape(n, -1)
        return o

    def attn_out(self, i: int, attn: np.ndarray) -> np.ndarray:
        """What the attention block adds to the residual stream, (n, dim)."""
        if self.record:
            self.norms["attn"].append(np.linalg.norm(attn, axis=1))
        return np.zeros_like(attn) if i in self.ablate_attn else attn

    def mlp_out(self, i: int, mlp: np.ndarray) -> np.ndarray:
        """What the MLP block adds to the residual stream, (n, dim)."""
        if self.record:
            self.norms["mlp"].append(np.linalg.norm(mlp, axis=1))
        return np.zeros_like(mlp) if i in self.ablate_mlp else mlp

    def resid_post(self, i: int, x: np.ndarray) -> np.ndarray:
        """The residual stream after layer i, (n, dim)."""
        vector = self.steer.get(i)
        if vector is not None:
            x = x + vector
        if self.record:
            self.residuals.append(x)
            self.norms["resid"].append(np.linalg.norm(x, axis=1))
        return x


# -- running a trace ----------------------------------------------------------------------


def trace(llm, prompt, *, top_k: int = 5, attention: bool = True, attention_layers=None,
          attention_heads=None, attention_positions=None, ablate_heads=(), ablate_attn=(),
          ablate_mlp=(), steer=(), generate: int = 0, temperature: float = 0.0,
          **sampling) -> Trace:
    """`LLM.trace`: see the module docstring and docs/inspect.md.

    `prompt` is text (control tokens parsed, BOS as the metadata says), token ids, or chat
    messages (rendered with the chat template). `generate` > 0 first generates that many
    tokens (greedy unless `temperature` and other sampling options say otherwise) and traces
    the prompt and them together. `attention_layers`, `attention_heads`,
    `attention_positions` (query positions; negative counts from the end) narrow the
    attention weights recorded (None: all); a trace over MAX_ATTENTION_WEIGHTS of them, or
    over MAX_TRACE_TOKENS positions, raises TraceError naming the option to narrow."""
    llm.require("completion")
    args, model = llm.args, llm.model
    ids = _prompt_ids(llm, prompt)
    n_prompt = len(ids)
    generate = _int(generate, "generate", 0, MAX_TRACE_TOKENS)
    if n_prompt + generate > MAX_TRACE_TOKENS:
        what = "prompt" if generate == 0 else "generate"
        raise TraceTooLargeError(f"a trace covers at most {MAX_TRACE_TOKENS} positions, this one "
                         f"{n_prompt} + {generate}: shorten the {what}", what)
    top_k = _int(top_k, "top_k", 1, MAX_TOP_K)
    L, H, n = args.n_layers, args.n_heads, n_prompt + generate
    layers = _indices(attention_layers, L, "attention_layers") if attention else []
    heads = _indices(attention_heads, H, "attention_heads") if attention else []
    rows = _indices(attention_positions, n, "attention_positions") if attention else []
    size = len(layers) * len(heads) * len(rows) * n
    if size > MAX_ATTENTION_WEIGHTS:
        raise TraceTooLargeError(
            f"the attention weights asked for are {len(layers)} layers x {len(heads)} heads x "
            f"{len(rows)} positions x {n} keys = {size:,} numbers, over the limit of "
            f"{MAX_ATTENTION_WEIGHTS:,}: narrow attention_layers, attention_heads or "
            "attention_positions (or turn attention off)", "attention_layers")
    changes = _interventions(llm, ablate_heads, ablate_attn, ablate_mlp, steer)
    if generate:
        stream = llm.generate(ids, max_tokens=generate, temperature=temperature, **sampling)
        ids = ids + [t.id for t in stream]
        n = len(ids)  # generation may stop early
        rows = _indices(attention_positions, n, "attention_positions") if attention else []

    recorder = Recorder(H, attention_layers=layers, attention_heads=heads, attention_rows=rows)
    logits = _run(llm, ids, recorder)
    intervened = None
    if changes is not None:
        intervened = _run(llm, ids, Recorder(H, record=False, **changes["recorder"]))

    residuals = np.stack(recorder.residuals)  # (L, n, dim)
    targets = np.array(ids[1:] + [int(np.argmax(logits[-1]))], np.int64)  # (n,)
    lens = _traced(llm, _lens, model, residuals, targets, top_k)
    tokenizer = llm.tokenizer
    result = Trace(
        model=llm.id, backend=llm.backend_name, ids=ids,
        tokens=[_piece(tokenizer, i) for i in ids], n_prompt=n_prompt, n_layers=L, n_heads=H,
        logits=logits, logit_lens=lens,
        norms={k: np.stack(v).astype(np.float32) for k, v in recorder.norms.items()},
        residuals=residuals, attention=recorder.attention, attention_heads=heads,
        attention_positions=rows, interventions=None if changes is None else changes["given"],
        intervened_logits=intervened)
    result._piece = lambda i: _piece(tokenizer, i)
    result._add_vocab(np.concatenate([lens.top_ids.ravel(), lens.targets]))
    return result


def _traced(llm, fn, *args):
    """`fn(*args)` on the compute thread with the backend's exact matmuls (`exact()`, which
    only the fast backend has: the reference one is exact already). Entered there, not here,
    so that no generation step of another request runs while it is on."""
    def run():
        with getattr(llm.backend, "exact", nullcontext)():
            return fn(*args)

    return COMPUTE.call(run)


def _run(llm, ids: list[int], recorder: Recorder) -> np.ndarray:
    """One forward pass over `ids` from a fresh context, with `recorder` -> (n, n_vocab)."""
    def run():
        batch = scratch_batch([ids], llm.model.kv_layout())
        batch.recorder = recorder
        return llm.model.logits(llm.model.forward(batch)).astype(np.float32)

    return _traced(llm, run)


def _lens(model, residuals: np.ndarray, targets: np.ndarray, k: int) -> LogitLens:
    """Each layer's residual stream (L, n, dim) through the final norm and output head."""
    L, n, _ = residuals.shape
    top_ids = np.empty((L, n, k), np.int64)
    top_probs = np.empty((L, n, k), np.float32)
    rank = np.empty((L, n), np.int64)
    prob = np.empty((L, n), np.float32)
    for layer in range(L):
        for a in range(0, n, LENS_ROWS):
            b = min(n, a + LENS_ROWS)
            logits = model.logits(model.final_norm(residuals[layer, a:b]))  # (rows, n_vocab)
            probs = softmax(logits)
            top_ids[layer, a:b], top_probs[layer, a:b] = top_k(logits, k, probs)
            rows = np.arange(b - a)
            target_logit = logits[rows, targets[a:b]][:, None]
            rank[layer, a:b] = 1 + np.sum(logits > target_logit, axis=1)
            prob[layer, a:b] = probs[rows, targets[a:b]]
    return LogitLens(top_ids, top_probs, targets, rank, prob)


def softmax(logits: np.ndarray) -> np.ndarray:
    """(n, n_vocab) logits -> probabilities, in float64."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int, probs: np.ndarray | None = None):
    """(n, n_vocab) -> the k largest ids per row (n, k), largest first (ties: lower id
    first), and their probabilities (n, k) float32."""
    probs = softmax(logits) if probs is None else probs
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k]  # (n, k) unordered
    vals = np.take_along_axis(logits, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return ids.astype(np.int64), np.take_along_axis(probs, ids, axis=1).astype(np.float32)


# -- checking what was asked --------------------------------------------------------------


def _prompt_ids(llm, prompt) -> list[int]:
    if isinstance(prompt, str):
        ids = llm.tokenizer.encode(prompt, add_bos=None, special=True)
    elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        ids = llm.chat_prompt_ids(list(prompt))
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        ids = [int(t) for t in prompt]
    else:
        raise TraceError("the prompt must be text, token ids or chat messages, not "
                         f"{type(prompt).__name__}", "prompt")
    check_prompt(ids, llm.n_ctx + 1, llm.n_vocab)
    return ids


def _int(value, option: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
            not lo <= value <= hi:
        raise TraceError(f"{option} must be an integer from {lo} to {hi}, not {value!r}",
                         option)
    return int(value)


def _index(value, size: int, option: str) -> int:
    """One layer, head or position (negative: from the end) -> 0..size-1."""
    i = _int(value, option, -size, size - 1)
    return i + size if i < 0 else i


def _indices(values, size: int, option: str) -> list[int]:
    """None -> all of 0..size-1; else the given ones, checked, in order, once each."""
    if values is None:
        return list(range(size))
    if isinstance(values, (int, np.integer)):
        values = [values]
    return sorted({_index(v, size, option) for v in values})


def _interventions(llm, ablate_heads, ablate_attn, ablate_mlp, steer) -> dict | None:
    """The interventions, checked -> {"recorder": Recorder options, "given": JSON summary},
    or None when there are none."""
    args = llm.args
    L = args.n_layers
    heads: dict[int, list[int]] = {}
    for pair in ablate_heads or ():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TraceError(f"ablate_heads takes [layer, head] pairs, not {pair!r}",
                             "ablate_heads")
        layer, head = _index(pair[0], L, "ablate_heads"), _index(pair[1], args.n_heads,
                                                                  "ablate_heads")
        heads.setdefault(layer, []).append(head)
    attn = _indices(list(ablate_attn or ()), L, "ablate_attn")
    mlp = _indices(list(ablate_mlp or ()), L, "ablate_mlp")
    vectors: dict[int, np.ndarray] = {}
    given_steer = []
    for s in steer or ():
        if not isinstance(s, Steer):
            raise TraceError(f"steer takes Steer(layer, vector, scale), not {s!r}", "steer")
        layer = _index(s.layer, L, "steer")
        vector = _steer_vector(llm, s, layer)
        vectors[layer] = vectors.get(layer, 0) + vector
        given_steer.append({"layer": layer, "scale": float(s.scale),
                            "norm": float(np.linalg.norm(vector)),
                            "positive": s.positive, "negative": s.negative})
    if not (heads or attn or mlp or vectors):
        return None
    given = {"ablate_heads": [[layer, h] for layer in sorted(heads) for h in heads[layer]],
             "ablate_attn": attn, "ablate_mlp": mlp, "steer": given_steer}
    return {"recorder": {"ablate_heads": heads, "ablate_attn": attn, "ablate_mlp": mlp,
                         "steer": vectors}, "given": given}


def _steer_vector(llm, s: Steer, layer: int) -> np.ndarray:
    """scale * (the vector, or the residual difference of the texts) -> (dim,) float32."""
    if s.vector is not None:
        try:
            vector = np.asarray(s.vector, np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise TraceError("steer's vector must be a list of numbers", "steer") from None
        if vector.shape != (llm.dim,) or not np.all(np.isfinite(vector)):
            raise TraceError(f"steer's vector must be {llm.dim} finite numbers (the model's "
                             f"dim), got {vector.size}", "steer")
    elif isinstance(s.positive, str):
        vector = residual_at(llm, s.positive, layer)
        if s.negative is not None:
            vector = vector - residual_at(llm, s.negative, layer)
    else:
        raise TraceError("steer needs a vector or a positive text", "steer")
    try:
        scale = float(s.scale)
    except (TypeError, ValueError):
        raise TraceError(f"steer's scale must be a number, not {s.scale!r}", "steer") from None
    return (np.float32(scale) * vector).astype(np.float32)


def residual_at(llm, text: str, layer: int) -> np.ndarray:
    """The residual stream after `layer` at the last token of `text` -> (dim,) float32."""
    recorder = Recorder(llm.args.n_heads)
    _run(llm, _prompt_ids(llm, text), recorder)
    return recorder.residuals[layer][-1].astype(np.float32)


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(int(token_id)).decode("utf-8", errors="replace")
