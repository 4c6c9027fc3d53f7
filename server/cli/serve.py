"""`numbalm serve`: run the app under waitress (or Flask's dev server), drain on SIGTERM.

`add_parser(subparsers)` adds the sub-command and sets `func=serve_command`;
`serve_command(args)` returns the process exit code. The server itself is
`server.http.wsgi.GracefulServer`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading

import engine
from engine.backends import BACKENDS, DEFAULT_BACKEND
from engine.registry import DEFAULT_MODEL
from server import create_app
from server.http.logs import setup_logging
from server.http.wsgi import GracefulServer
from server.serving.config import ConfigError, ServerConfig, build_config


def _pairs(values):
    if values is None:
        return None
    out = {}
    for v in values:
        name, sep, target = v.partition("=")
        if not sep or not name or not target:
            raise ConfigError(f"invalid --alias {v!r}; use ALIAS=MODEL")
        out[name] = target
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to an argparse sub-parser set. Unset options fall back to NUMBALM_* env
    variables, then to the config file, then to the defaults."""
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              description="Serve models over an OpenAI-compatible HTTP API. "
                              "Every option can also be set as NUMBALM_<OPTION> (e.g. "
                              "NUMBALM_PORT) or in the --config file; the command line wins.")
    a = p.add_argument
    a("-m", "--model", dest="models", action="append", metavar="[NAME=]REF",
      help=f"model to serve (registry id, alias or .gguf path); repeatable (default "
           f"{DEFAULT_MODEL})")
    a("--alias", dest="aliases", action="append", metavar="ALIAS=MODEL",
      help="another name a request may use for a served model; repeatable")
    a("--host", help="address to bind (default 127.0.0.1)")
    a("--port", type=int, help="port (default 8080)")
    a("--dev", action="store_true", help="use Flask's development server instead of waitress")
    a("--config", help="TOML or JSON file of settings (env NUMBALM_CONFIG)")
    a("--backend", choices=BACKENDS, help=f"engine backend (default {DEFAULT_BACKEND})")
    a("--threads", type=int, help="HTTP worker threads (default max-concurrent + queue-size + 4)")
    a("--compute-threads", type=int, help="Numba threads per generation (default: all cores)")
    a("--max-concurrent", type=int,
      help="requests generating at once, their tokens batched into one forward pass per step "
           "(default 8)")
    a("--kv-cache-mb", type=float,
      help="KV cache per model, shared by all its running generations, in MiB (default 1024); "
           "a request that could never fit gets a 400, others wait for room")
    a("--step-tokens", type=int,
      help="prompt tokens one batched step may prefill (default 128): smaller keeps running "
           "streams steadier while a long prompt is read, larger reads it faster")
    a("--queue-size", type=int, help="requests waiting for a slot before 429 (default 8)")
    a("--queue-timeout", type=float, help="seconds to wait for a slot before 503 (default 30)")
    a("--request-timeout", type=float, help="seconds one generation may run (default 600)")
    a("--max-body-size", type=int, help="largest request body in bytes (default 4 MiB)")
    a("--max-tokens-cap", type=int, help="largest max_tokens accepted, and the default (4096)")
    a("--max-n", type=int, help="largest n accepted (default 8)")
    a("--embeddings-max-batch", type=int, help="inputs per /v1/embeddings request (256)")
    a("--embeddings-cache-bytes", type=int,
      help="bytes of recent embeddings kept (64 MiB; 0 turns the cache off)")
    a("--responses-store", metavar="FILE",
      help="SQLite file of stored /v1/responses (default: responses.sqlite3 in the cache)")
    a("--responses-max-age-days", type=float, help="stored responses kept this long (30)")
    a("--responses-max-mb", type=float, help="stored responses kept up to this size (256)")
    a("--api-key", dest="api_keys", action="append", metavar="KEY",
      help="accept this key (as a Bearer token or x-api-key); repeatable; none: no "
           "authentication")
    a("--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN",
      help="allow browser requests from ORIGIN ('*' for any); repeatable")
    a("--metrics-auth", action="store_true", default=None,
      help="/metrics needs an API key too (default: open, like /healthz)")
    a("--rate-limit-rpm", type=int, metavar="N",
      help="requests per minute per API key (per client address without keys); 0: no limit")
    a("--rate-limit-tpm", type=int, metavar="N",
      help="prompt + completion tokens per minute per API key (or address); 0: no limit")
    a("--rate-limit-ip-rpm", type=int, metavar="N", help="requests per minute per client address")
    a("--rate-limit-ip-tpm", type=int, metavar="N", help="tokens per minute per client address")
    a("--log-level", help="debug, info, warning, error (default info)")
    a("--log-format", choices=["text", "json"], help="log line format (default text)")
    a("--shutdown-grace", type=float, help="seconds in-flight work may finish on SIGTERM (30)")
    a("--chat-template", metavar="FILE",
      help="Jinja chat template for the served models instead of their own, or a built-in "
           "one (chatml, gemma); a model with no template of its own (a base model) does not "
           "chat without it")
    a("--no-warmup", dest="warmup", action="store_false", default=None,
      help="skip the warm-up (kernel compile) before reporting ready")
    a("--warmup-only", action="store_true",
      help="load and warm up the models, then exit without serving: fills the JIT cache "
           "(NUMBA_CACHE_DIR) for the replicas that start after it, e.g. in an image build")
    p.set_defaults(func=serve_command)
    return p


