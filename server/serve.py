"""`numbalm serve`: run the app under waitress (or Flask's dev server), drain on SIGTERM.

Wire-up for the CLI: `add_serve_parser(subparsers)` adds the sub-command and sets
`func=serve_command`; `serve_command(args)` returns the process exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import waitress

from server import create_app
from server.config import ConfigError, ServerConfig, build_config
from server.logs import setup_logging

log = logging.getLogger("numbalm.server")
DEFAULT_MODEL = "smollm2-135m-instruct"
FLUSH_SECONDS = 0.5  # after the last generation ends, time for waitress to send its bytes


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


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
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
    a("--backend", choices=["fast", "reference"], help="engine backend (default fast)")
    a("--threads", type=int, help="HTTP worker threads (default max-concurrent + queue-size + 4)")
    a("--compute-threads", type=int, help="Numba threads per generation (default: all cores)")
    a("--max-concurrent", type=int, help="generations running at once (default 1)")
    a("--queue-size", type=int, help="requests waiting for a slot before 429 (default 8)")
    a("--queue-timeout", type=float, help="seconds to wait for a slot before 503 (default 30)")
    a("--request-timeout", type=float, help="seconds one generation may run (default 600)")
    a("--max-body-size", type=int, help="largest request body in bytes (default 4 MiB)")
    a("--max-tokens-cap", type=int, help="largest max_tokens accepted, and the default (4096)")
    a("--max-n", type=int, help="largest n accepted (default 8)")
    a("--embeddings-max-batch", type=int, help="inputs per /v1/embeddings request (256)")
    a("--embeddings-cache-bytes", type=int,
      help="bytes of recent embeddings kept (64 MiB; 0 turns the cache off)")
    a("--api-key", dest="api_keys", action="append", metavar="KEY",
      help="accept this Bearer key; repeatable; none: no authentication")
    a("--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN",
      help="allow browser requests from ORIGIN ('*' for any); repeatable")
    a("--log-level", help="debug, info, warning, error (default info)")
    a("--log-format", choices=["text", "json"], help="log line format (default text)")
    a("--shutdown-grace", type=float, help="seconds in-flight work may finish on SIGTERM (30)")
    a("--no-warmup", dest="warmup", action="store_false", default=None,
      help="skip the one-token warm-up (kernel compile) before reporting ready")
    p.set_defaults(func=serve_command)
    return p


def config_from_args(args, environ=None) -> ServerConfig:
    names = ("models", "host", "port", "backend", "threads", "compute_threads", "max_concurrent",
             "queue_size", "queue_timeout", "request_timeout", "max_body_size", "max_tokens_cap",
             "max_n", "embeddings_max_batch", "embeddings_cache_bytes",
             "api_keys", "cors_origins", "log_level", "log_format", "shutdown_grace",
             "warmup")
    cli = {name: getattr(args, name, None) for name in names}
    cli["aliases"] = _pairs(getattr(args, "aliases", None))
    config = build_config(cli, environ, getattr(args, "config", None))
    if not config.models:
        config.models = [DEFAULT_MODEL]
    return config


def serve_command(args) -> int:
    try:
        config = config_from_args(args)
        setup_logging(config.log_level, config.log_format)
    except (ConfigError, ValueError) as e:
        print(f"numbalm serve: {e}", file=sys.stderr)
        return 2
    if config.compute_threads:
        os.environ["NUMBA_NUM_THREADS"] = str(config.compute_threads)
    app = create_app(config, load=False)
    server = None if args.dev else GracefulServer(app, config)
    rt = app.extensions["numbalm"]
    rt.pool.start(on_error=lambda msg: server.stop() if server else os._exit(1))
    threading.Thread(target=_report_threading_layer, args=(rt.pool,), daemon=True).start()
    if args.dev:
        app.run(config.host, config.port, threaded=True, use_reloader=False)
        return 0
    return server.run()


def _report_threading_layer(pool) -> None:
    """DESIGN: the `omp` layer is the fast and thread-safe one; say which one we got."""
    if not pool.wait_ready() or "numba" not in sys.modules:
        return
    try:
        import numba

        layer = numba.threading_layer()
    except (ImportError, ValueError):  # ValueError: no parallel kernel has run yet
        return
    if layer == "omp":
        log.info("numba threading layer: omp")
    else:
        log.warning("numba threading layer is %r, not 'omp': expect slower generation and "
                    "keep --max-concurrent 1", layer)


def make_waitress(app, config: ServerConfig, host=None, port=None, **adjustments):
    return waitress.create_server(
        app, host=host or config.host, port=config.port if port is None else port,
        threads=config.worker_threads, channel_request_lookahead=1,  # lets us see disconnects
        # room above our own limit, so Flask answers 413 in OpenAI's shape; bodies far larger
        # are refused by waitress itself, before they are read
        max_request_body_size=max(4 * config.max_body_size, config.max_body_size + 2**20),
        ident="numbalm",
        channel_timeout=max(120, int(config.request_timeout)), **adjustments)


class GracefulServer:
    """waitress in the main thread; SIGTERM/SIGINT drain in-flight work, a second one exits."""

    def __init__(self, app, config: ServerConfig):
        self.rt = app.extensions["numbalm"]
        self.config = config
        self.server = make_waitress(app, config)
        self.stopping = False
        self.exit_code = 0

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("serving on http://%s:%s (%d HTTP threads, %d generation slots, queue %d)",
                 self.config.host, self.server.effective_port, self.config.worker_threads,
                 self.config.max_concurrent, self.config.queue_size)
        self.server.run()  # returns after KeyboardInterrupt, which it catches
        log.info("stopped")
        return self.exit_code

    def stop(self, exit_code: int = 1) -> None:
        """Stop from another thread (e.g. the model failed to load)."""
        self.exit_code = exit_code
        self.stopping = True
        os.kill(os.getpid(), signal.SIGINT)

    def _on_signal(self, signum, frame):
        if self.stopping:
            raise KeyboardInterrupt
        self.stopping = True
        self.rt.draining = True
        log.info("%s: draining (up to %g s), new requests get 503",
                 signal.Signals(signum).name, self.config.shutdown_grace)
        threading.Thread(target=self._drain, name="numbalm-drain", daemon=True).start()

    def _drain(self) -> None:
        if not self.rt.admission.wait_idle(self.config.shutdown_grace):
            log.warning("grace period over: cancelling in-flight generations")
            self.rt.shutdown.set()
            self.rt.admission.wait_idle(5)
        time.sleep(FLUSH_SECONDS)
        os.kill(os.getpid(), signal.SIGINT)


class ServerThread:
    """waitress on a loopback port in a background thread (tests, the load test)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        config = app.extensions["numbalm"].config
        # a short loop timeout so stop() returns quickly
        self.server = make_waitress(app, config, host=host, port=port, asyncore_loop_timeout=0.05)
        self.url = f"http://{host}:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, name="waitress", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        def close_all():  # runs in the server's own loop thread, so no socket is pulled away
            for channel in list(self.server._map.values()):  # from under its select()
                channel.close()

        self.server.task_dispatcher.shutdown(timeout=2)  # workers first: they pull the trigger
        self.server.trigger.pull_trigger(close_all)
        self.thread.join(timeout=5)


def main(argv=None) -> int:
    """`python -m server.serve ...`, handy before the CLI is wired."""
    parser = argparse.ArgumentParser(prog="numbalm")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
