"""Prometheus metrics, in a registry of the app's own so several apps can share a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


# The engine's batching counters (engine.LLM.serving_stats), per served model:
# name -> (kind, help, key in serving_stats)
BATCHING = {
    "numbalm_batch_steps": ("counter", "Batched forward passes run", "steps"),
    "numbalm_batch_step_seconds": ("counter", "Time spent in batched steps (divide by steps "
                                   "for the time per step)", "step_seconds"),
    "numbalm_batch_rows": ("counter", "Token rows run through the model", "rows"),
    "numbalm_batch_prefill_rows": ("counter", "Prompt token rows run through the model",
                                   "prefill_rows"),
    "numbalm_batch_sequences": ("counter", "Sequences in steps, summed (divide by steps for the "
                                "mean batch size)", "sequences"),
    "numbalm_batch_preemptions": ("counter", "Sequences put back to wait for KV room",
                                  "preempted"),
    "numbalm_prefix_cache_hit_tokens": ("counter", "Prompt tokens found in the prefix cache",
                                        "prefix_hit_tokens"),
    "numbalm_prefix_cache_miss_tokens": ("counter", "Prompt tokens the prefix cache lacked",
                                         "prefix_miss_tokens"),
    "numbalm_scheduler_running": ("gauge", "Sequences in the batch", "running"),
    "numbalm_scheduler_waiting": ("gauge", "Sequences waiting to join the batch", "waiting"),
    "numbalm_kv_cache_blocks": ("gauge", "KV cache blocks (16 positions each)", "kv_blocks"),
    "numbalm_kv_cache_blocks_used": ("gauge", "KV cache blocks held by sequences",
                                     "kv_blocks_used"),
}


class BatchingCollector:
    """Reads each served model's batching counters when /metrics is scraped."""

    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        families = {name: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
            name, text, labels=["model"]) for name, (kind, text, _) in BATCHING.items()}
        for served in self.pool.list():
            stats = served.llm.serving_stats()
            if stats is None:
                continue
            for name, (_, _, key) in BATCHING.items():
                families[name].add_metric([served.id], float(stats[key]))
        yield from families.values()


class Metrics:
    def __init__(self, admission, pool=None):
        self.registry = r = CollectorRegistry()
        if pool is not None:
            r.register(BatchingCollector(pool))
        self.requests = Counter("numbalm_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("numbalm_http_request_duration_seconds",
                                 "Time to the last byte of a response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("numbalm_http_requests_in_flight", "Requests being served",
                               registry=r)
        generations = Gauge("numbalm_generations_in_flight", "Generations holding a slot",
                            registry=r)
        generations.set_function(lambda: admission.active)
        depth = Gauge("numbalm_queue_depth", "Requests waiting for a slot", registry=r)
        depth.set_function(lambda: admission.waiting)
        self.rejected = Counter("numbalm_admission_rejected",
                                "Requests refused by admission (queue_full: 429, "
                                "queue_timeout: 503)", ["reason"], registry=r)
        self.ttft = Histogram("numbalm_time_to_first_token_seconds",
                              "From request arrival to the first generated token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_second = Histogram("numbalm_tokens_per_second",
                                           "Completion tokens per second of one generation",
                                           ["model"], buckets=RATE_BUCKETS, registry=r)
        self.prompt_tokens = Counter("numbalm_prompt_tokens", "Prompt tokens processed",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("numbalm_completion_tokens",
                                         "Completion tokens generated", ["model"], registry=r)
        self.cancelled = Counter("numbalm_generations_cancelled",
                                 "Generations stopped early (disconnect, timeout, shutdown)",
                                 ["reason"], registry=r)
        self.ready = Gauge("numbalm_ready", "1 when models are loaded and warmed up",
                           registry=r)
        self.rate_limited = Counter("numbalm_rate_limited",
                                    "Requests refused by a rate limit (429)", ["scope", "kind"],
                                    registry=r)
        self.embedding_cache_hits = Counter("numbalm_embedding_cache_hits",
                                            "Embedding inputs answered from the cache",
                                            ["model"], registry=r)
        self.embedding_cache_misses = Counter("numbalm_embedding_cache_misses",
                                              "Embedding inputs the model had to compute",
                                              ["model"], registry=r)
