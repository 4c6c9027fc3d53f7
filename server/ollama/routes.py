"""The `/api` Blueprint: Ollama's chat, generate, embed, tags, show, ps, pull and version routes.

A generation runs exactly as one from `/v1` (`server.serving.generation`: plan, admission
slot, batched start, stop checks, metrics); only the wire format differs: NDJSON chunks when
streaming (Ollama streams unless `"stream": false`), Ollama's objects, and Ollama's error
shape `{"error": "message"}` with the HTTP status (for API-key failures too).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from datetime import datetime, timedelta, timezone

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from engine import __version__
from engine.download import Progress
from engine.errors import EngineError
from engine.registry import Registry
from server.http.errors import SHAPES, APIError, ErrorShape, bad_request
from server.http.ndjson import MIMETYPE, ndjson_lines
from server.http.schema import route
from server.http.sse import EventStream
from server.ollama import requests as parse
from server.ollama import shapes
from server.serving.embedding import embed_ids, shorten, tokenize
from server.serving.generation import Stats, StopCheck, close, collect, plan, run_choice, start
from server.serving.runtime import Runtime

bp = Blueprint("ollama", __name__, url_prefix="/api")


def runtime() -> Runtime:
    return current_app.extensions["numbalm"]


def error_body(e: APIError) -> dict:
    """Ollama's error shape: {"error": message}, with the HTTP status."""
    return {"error": e.message}


STREAMS = {"streams": True, "stream_media": MIMETYPE}  # NDJSON unless "stream": false
SHAPES["ollama"] = ErrorShape(error_body, {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}})


@bp.errorhandler(APIError)
def _api_error(e: APIError):
    response = jsonify(error_body(e))
    response.status_code = e.status
    response.headers.update(e.headers)
    return response


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException):
    response = jsonify({"error": e.description or e.name})
    response.status_code = e.code or 500
    return response


def _served(name: str, need: str):
    """The served model for an Ollama name ("smollm2-135m-instruct" or with ":latest")."""
    pool = runtime().pool
    bare = name[:-len(":latest")] if name.endswith(":latest") else name
    try:
        return pool.get(bare if bare in pool.models or bare in pool.aliases else name, need)
    except APIError as e:
        if e.status == 404:  # Ollama's words, which some clients look for
            raise APIError(404, f"model '{name}' not found", headers=e.headers) from None
        raise


# --- generation -------------------------------------------------------------------------------

@bp.post("/chat")
@route("Chat (Ollama's API)", tag="Ollama", errors="ollama",
       **STREAMS)
def chat():
    rt = runtime()
    req = parse.parse_chat(parse.parse_json(request.get_data(cache=False)),
                           rt.config.max_tokens_cap)
    return _generate(req, _served(req.model, "chat"))


@bp.post("/generate")
@route("Generate (Ollama's API)", tag="Ollama", errors="ollama",
       **STREAMS)
def generate():
    rt = runtime()
    body = parse.parse_json(request.get_data(cache=False))
    served = _served(parse.model_name(body), "completion")
    req = parse.parse_generate(body, rt.config.max_tokens_cap,
                               can_chat="chat" in served.capabilities)
    if not (req.messages[-1]["content"] if req.kind == "chat" else req.prompts[0]):
        # Ollama: an empty prompt only loads the model; numbalm's are loaded already
        body = {"model": served.id, "created_at": shapes.now_iso(), "response": "",
                "done": True, "done_reason": "load"}
        return jsonify(body)
    return _generate(req, served)


