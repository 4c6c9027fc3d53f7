"""Admission control: at most N generations at once, a bounded FIFO of waiters in front.

A full queue is refused at once (`QueueFull` -> 429 with Retry-After); a waiter that is not
admitted within the queue timeout gives up (`QueueTimeout` -> 503). Slots are handed to waiters
in arrival order, directly from `release`, so nobody can overtake the queue.
"""

from __future__ import annotations

import threading
from collections import deque


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class _Waiter:
    __slots__ = ("event", "admitted")

    def __init__(self):
        self.event = threading.Event()
        self.admitted = False


class Admission:
    def __init__(self, max_active: int, max_waiting: int, timeout: float):
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.active = 0
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self, timeout: float | None = None) -> None:
        """Take a slot, waiting in line if needed; raises QueueFull or QueueTimeout."""
        with self._lock:
            if self.active < self.max_active and not self._waiters:
                self.active += 1
                return
            if len(self._waiters) >= self.max_waiting:
                raise QueueFull
            waiter = _Waiter()
            self._waiters.append(waiter)
        waiter.event.wait(self.timeout if timeout is None else timeout)
        with self._lock:
            if waiter.admitted:  # granted, possibly just as the wait timed out
                return
            self._waiters.remove(waiter)
        raise QueueTimeout

    def release(self) -> None:
        """Give the slot to the oldest waiter, or free it."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.admitted = True
                waiter.event.set()
            else:
                self.active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no generation runs and nobody waits; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self.active == 0 and not self._waiters, timeout)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: a rough guess, at least 1."""
        return max(1, min(60, round(self.timeout / 4)))
