"""The one object on the app (`app.extensions["numbalm"]`) that holds everything the routes use."""

from __future__ import annotations

import threading
import time

from engine.registry import cache_dir
from server.http.errors import APIError
from server.http.ratelimit import RateLimiter
from server.serving.admission import Admission, QueueFull, QueueTimeout
from server.serving.config import ServerConfig
from server.serving.embedding_cache import EmbeddingCache
from server.serving.metrics import Metrics
from server.serving.pool import ModelPool
from server.serving.response_store import ResponseStore


class Runtime:
    def __init__(self, config: ServerConfig, pool: ModelPool):
        self.config = config
        self.pool = pool
        self.admission = Admission(config.max_concurrent, config.queue_size, config.queue_timeout)
        self.metrics = Metrics(self.admission, pool)
        self.metrics.ready.set_function(lambda: 1 if self.ready else 0)
        self.embedding_cache = EmbeddingCache(config.embeddings_cache_bytes)
        self.rate_limits = RateLimiter(config.rate_limit_rpm, config.rate_limit_tpm,
                                       config.rate_limit_ip_rpm, config.rate_limit_ip_tpm)
        self._responses: ResponseStore | None = None
        self.shutdown = threading.Event()   # set: cancel every running generation
        self.draining = False               # set on SIGTERM: refuse new work, finish the rest

    @property
    def ready(self) -> bool:
        return self.pool.ready and not self.draining

    @property
    def responses(self) -> ResponseStore:
        """The stored responses (the file is made on first use)."""
        if self._responses is None:
            path = self.config.responses_store or cache_dir() / "responses.sqlite3"
            self._responses = ResponseStore(path, self.config.responses_max_age_days,
                                            self.config.responses_max_mb)
        return self._responses

    def admit(self) -> None:
        """Take a generation slot or raise the 429/503 the client should see."""
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="server_shutting_down")
        try:
            self.admission.acquire()
        except QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            retry = self.admission.retry_after()
            raise APIError(429, f"The server is busy ({self.admission.max_active} running, "
                           f"{self.admission.max_waiting} waiting); retry in {retry} s.",
                           code="queue_full", headers={"Retry-After": str(retry)}) from None
        except QueueTimeout:
            self.metrics.rejected.labels("queue_timeout").inc()
            raise APIError(503, f"No generation slot became free within "
                           f"{self.admission.timeout:g} s; retry later.", code="queue_timeout",
                           headers={"Retry-After": str(self.admission.retry_after())}) from None

    def release(self) -> None:
        self.admission.release()

    def observe(self, model_id: str, prompt_tokens: int, stats) -> None:
        """Token and latency metrics of one finished generation."""
        m = self.metrics
        m.prompt_tokens.labels(model_id).inc(prompt_tokens)
        m.completion_tokens.labels(model_id).inc(stats.completion_tokens)
        if stats.first_token is not None:
            m.ttft.labels(model_id).observe(stats.first_token - stats.start)
            elapsed = time.perf_counter() - stats.admitted
            if stats.completion_tokens and elapsed > 0:
                m.tokens_per_second.labels(model_id).observe(stats.completion_tokens / elapsed)
