"""Rate limits: requests and tokens per minute, per API key and per client address.

Each limit is a token bucket, as OpenAI describes its own: a client's bucket holds up to the
per-minute limit and refills continuously (limit/60 a second), so a client may spend a
minute's worth at once and then goes at the steady rate. A request takes one from its
request bucket when it arrives; its tokens (prompt + completion, known only at the end) are
taken from its token bucket when its response is closed, which may leave the bucket in debt:
the client's next request then waits until the bucket has refilled above zero.

Two scopes, each with its own limits (0: none):
- `key`: per API key (`--rate-limit-rpm`, `--rate-limit-tpm`); on a server without API keys
  the client address stands in for the key (anyone can send any bearer token).
- `address`: per client address (`--rate-limit-ip-rpm`, `--rate-limit-ip-tpm`); behind a
  proxy that is the proxy's address (limit there, or per key).

A refused request gets 429 with `Retry-After` and OpenAI's `x-ratelimit-*` headers, which
every limited response carries. Buckets live in memory, per process, for the most recent
MAX_CLIENTS clients (an untouched full bucket is the same as none).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_CLIENTS = 100_000  # buckets kept per limit; the least recently seen go first


@dataclass
class Bucket:
    level: float  # what is left now (may be below zero: tokens taken after the fact)
    stamp: float  # when `level` was computed


class Limit:
    """One per-minute limit for many clients: `take`, `charge`, `state`."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # refill per second
        self.clock = clock
        self.buckets: OrderedDict[str, Bucket] = OrderedDict()
        self.lock = threading.Lock()

    def _bucket(self, client: str) -> Bucket:
        """The client's bucket, refilled up to now (call with the lock held)."""
        now = self.clock()
        b = self.buckets.get(client)
        if b is None:
            b = self.buckets[client] = Bucket(self.capacity, now)
            if len(self.buckets) > MAX_CLIENTS:
                self.buckets.popitem(last=False)
        else:
            b.level = min(self.capacity, b.level + (now - b.stamp) * self.rate)
            b.stamp = now
            self.buckets.move_to_end(client)
        return b

    def take(self, client: str, amount: float) -> float:
        """Take `amount` if the bucket has it; return 0, or the seconds until it will."""
        with self.lock:
            b = self._bucket(client)
            if b.level >= amount:
                b.level -= amount
                return 0.0
            return (amount - b.level) / self.rate

    def wait(self, client: str) -> float:
        """Seconds until the bucket is above zero (0: it is)."""
        with self.lock:
            b = self._bucket(client)
            return 0.0 if b.level > 0 else (1e-9 - b.level) / self.rate

    def charge(self, client: str, amount: float) -> None:
        """Take `amount` whatever is left (the bucket may go into debt)."""
        with self.lock:
            self._bucket(client).level -= amount

    def state(self, client: str) -> tuple[int, int, float]:
        """(limit, remaining, seconds until full), for the x-ratelimit-* headers."""
        with self.lock:
            b = self._bucket(client)
            return int(self.capacity), max(0, int(b.level)), (self.capacity - b.level) / self.rate


@dataclass
class Refusal:
    """A request over a limit: which one, and when to retry."""

    scope: str  # "key" or "address"
    kind: str  # "requests" or "tokens"
    limit: int
    retry_after: float


class RateLimiter:
    """The limits of one server: `admit(key, address)` and `charge(clients, tokens)`."""

    SCOPES = ("key", "address")

    def __init__(self, key_rpm=0, key_tpm=0, address_rpm=0, address_tpm=0,
                 clock=time.monotonic):
        per_minute = {("key", "requests"): key_rpm, ("key", "tokens"): key_tpm,
                      ("address", "requests"): address_rpm, ("address", "tokens"): address_tpm}
        self.limits = {k: Limit(n, clock) for k, n in per_minute.items() if n > 0}

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    def admit(self, clients: dict[str, str]) -> Refusal | None:
        """Take one request from each scope's request bucket, or say which limit refuses.
        `clients` maps a scope to the client's id in it. A request refused by one limit
        takes nothing from the others."""
        for scope in self.SCOPES:
            tokens = self.limits.get((scope, "tokens"))
            if tokens and (wait := tokens.wait(clients[scope])):
                return Refusal(scope, "tokens", int(tokens.capacity), wait)
        taken = []
        for scope in self.SCOPES:
            requests = self.limits.get((scope, "requests"))
            if requests is None:
                continue
            wait = requests.take(clients[scope], 1)
            if wait:
                for limit, client in taken:  # give back what the others took
                    limit.charge(client, -1)
                return Refusal(scope, "requests", int(requests.capacity), wait)
            taken.append((requests, clients[scope]))
        return None

    def charge(self, clients: dict[str, str], tokens: int) -> None:
        """A finished request's tokens, from each scope's token bucket."""
        for scope in self.SCOPES:
            limit = self.limits.get((scope, "tokens"))
            if limit and tokens:
                limit.charge(clients[scope], tokens)

    def headers(self, clients: dict[str, str]) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for the key scope when it has limits, else for the
        address scope."""
        out = {}
        for kind in ("requests", "tokens"):
            for scope in self.SCOPES:
                limit = self.limits.get((scope, kind))
                if limit:
                    total, remaining, reset = limit.state(clients[scope])
                    out[f"x-ratelimit-limit-{kind}"] = str(total)
                    out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
                    out[f"x-ratelimit-reset-{kind}"] = duration(reset)
                    break
        return out


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    seconds = math.ceil(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds}s"
