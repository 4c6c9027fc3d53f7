"""Running the app under waitress: the production server with a graceful drain on SIGTERM,
and a loopback server in a background thread for tests and load tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import waitress
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from server.http.errors import APIError
from server.serving.config import ServerConfig

log = logging.getLogger("numbalm.server")
FLUSH_SECONDS = 0.5  # after the last generation ends, time for waitress to send its bytes
CANCEL_SECONDS = 5.0  # after the grace period, time for cancelled generations to stop


def stop_seconds(config: ServerConfig) -> float:
    """Longest time from SIGTERM to exit: the drain, the cancel, the flush. An orchestrator's
    grace period (Kubernetes' terminationGracePeriodSeconds, compose's stop_grace_period) must
    be at least this, plus any preStop delay, or it kills generations the drain would finish."""
    return config.shutdown_grace + CANCEL_SECONDS + FLUSH_SECONDS


class JSONErrorTask(ErrorTask):
    """waitress's own refusals, made before the app sees the request (a body far over the
    limit, a malformed request line or chunked body, headers too large), in OpenAI's error
    shape instead of waitress's plain text."""

    def execute(self):
        e = self.request.error
        message = f"{e.reason}: {e.body}" if e.body else e.reason
        err = APIError(e.code, message, code=WAITRESS_CODES.get(e.code, "bad_request"))
        body = json.dumps(err.body()).encode("utf-8")
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


WAITRESS_CODES = {413: "request_too_large", 431: "request_header_fields_too_large",
                  500: "internal_error"}


class JSONErrorChannel(HTTPChannel):
    error_task_class = JSONErrorTask


def make_waitress(app, config: ServerConfig, host=None, port=None, **adjustments):
    server = waitress.create_server(
        app, host=host or config.host, port=config.port if port is None else port,
        threads=config.worker_threads, channel_request_lookahead=1,  # lets us see disconnects
        # room above our own limit, so Flask answers 413 with its own message; bodies far
        # larger are refused by waitress itself, before they are read (JSONErrorTask)
        max_request_body_size=max(4 * config.max_body_size, config.max_body_size + 2**20),
        ident="numbalm",
        channel_timeout=max(120, int(config.request_timeout)), **adjustments)
    server.channel_class = JSONErrorChannel
    return server


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
            self.rt.admission.wait_idle(CANCEL_SECONDS)
        time.sleep(FLUSH_SECONDS)
        os.kill(os.getpid(), signal.SIGINT)


class ServerThread:
    """waitress on a loopback port in a background thread (tests, the load test)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        config = app.extensions["numbalm"].config
        # the default loop timeout: stop() wakes the loop itself, and a 0.05 s timeout made the
        # loop thread spin enough to slow an 8-stream batch 4-fold in the same process
        self.server = make_waitress(app, config, host=host, port=port)
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
