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

from flask import Blueprint, current_app, g, jsonify

from engine.errors import CapabilityError, EngineError, TraceError, TraceTooLargeError
from engine.trace import Steer
from server.http.errors import APIError, bad_request
from server.http.schema import Array, Boolean, Integer, Number, Object, OneOf, String, route
from server.openai.requests import _messages
from server.openai.schemas import INT32_MAX, MESSAGE, MODEL, TOKEN_IDS

bp = Blueprint("v1_trace", __name__, url_prefix="/v1")
MAX_STEER = 8
INDICES = Array(items=Integer(-INT32_MAX, INT32_MAX, nullable=False),  # negative: from the end
                description="Indices; negative ones count from the end, as in Python.")
TRACE = Object({
    "model": MODEL,
    "prompt": OneOf(options=(String(), TOKEN_IDS),
                    description="Text or token ids to trace (or give `messages`)."),
    "messages": Array(items=MESSAGE, min_items=1, description="A chat to trace, as in "
                      "/v1/chat/completions (or give `prompt`)."),
    "top_k": Integer(1, 100, default=5, description="Tokens per logit-lens cell."),
    "attention": Boolean(default=True, description="Record attention weights."),
    "attention_layers": INDICES, "attention_heads": INDICES, "attention_positions": INDICES,
    "ablate_heads": Array(items=Array(items=Integer(0, INT32_MAX, nullable=False),
                                      min_items=2, max_items=2, nullable=False),
                          description="[layer, head] pairs to zero-ablate."),
    "ablate_attn": INDICES, "ablate_mlp": INDICES,
    "steer": Array(items=Object({
        "layer": Integer(0, INT32_MAX, required=True),
        "scale": Number(-1e6, 1e6, default=1.0),
        "vector": Array(items=Number(nullable=False)),
        "positive": String(), "negative": String(),
    }, nullable=False), max_items=MAX_STEER, description="Vectors added to the residual "
        "stream after a layer: given, or the difference of two texts' activations."),
    "max_tokens": Integer(0, INT32_MAX, default=0, description="Generate this many tokens "
                          "first and trace them too."),
    "temperature": Number(0, 2, default=0.0),
    "seed": Integer(),
}, title="TraceRequest")


def parse_trace(body: dict) -> dict:
    """A body validated by `TRACE` → (model name, prompt, trace options)."""
    unknown = sorted(set(body) - set(TRACE.properties))
    if unknown:  # our own extension: a misspelt option is an error, not silently ignored
        raise bad_request(f"Unknown parameter '{unknown[0]}' for /v1/trace (it takes "
                          f"{', '.join(TRACE.properties)}).", param=unknown[0],
                          code="unknown_parameter")
    prompt, messages = body["prompt"], body["messages"]
    if (prompt is None) == (messages is None) or prompt == "":
        raise bad_request("Give either 'prompt' (text or token ids) or 'messages'.",
                          param="prompt", code="missing_required_parameter")
    steer = [Steer(s["layer"], s["vector"], float(s["scale"]), s["positive"], s["negative"])
             for s in body["steer"] or []]
    options = {"top_k": body["top_k"], "attention": body["attention"],
               "ablate_heads": [tuple(p) for p in body["ablate_heads"] or []], "steer": steer,
               "generate": body["max_tokens"], "temperature": body["temperature"]}
    for name in ("attention_layers", "attention_heads", "attention_positions"):
        options[name] = body[name]
    for name in ("ablate_attn", "ablate_mlp"):
        options[name] = body[name] or []
    if body["seed"] is not None:
        options["seed"] = body["seed"]
    prompt = _messages(messages) if messages is not None else prompt
    return {"model": body["model"], "prompt": prompt, "options": options}


@bp.post("/trace")
@route("Trace a prompt through the forward pass (numbalm extension)", body=TRACE,
       tag="numbalm")
def create_trace(body):
    rt = current_app.extensions["numbalm"]
    req = parse_trace(body)
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
