"""`POST /v1/embeddings`: OpenAI's embeddings route, with an LRU cache of recent vectors.

Inputs are tokenized (and checked against the vocabulary and the context) before a slot is
taken; the inputs the cache cannot answer are embedded by one `model.embed(ids_lists)` call
(the model's own pooling: mean for decoders, `bert.pooling_type` for encoders, which run the
whole list as one packed forward pass; L2-normalized) while holding an admission slot, like a
generation. A request whose every input is cached never waits for a slot. Any served model
that lists "embeddings" among its capabilities can answer.

Options (server config): `embeddings_max_batch` (inputs per request, 256) and
`embeddings_cache_bytes` (64 MB; 0 turns the cache off; the cache is
`server.serving.embedding_cache`, one per app).
"""

from __future__ import annotations

import base64

import numpy as np
from flask import Blueprint, current_app, g, jsonify

from engine.errors import ContextOverflowError, EngineError, TokenIdError
from engine.tokenizer import check_token_ids
from server.http.errors import APIError, bad_request
from server.http.schema import route
from server.openai.requests import parse_embeddings
from server.openai.schemas import EMBEDDINGS

bp = Blueprint("v1_embeddings", __name__, url_prefix="/v1")


def _tokenize(item, llm, i: int, single: bool) -> list[int]:
    where = "input" if single else f"input[{i}]"
    if isinstance(item, str):
        try:
            ids = list(llm.tokenizer.encode(item))
        except EngineError as e:
            raise APIError(422, str(e), param="input", code="tokenizer_error") from None
        if not ids:
            raise bad_request(f"'{where}' has no tokens to embed.", param="input",
                              code="invalid_value")
    else:
        ids = [int(t) for t in item]
        try:
            check_token_ids(ids, llm.n_vocab, f"'{where}'")
        except TokenIdError as e:
            raise bad_request(f"Invalid 'input': {e}.", param="input",
                              code="invalid_value") from None
    if len(ids) > llm.n_ctx:
        raise bad_request(f"This model's maximum context length is {llm.n_ctx} tokens. "
                          f"However, '{where}' has {len(ids)} tokens. Please reduce its "
                          "length.", param="input", code="context_length_exceeded")
    return ids


def _encode(vec: np.ndarray, fmt: str):
    if fmt == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vec]


@bp.post("/embeddings")
@route("Create embeddings", body=EMBEDDINGS, tag="OpenAI")
def create_embeddings(body):
    rt = current_app.extensions["numbalm"]
    cache = rt.embedding_cache
    max_batch = int(rt.config.embeddings_max_batch)
    req = parse_embeddings(body, max_batch)
    served = rt.pool.get(req.model, need="embeddings")
    llm = served.llm
    width = int(llm.dim)
    if req.dimensions is not None and req.dimensions > width:
        raise bad_request(f"Invalid value for 'dimensions': {req.dimensions}; this model's "
                          f"embeddings have {width} dimensions.", param="dimensions",
                          code="invalid_value")
    single = len(req.inputs) == 1
    ids_lists = [_tokenize(item, llm, i, single) for i, item in enumerate(req.inputs)]
    n_tokens = sum(len(ids) for ids in ids_lists)
    g.access.update(model=served.id, prompt_tokens=n_tokens)

    keys = [(served.id, tuple(ids)) for ids in ids_lists]
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
                out = llm.embed([list(k[1]) for k in todo], normalize=True)
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
