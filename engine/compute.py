"""The compute thread: the one thread of a process that runs the engine's forward passes.

Numba's `omp` threading layer is libgomp, which gives every thread that starts a parallel
region its own team of worker threads. Once it manages more threads than there are cores, it
lets idle workers spin only briefly before they sleep, so each of the ~300 kernel calls of a
decode step then pays a wake-up. Measured on 2 cores, SmolLM2, one decode step: 7.1 ms from
the only thread that ever ran a kernel, 16.6 ms from a second one while the first one's team
was alive. A server whose request threads each ran their own generation was paying this.

So every forward pass (generation steps of every model, `LLM.logits`, a decoder's
embeddings, the threading-layer probe) runs on this one thread; other threads hand it work
and wait. Its loop runs pending calls, then one step of each scheduler that has work, in turn.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future

log = logging.getLogger(__name__)


class ComputeThread:
    def __init__(self):
        self._cond = threading.Condition()
        self._calls: deque[tuple[Future, object, tuple, dict]] = deque()
        self._schedulers: list = []
        self._thread: threading.Thread | None = None

    def call(self, fn, *args, **kwargs):
        """Run `fn(*args, **kwargs)` on the compute thread; wait for its result (or error)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        with self._cond:
            self._calls.append((future, fn, args, kwargs))
            self._start()
            self._cond.notify()
        return future.result()

    def set_threads(self, n: int) -> None:
        """Run every forward pass from now on on `n` Numba threads (1 to the cores Numba saw at
        import). Numba's setting is per thread, so it is made on this one."""
        from kernels import jit

        self.call(jit.set_threads, n)

    def add(self, scheduler) -> None:
        """Step `scheduler` whenever `scheduler.has_work()`."""
        with self._cond:
            self._schedulers.append(scheduler)

    def remove(self, scheduler) -> None:
        with self._cond:
            if scheduler in self._schedulers:
                self._schedulers.remove(scheduler)

    def wake(self) -> None:
        """Something was submitted to a scheduler."""
        with self._cond:
            self._start()
            self._cond.notify()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="numbalm-compute",
                                            daemon=True)
            self._thread.start()

    def _busy(self) -> bool:
        return bool(self._calls) or any(s.has_work() for s in self._schedulers)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._busy)
                calls, self._calls = self._calls, deque()
                schedulers = [s for s in self._schedulers if s.has_work()]
            for future, fn, args, kwargs in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
            for scheduler in schedulers:
                scheduler.run_step()


COMPUTE = ComputeThread()
