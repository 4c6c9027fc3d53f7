"""`POST /tokenize` and `POST /detokenize` in llama-server's shapes (also under `/v1`).

    POST /tokenize   {"content": "Hello", "add_special": false, "parse_special": true,
                      "with_pieces": false}         -> {"tokens": [19556]}
                     with_pieces: {"tokens": [{"id": 19556, "piece": "Hello"}]}
    POST /detokenize {"tokens": [19556]}           -> {"content": "Hello"}

A piece that is not whole UTF-8 (part of a multi-byte character) is given as its byte values,
as llama-server does. `model` picks a served model (our addition; llama-server serves one).
Neither route takes a generation slot: tokenizing is quick and runs in the request's thread.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from engine.errors import EngineError, TokenIdError
from engine.tokenizer import check_token_ids
from server.http.errors import APIError, bad_request
from server.http.schema import Array, Boolean, Integer, Object, String, route
from server.openai.schemas import INT32_MAX, MODEL

bp = Blueprint("llamacpp", __name__)

TOKENIZE = Object({
    "model": MODEL,
    "content": String(required=True, description="The text to tokenize."),
    "add_special": Boolean(default=False, description="Add the model's BOS token, if any."),
    "parse_special": Boolean(default=True, description="Read control-token text such as "
                             "<|im_start|> as that token (else as plain text)."),
    "with_pieces": Boolean(default=False, description="Give each token's text too."),
}, title="TokenizeRequest")
DETOKENIZE = Object({
    "model": MODEL,
    "tokens": Array(items=Integer(0, INT32_MAX, nullable=False), required=True,
                    description="Token ids."),
}, title="DetokenizeRequest")


def _llm(model: str | None):
    return current_app.extensions["numbalm"].pool.get(model, need="completion").llm


def _piece(tokenizer, token_id: int):
    raw = bytes(tokenizer.token_bytes(token_id))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@bp.post("/tokenize")
@bp.post("/v1/tokenize", endpoint="tokenize_v1")
@route("Tokenize text (llama-server's shape)", body=TOKENIZE, tag="Tokenizer")
def tokenize(body):
    tokenizer = _llm(body["model"]).tokenizer
    try:
        ids = tokenizer.encode(body["content"], add_bos=body["add_special"] or False,
                               special=body["parse_special"])
    except EngineError as e:
        raise APIError(422, str(e), param="content", code="tokenizer_error") from None
    if body["with_pieces"]:
        return jsonify({"tokens": [{"id": i, "piece": _piece(tokenizer, i)} for i in ids]})
    return jsonify({"tokens": list(ids)})


@bp.post("/detokenize")
@bp.post("/v1/detokenize", endpoint="detokenize_v1")
@route("Turn token ids back into text (llama-server's shape)", body=DETOKENIZE,
       tag="Tokenizer")
def detokenize(body):
    llm = _llm(body["model"])
    try:
        check_token_ids(body["tokens"], llm.n_vocab, "'tokens'")
    except TokenIdError as e:
        raise bad_request(f"Invalid 'tokens': {e}.", param="tokens", code="invalid_value") \
            from None
    return jsonify({"content": llm.tokenizer.decode(body["tokens"])})