def _generate(req, served):
    rt = runtime()
    the_plan = plan(req, served, rt.config.max_tokens_cap)
    stats = Stats(start=g.start)
    g.access.update(model=served.id, stream=req.stream, stats=stats,
                    prompt_tokens=the_plan.prompt_tokens)
    rt.admit()
    stats.admitted = time.perf_counter()
    check = StopCheck(request.environ.get("waitress.client_disconnected"),
                      rt.config.request_timeout, rt.shutdown)
    try:
        results = start(the_plan, check, stats)
    except APIError:
        rt.release()
        raise

    def finish():
        close(results)
        rt.release()
        rt.observe(served.id, the_plan.prompt_tokens, stats)
        if check.reason:
            rt.metrics.cancelled.labels(check.reason).inc()

    is_chat = request.path.endswith("/chat")
    if req.stream:
        events = _events(the_plan, results[0], stats, served.id, is_chat)
        return Response(EventStream(ndjson_lines(events, check), check, finish),
                        mimetype=MIMETYPE, headers={"Cache-Control": "no-cache",
                                                    "X-Accel-Buffering": "no"})
    try:
        collect(results, stats)
        if check.reason:
            raise check.error()
        result = results[0]
        body = _head(served.id, is_chat, _reply(result, is_chat))
        body.update(done=True, done_reason=result.finish_reason,
                    **shapes.timings(stats, the_plan.prompt_tokens))
    finally:
        finish()
    return jsonify(body)


def _head(model: str, is_chat: bool, text_or_message) -> dict:
    key = "message" if is_chat else "response"
    return {"model": model, "created_at": shapes.now_iso(), key: text_or_message}


def _reply(result, is_chat: bool):
    """The whole reply: generate's text, or chat's message (with tool calls, if made)."""
    if not is_chat:
        return result.text
    if result.parser is not None and result.parser.calls:
        return {"role": "assistant", "content": result.parser.content,
                "tool_calls": shapes.tool_calls(result.parser.calls)}
    content = result.parser.content if result.parser is not None else result.text
    return {"role": "assistant", "content": content}


def _chat_chunk(model: str, text: str, **more) -> dict:
    return _head(model, True, {"role": "assistant", "content": text, **more})


def _events(the_plan, result, stats: Stats, model: str, is_chat: bool):
    """One chunk per token (its text), then the tool calls (chat), then the final chunk."""
    def piece(text: str) -> dict:
        return _chat_chunk(model, text) if is_chat else _head(model, False, text)

    for tok in run_choice(result, stats):
        text = result.delta.content if result.parser is not None else tok.text
        if text:
            body = piece(text)
            body["done"] = False
            yield body
    if result.finish_reason == "cancelled":
        return
    if result.parser is not None:
        tail = result.delta.content if result.delta else ""
        if result.parser.calls:
            body = _chat_chunk(model, tail, tool_calls=shapes.tool_calls(result.parser.calls))
            body["done"] = False
            yield body
        elif tail:
            body = piece(tail)
            body["done"] = False
            yield body
    final = piece("")
    final.update(done=True, done_reason=result.finish_reason,
                 **shapes.timings(stats, the_plan.prompt_tokens))
    yield final


# --- embeddings -------------------------------------------------------------------------------

@bp.post("/embed")
@route("Embed (Ollama's API)", tag="Ollama", errors="ollama")
def embed():
    return _embed(legacy=False)


@bp.post("/embeddings")
@route("Embeddings, the older form (Ollama's API)", tag="Ollama", errors="ollama")
def embeddings():
    """The older route: one `prompt`, one `embedding`."""
    return _embed(legacy=True)


def _embed(legacy: bool):
    rt = runtime()
    body = parse.parse_json(request.get_data(cache=False))
    served = _served(parse.model_name(body), "embeddings")
    inputs, truncate = parse.embed_inputs(body, legacy)
    dims = None if legacy else parse.dimensions(body)
    llm = served.llm
    if dims is not None and dims > llm.dim:
        raise bad_request(f"invalid value for 'dimensions': {dims}; this model's embeddings "
                          f"have {llm.dim} dimensions")
    started = time.perf_counter()
    ids_lists = [tokenize(text, llm, f"input[{i}]", truncate) for i, text in enumerate(inputs)]
    n_tokens = sum(len(ids) for ids in ids_lists)
    g.access.update(model=served.id, prompt_tokens=n_tokens)
    vectors = [shorten(v, dims) for v in embed_ids(rt, served, ids_lists)]
    if legacy:
        return jsonify({"embedding": [float(x) for x in vectors[0]]})
    return jsonify({"model": served.id, "embeddings": [[float(x) for x in v] for v in vectors],
                    "total_duration": int((time.perf_counter() - started) * shapes.NS),
                    "load_duration": 0, "prompt_eval_count": n_tokens})


