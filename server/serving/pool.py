"""The model pool: the one object through which the server reaches the engine.

It loads the configured models by id (`engine.load_model`), warms each up (a short prompt and
two greedy tokens, or one embedding for an embedding-only model, which compiles every Numba
kernel a request runs), and resolves a request's `model` (an id or an alias) to a served model
whose LLM can do what the route needs (`capabilities`: "completion", "chat", "embeddings").
Tests build one with `ModelPool.from_models([...])` around fakes that implement
`engine.api.LanguageModel`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import engine
from engine.api import LanguageModel
from server.http.errors import APIError, bad_request
from server.serving.config import ConfigError

log = logging.getLogger("numbalm.server")

WHAT = {"completion": "a completions model", "chat": "a chat model",
        "embeddings": "an embeddings model"}
WARMUP_TEXT = " ".join(["Hello, world."] * 12)  # ~50 tokens: a prefill of many rows
ROUTE = {"completion": "/v1/completions", "chat": "/v1/chat/completions",
         "embeddings": "/v1/embeddings"}


@dataclass
class ServedModel:
    """An LLM under the name clients use."""

    id: str              # the name clients use; also what responses report as `model`
    llm: LanguageModel   # an engine.LLM (or a test double with the same surface)
    created: int         # unix time it was loaded
    source: str | None = None  # what it was loaded from (a registry id or a path), if known

    @property
    def capabilities(self) -> list[str]:
        """What the model can do, sorted: a subset of completion, chat, embeddings."""
        return sorted(self.llm.capabilities)


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """`"REF"` or `"NAME=REF"` -> (NAME or None, REF)."""
    name, sep, ref = spec.partition("=")
    if not sep:
        return None, spec
    if not name or not ref:
        raise ConfigError(f"invalid model spec {spec!r}; use REF or NAME=REF")
    return name, ref


class ModelPool:
    def __init__(self, specs=(), aliases=None, backend="fast", warmup=True, loader=None,
                 engine_options: dict | None = None):
        self.specs = [parse_model_spec(s) for s in specs]
        self.aliases = dict(aliases or {})
        self.backend = backend
        self.engine_options = dict(engine_options or {})  # load_model's kv_cache_mb, ...
        self.warmup = warmup
        self.loader = loader or engine.load_model
        self.models: dict[str, ServedModel] = {}
        self.error: str | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_models(cls, models, aliases=None, warmup=False) -> ModelPool:
        """A pool around already-loaded models (served under their `.id`), ready at once."""
        pool = cls(aliases=aliases, warmup=warmup)
        for model in models:
            pool._add(model.id, model)
        pool._finish()
        return pool

    # --- loading ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def status(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        return "ready" if self.ready else "loading"

    def start(self, on_error=None) -> None:
        """Load the models in a background thread; /readyz says 503 until it is done."""
        if self.ready or self._thread:
            return
        self._thread = threading.Thread(target=self._load_all, args=(on_error,),
                                        name="numbalm-load", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.ready

    def _load_all(self, on_error=None) -> None:
        try:
            for name, ref in self.specs:
                t0 = time.perf_counter()
                model = self.loader(ref, backend=self.backend, **self.engine_options)
                served = name or model.id
                self._add(served, model, ref)
                log.info("loaded model %s (%s) in %.1f s", served, ref, time.perf_counter() - t0)
            self._finish()
        except Exception as e:  # noqa: BLE001 - any load failure is reported, not raised
            self.error = str(e) or type(e).__name__
            log.error("model loading failed: %s", self.error)
            if on_error:
                on_error(self.error)

    def _add(self, name: str, model, source: str | None = None) -> None:
        if name in self.models:
            raise ConfigError(f"two models are served as {name!r}; name one with NAME=REF")
        self.models[name] = ServedModel(name, model, int(time.time()), source)

    def _finish(self) -> None:
        for alias, target in self.aliases.items():
            if target not in self.models:
                raise ConfigError(f"alias {alias!r} points to {target!r}, which is not served")
        if self.warmup:
            for served in self.models.values():
                self._warm(served)
        self._ready.set()

    def _warm(self, served: ServedModel) -> None:
        """Two greedy tokens after a prompt of some 50 tokens (or one embedding of it): compiles
        every kernel a request runs, the many-row prefill ones and the one-row decode ones, into
        the JIT cache before the first request pays for it (seconds; more on a busy machine)."""
        t0 = time.perf_counter()
        if "completion" not in served.capabilities:
            served.llm.embed([WARMUP_TEXT])
            log.info("warmed up %s in %.1f s", served.id, time.perf_counter() - t0)
            return
        ids = served.llm.tokenizer.encode(WARMUP_TEXT, add_bos=None)
        ids = ids[:max(1, served.llm.n_ctx - 2)]  # room for the two tokens in a small context
        for _ in served.llm.generate(ids, max_tokens=2, temperature=0.0):
            pass
        log.info("warmed up %s in %.1f s", served.id, time.perf_counter() - t0)

    # --- lookup -----------------------------------------------------------------------------

    def list(self) -> list[ServedModel]:
        return list(self.models.values())

    def get(self, name: str | None, need: str | None = None) -> ServedModel:
        """The model a request names (id or alias; None: the first one that can do `need`),
        or a 404/503; a 400 when the named model cannot do `need` ("chat", "completion",
        "embeddings"), as an embedding-only model cannot chat."""
        if not self.ready:
            raise APIError(503, f"Models are not ready ({self.status}); retry shortly.",
                           code="model_not_ready", headers={"Retry-After": "5"})
        if name is None:
            if not self.models:
                raise APIError(404, "No model is loaded.", code="model_not_found")
            able = [s for s in self.models.values() if need is None or need in s.capabilities]
            served = able[0] if able else next(iter(self.models.values()))
        else:
            served = self.models.get(self.aliases.get(name, name))
        if served is None:
            raise APIError(404, f"The model '{name}' does not exist; see /v1/models.",
                           param="model", code="model_not_found")
        if need == "chat" and "chat" not in served.capabilities \
                and "completion" in served.capabilities:
            raise bad_request(f"The model '{served.id}' has no chat template: it is a base "
                              f"model that continues text, so it cannot chat. Use "
                              f"{ROUTE['completion']} with a prompt, or serve it with "
                              f"--chat-template FILE.", param="model",
                              code="model_not_supported")
        if need is not None and need not in served.capabilities:
            can = ", ".join(ROUTE[c] for c in served.capabilities if c in ROUTE)
            raise bad_request(f"The model '{served.id}' is not {WHAT.get(need, need)}, so "
                              f"{ROUTE.get(need, 'this route')} cannot use it; it serves "
                              f"{can}. See /v1/models for each model's capabilities.",
                              param="model", code="model_not_supported")
        return served