def config_from_args(args, environ=None) -> ServerConfig:
    names = ("models", "host", "port", "backend", "threads", "compute_threads", "max_concurrent",
             "kv_cache_mb", "step_tokens",
             "queue_size", "queue_timeout", "request_timeout", "max_body_size", "max_tokens_cap",
             "max_n", "embeddings_max_batch", "embeddings_cache_bytes",
             "responses_store", "responses_max_age_days", "responses_max_mb",
             "api_keys", "cors_origins", "log_level", "log_format", "shutdown_grace",
             "warmup", "chat_template", "metrics_auth", "rate_limit_rpm", "rate_limit_tpm",
             "rate_limit_ip_rpm", "rate_limit_ip_tpm")
    cli = {name: getattr(args, name, None) for name in names}
    cli["aliases"] = _pairs(getattr(args, "aliases", None))
    config = build_config(cli, environ, getattr(args, "config", None))
    if not config.models:
        config.models = [DEFAULT_MODEL]
    return config


def check_jit_cache(environ=None) -> None:
    """NUMBA_CACHE_DIR, when set, must be a writable directory. Numba skips one it cannot write
    without a word and caches beside the code instead (or nowhere, compiling every kernel again
    on each start), which a replica with a read-only image or model volume must not do."""
    path = (os.environ if environ is None else environ).get("NUMBA_CACHE_DIR")
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # the test Numba itself makes
    except OSError as e:
        raise ConfigError(f"NUMBA_CACHE_DIR={path} is not writable ({e.strerror}); give the "
                          f"JIT cache a writable directory of its own") from None


def warm_up_only(pool) -> int:
    """Load and warm up every model as `serve` does; 0 once they are ready, 1 if one failed."""
    failed = threading.Event()
    pool.start(on_error=lambda message: failed.set())
    while not (pool.wait_ready(0.1) or failed.is_set()):
        pass
    return 0 if pool.ready else 1


def serve_command(args) -> int:
    try:
        config = config_from_args(args)
        check_jit_cache()
        setup_logging(config.log_level, config.log_format)
        if config.compute_threads:
            engine.set_compute_threads(config.compute_threads)
    except (ConfigError, ValueError) as e:
        print(f"numbalm serve: {e}", file=sys.stderr)
        return 2
    app = create_app(config, load=False)
    rt = app.extensions["numbalm"]
    if getattr(args, "warmup_only", False):
        return warm_up_only(rt.pool)
    server = None if args.dev else GracefulServer(app, config)
    rt.pool.start(on_error=lambda msg: server.stop() if server else os._exit(1))
    if args.dev:
        app.run(config.host, config.port, threaded=True, use_reloader=False)
        return 0
    return server.run()
