"""Embedding inputs with a served model, whatever the wire format (OpenAI's `/v1/embeddings`,
Ollama's `/api/embed`): tokenize and check each input before a slot is taken, answer what the
LRU cache (`embedding_cache`) has, and embed the rest with one `llm.embed(ids_lists)` call
(the model's own pooling, L2-normalized) while holding an admission slot, like a generation.
A request whose every input is cached never waits for a slot.
"""

from __future__ import annotations

import numpy as np

from engine.errors import ContextOverflowError, EngineError, TokenIdError
from engine.tokenizer import check_token_ids
from server.http.errors import APIError, bad_request


def tokenize(item, llm, where: str, truncate: bool = False) -> list[int]:
    """One input (text or token ids) → checked token ids; over the context: a 400, or cut to
    it when `truncate` (Ollama's default)."""
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
        if truncate:
            return ids[: llm.n_ctx]
        raise bad_request(f"This model's maximum context length is {llm.n_ctx} tokens. "
                          f"However, '{where}' has {len(ids)} tokens. Please reduce its "
                          "length.", param="input", code="context_length_exceeded")
    return ids


def embed_ids(rt, served, ids_lists: list[list[int]]) -> list[np.ndarray]:
    """One normalized float32 vector per token-id list, from the cache or the model."""
    cache = rt.embedding_cache
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
                out = served.llm.embed([list(k[1]) for k in todo], normalize=True)
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
    return [np.asarray(v, dtype=np.float32) for v in vectors]


def shorten(vec: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` components, normalized again (Matryoshka-style truncation)."""
    if dimensions is None or dimensions >= len(vec):
        return vec
    vec = vec[:dimensions]
    return vec / max(float(np.linalg.norm(vec)), 1e-12)
