"""`POST /v1/embeddings`: OpenAI's embeddings route, with an LRU cache of recent vectors.

Inputs are tokenized (and checked against the vocabulary and the context) before a slot is
taken; the inputs the cache cannot answer are embedded by one `model.embed(ids_lists)` call
(the model's own pooling: mean for decoders, `bert.pooling_type` for encoders, which run the
whole list as one packed forward pass; L2-normalized) while holding an admission slot, like a
generation. A request whose every input is cached never waits for a slot. Any served model
that lists "embeddings" among its capabilities can answer.

Options (read from the server config when it has them, else the defaults here):
`embeddings_max_batch` (inputs per request, 256) and `embeddings_cache_bytes` (64 MB; 0 turns
the cache off).
"""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict

import numpy as np
from flask import Blueprint, Flask, current_app, g, jsonify, request

from server.engine_api import ContextOverflowError, EngineError
from server.errors import APIError, bad_request
from server.schema import parse_embeddings, parse_json

POOLING = "model"  # the model's own pooling (part of the cache key)
EXTENSION = "numbalm.embeddings"

bp = Blueprint("v1_embeddings", __name__, url_prefix="/v1")


class EmbeddingCache:
    """(model id, token ids, pooling) -> float32 vector; least recently used out first, bounded
    by the bytes of the vectors and their keys."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(key: tuple, vec: np.ndarray) -> int:
        return vec.nbytes + 8 * len(key[1]) + 64  # vector + ids (as a tuple of ints) + overhead

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            vec = self._items.get(key)
            if vec is not None:
                self._items.move_to_end(key)
            return vec

    def put(self, key: tuple, vec: np.ndarray) -> None:
        size = self._size(key, vec)
        if size > self.max_bytes:
            return
        vec = np.array(vec, dtype=np.float32)  # a private, read-only copy
        vec.flags.writeable = False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= self._size(key, old)
            self._items[key] = vec
            self.bytes += size
            while self.bytes > self.max_bytes:
                k, v = self._items.popitem(last=False)
                self.bytes -= self._size(k, v)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


def init_app(app: Flask) -> None:
    """Register the route and give the app its cache."""
    cfg = app.extensions["numbalm"].config
    app.extensions[EXTENSION] = EmbeddingCache(
        int(cfg.embeddings_cache_bytes))
    app.register_blueprint(bp)


def _tokenize(item, model, i: int, single: bool) -> list[int]:
    where = "input" if single else f"input[{i}]"
    if isinstance(item, str):
        try:
            ids = list(model.tokenizer.encode(item))
        except EngineError as e:
            raise APIError(422, str(e), param="input", code="tokenizer_error") from None
        if not ids:
            raise bad_request(f"'{where}' has no tokens to embed.", param="input",
                              code="invalid_value")
    else:
        ids = [int(t) for t in item]
        bad = [t for t in ids if not 0 <= t < model.n_vocab]
        if bad:
            raise bad_request(f"Token id {bad[0]} in '{where}' is outside the vocabulary "
                              f"(0..{model.n_vocab - 1}).", param="input", code="invalid_value")
    if len(ids) > model.n_ctx:
        raise bad_request(f"This model's maximum context length is {model.n_ctx} tokens. "
                          f"However, '{where}' has {len(ids)} tokens. Please reduce its "
                          "length.", param="input", code="context_length_exceeded")
    return ids


def _encode(vec: np.ndarray, fmt: str):
    if fmt == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vec]


@bp.post("/embeddings")
def create_embeddings():
    rt = current_app.extensions["numbalm"]
    cache: EmbeddingCache = current_app.extensions[EXTENSION]
    max_batch = int(rt.config.embeddings_max_batch)
    req = parse_embeddings(parse_json(request.get_data(cache=False)), max_batch)
    served = rt.pool.get(req.model, need="embeddings")
    model = served.model
    width = int(model.dim)
    if req.dimensions is not None and req.dimensions > width:
        raise bad_request(f"Invalid value for 'dimensions': {req.dimensions}; this model's "
                          f"embeddings have {width} dimensions.", param="dimensions",
                          code="invalid_value")
    single = len(req.inputs) == 1
    ids_lists = [_tokenize(item, model, i, single) for i, item in enumerate(req.inputs)]
    n_tokens = sum(len(ids) for ids in ids_lists)
    g.access.update(model=served.id, prompt_tokens=n_tokens)

    keys = [(served.id, tuple(ids), POOLING) for ids in ids_lists]
    vectors: list[np.ndarray | None] = [cache.get(k) if cache.max_bytes else None for k in keys]
    missing = [i for i, v in enumerate(vectors) if v is None]
    m = rt.metrics
    m.embedding_cache_hits.labels(served.id).inc(len(keys) - len(missing))
    m.embedding_cache_misses.labels(served.id).inc(len(missing))
    if missing:
        todo = list(dict.fromkeys(keys[i] for i in missing))  # one computation per distinct key
        rt.admit()
        try:
            if rt.shutdown.is_set():
                raise APIError(503, "The server is shutting down.", code="server_shutting_down")
            try:
                out = model.embed([list(k[1]) for k in todo], normalize=True)
            except ContextOverflowError as e:
                raise bad_request(str(e), param="input", code="context_length_exceeded") \
                    from None
        finally:
            rt.release()
        computed = dict(zip(todo, np.asarray(out, dtype=np.float32)))
        m.prompt_tokens.labels(served.id).inc(sum(len(k[1]) for k in todo))
        for i in missing:
            vectors[i] = computed[keys[i]]
        if cache.max_bytes:
            for key, vec in computed.items():
                cache.put(key, vec)

    data = []
    for i, vec in enumerate(vectors):
        vec = np.asarray(vec, dtype=np.float32)
        if req.dimensions is not None and req.dimensions < width:
            vec = vec[: req.dimensions]
            vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        data.append({"object": "embedding", "index": i,
                     "embedding": _encode(vec, req.encoding_format)})
    return jsonify({"object": "list", "data": data, "model": served.id,
                    "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