# --- models -----------------------------------------------------------------------------------

@bp.get("/tags")
@route("List local models (Ollama's API)", tag="Ollama", errors="ollama")
def tags():
    """The models this server serves (Ollama lists every local model; numbalm answers only
    for the ones it has loaded, so it lists those)."""
    pool = runtime().pool
    return jsonify({"models": [shapes.describe(s) for s in pool.list()] if pool.ready else []})


@bp.post("/show")
@route("Show a model (Ollama's API)", tag="Ollama", errors="ollama")
def show():
    body = parse.parse_json(request.get_data(cache=False))
    return jsonify(shapes.show(_served(parse.model_name(body), None)))


@bp.get("/ps")
@route("Running models (Ollama's API)", tag="Ollama", errors="ollama")
def ps():
    """What is loaded, with numbalm's own figures beside Ollama's: the scheduler's counters
    per model and the admission queue."""
    rt = runtime()
    forever = (datetime.now(timezone.utc) + timedelta(days=365 * 100)).isoformat()
    models = []
    for served in rt.pool.list() if rt.pool.ready else []:
        item = shapes.describe(served)
        item.update(expires_at=forever.replace("+00:00", "Z"), size_vram=0,
                    context_length=served.llm.n_ctx,
                    numbalm={"backend": served.llm.backend_name,
                             "capabilities": served.capabilities,
                             "serving": served.llm.serving_stats()})
        models.append(item)
    adm = rt.admission
    return jsonify({"models": models,
                    "numbalm": {"running": adm.active, "waiting": adm.waiting,
                                "max_running": adm.max_active, "max_waiting": adm.max_waiting,
                                "rss_bytes": _rss_bytes()}})


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux), the figure for "how much does it hold"."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@bp.get("/version")
@route("Version (Ollama's API)", tag="Ollama", errors="ollama")
def version():
    return jsonify({"version": __version__})


# --- pull -------------------------------------------------------------------------------------

class QueueProgress(Progress):
    """A pull's progress as Ollama's status objects, handed to the response through a queue."""

    def __init__(self):
        self.lines: queue.Queue = queue.Queue()
        self.label, self.total = "", None

    def status(self, text: str) -> None:
        self.lines.put({"status": text})

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        self.label, self.total = label, total
        self.update(done)

    def update(self, done: int) -> None:
        item = {"status": f"pulling {self.label}", "digest": self.label, "completed": done}
        if self.total:
            item["total"] = self.total
        self.lines.put(item)

    def finish(self, done: int) -> None:
        self.update(done)


DONE = object()


@bp.post("/pull")
@route("Pull a model (Ollama's API)", tag="Ollama", errors="ollama",
       **STREAMS)
def pull():
    """Fetch a model into numbalm's cache (the catalog, a URL, a Hugging Face name), as
    `numbalm model pull` does. It is not served until the server is started with it."""
    body = parse.parse_json(request.get_data(cache=False))
    name = parse.model_name(body)
    stream = body.get("stream") is not False
    progress = QueueProgress()
    outcome: dict = {}

    def work():
        try:
            progress.status("pulling manifest")
            entry, _ = Registry().pull(name, progress=progress)
            outcome["entry"] = entry
            progress.status("verifying sha256 digest")
            progress.status("writing manifest")
            progress.status("success")
        except EngineError as e:
            outcome["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - reported to the client, logged by Flask
            outcome["error"] = f"pull failed: {type(e).__name__}: {e}"
        progress.lines.put(DONE)

    thread = threading.Thread(target=work, name="numbalm-pull", daemon=True)
    thread.start()
    if not stream:
        thread.join()
        if "error" in outcome:
            raise _pull_error(outcome["error"])
        return jsonify({"status": "success"})

    def lines():
        while (item := progress.lines.get()) is not DONE:
            yield item
        if "error" in outcome:
            yield {"error": outcome["error"]}

    return Response(ndjson_lines(lines()), mimetype=MIMETYPE,
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _pull_error(message: str) -> APIError:
    status = 404 if "not a catalog model" in message or "no model" in message else 400
    return APIError(status, message)
