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

from server.http.errors import bad_request
from server.http.schema import route
from server.openai.requests import parse_embeddings
from server.openai.schemas import EMBEDDINGS
from server.serving.embedding import embed_ids, shorten, tokenize

bp = Blueprint("v1_embeddings", __name__, url_prefix="/v1")


def _encode(vec: np.ndarray, fmt: str):
    if fmt == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vec]


@bp.post("/embeddings")
@route("Create embeddings", body=EMBEDDINGS, tag="OpenAI")
def create_embeddings(body):
    rt = current_app.extensions["numbalm"]
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
    ids_lists = [tokenize(item, llm, "input" if single else f"input[{i}]")
                 for i, item in enumerate(req.inputs)]
    n_tokens = sum(len(ids) for ids in ids_lists)
    g.access.update(model=served.id, prompt_tokens=n_tokens)
    vectors = embed_ids(rt, served, ids_lists)
    data = [{"object": "embedding", "index": i,
             "embedding": _encode(shorten(vec, req.dimensions), req.encoding_format)}
            for i, vec in enumerate(vectors)]
    return jsonify({"object": "list", "data": data, "model": served.id,
                    "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
