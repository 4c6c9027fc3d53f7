"""`POST /v1/trace`: `model.trace()` over HTTP, beside the OpenAI routes (docs/inspect.md).

The body takes the input of a completion (`prompt`: text or token ids) or of a chat
(`messages`), and the options of `engine.trace.trace` under the same names: `top_k` (tokens
per logit-lens cell), `attention`, `attention_layers`, `attention_heads`,
`attention_positions`, `ablate_heads` ([[layer, head], ...]), `ablate_attn`, `ablate_mlp`,
`steer` ([{"layer", "scale", "vector": [...]} or {"layer", "scale", "positive": text,
"negative": text}]); `max_tokens` generates that many tokens first (greedy unless
`temperature` says otherwise; `seed`) and traces them too. The answer is `Trace.to_json()`.

Types are checked here; ranges and the size bound by the engine (`TraceError`), whose
`option` becomes the 400's `param`. A trace holds an admission slot like a generation, and
the API keys apply as on every /v1 route.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, g, jsonify, request

from engine.errors import CapabilityError, EngineError, TraceError, TraceTooLargeError
from engine.trace import Steer
from server.http.errors import APIError, bad_request
from server.openai.requests import (
    _bool,
    _integer,
    _is_ids,
    _messages,
    _number,
    _type_error,
    parse_json,
)

bp = Blueprint("v1_trace", __name__, url_prefix="/v1")
MAX_STEER = 8
OPTIONS = ("prompt", "messages", "model", "top_k", "attention", "attention_layers",
           "attention_heads", "attention_positions", "ablate_heads", "ablate_attn",
           "ablate_mlp", "steer", "max_tokens", "temperature", "seed")


def _int_list(body: dict, name: str) -> list[int] | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _type_error(name, "an array of integers", value)
    return value


def _pairs(body: dict) -> list[tuple[int, int]]:
    value = body.get("ablate_heads") or []
    ok = isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in p) for p in value)
    if not ok:
        raise _type_error("ablate_heads", "an array of [layer, head] pairs", value)
    return [tuple(p) for p in value]


def _steer(body: dict) -> list[Steer]:
    value = body.get("steer") or []
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise _type_error("steer", "an array of objects", value)
    if len(value) > MAX_STEER:
        raise bad_request(f"'steer' takes at most {MAX_STEER} vectors.", param="steer",
                          code="invalid_value")
    out = []
    for s in value:
        layer = _integer(s, "layer", None)
        if layer is None:
            raise bad_request("Each 'steer' entry needs a 'layer'.", param="steer",
                              code="missing_required_parameter")
        vector = s.get("vector")
        if vector is not None and (not isinstance(vector, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector)):
            raise _type_error("steer", "'vector' as an array of numbers", vector)
        texts = [s.get(k) for k in ("positive", "negative")]
        if any(t is not None and not isinstance(t, str) for t in texts):
            raise _type_error("steer", "'positive' and 'negative' as strings", s)
        out.append(Steer(layer, vector, float(_number(s, "scale", 1.0)), *texts))
    return out


def parse_trace(body: dict) -> dict:
    """The body → (model name, prompt, trace options); a 400 for what is malformed."""
    unknown = sorted(set(body) - set(OPTIONS))
    if unknown:
        raise bad_request(f"Unknown parameter '{unknown[0]}' for /v1/trace (it takes "
                          f"{', '.join(OPTIONS)}).", param=unknown[0],
                          code="unknown_parameter")
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise bad_request("Give either 'prompt' (text or token ids) or 'messages'.",
                          param="prompt", code="missing_required_parameter")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty array.", param="messages",
                              code="invalid_value")
        prompt = _messages(messages)
    elif not (isinstance(prompt, str) and prompt) and not _is_ids(prompt):
        raise _type_error("prompt", "a non-empty string or an array of token ids", prompt)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    options = {"top_k": _integer(body, "top_k", 5), "attention": _bool(body, "attention", True),
               "ablate_heads": _pairs(body), "steer": _steer(body),
               "generate": _integer(body, "max_tokens", 0),
               "temperature": _number(body, "temperature", 0.0, lo=0.0)}
    for name in ("attention_layers", "attention_heads", "attention_positions"):
        options[name] = _int_list(body, name)
    for name in ("ablate_attn", "ablate_mlp"):
        options[name] = _int_list(body, name) or []
    seed = _integer(body, "seed", None)
    if seed is not None:
        options["seed"] = seed
    return {"model": model, "prompt": prompt, "options": options}


@bp.post("/trace")
def create_trace():
    rt = current_app.extensions["numbalm"]
    req = parse_trace(parse_json(request.get_data(cache=False)))
    served = rt.pool.get(req["model"], need="completion")
    g.access.update(model=served.id)
    rt.admit()
    try:
        if rt.shutdown.is_set():
            raise APIError(503, "The server is shutting down.", code="server_shutting_down")
        started = time.perf_counter()
        try:
            tr = served.llm.trace(req["prompt"], **req["options"])
        except TraceError as e:
            param = "max_tokens" if e.option == "generate" else e.option
            code = "trace_too_large" if isinstance(e, TraceTooLargeError) else "invalid_value"
            raise bad_request(f"{e}.", param=param, code=code) from None
        except CapabilityError as e:
            raise bad_request(str(e), param="model", code="model_not_supported") from None
        except EngineError as e:
            raise bad_request(str(e), param="prompt", code="invalid_value") from None
    finally:
        rt.release()
    out = tr.to_json()
    out["usage"] = {"prompt_tokens": tr.n_prompt, "completion_tokens": len(tr.ids) - tr.n_prompt,
                    "total_tokens": len(tr.ids)}
    out["seconds"] = round(time.perf_counter() - started, 3)
    g.access.update(prompt_tokens=tr.n_prompt)
    return jsonify(out)
