"""The deploy recipe on loopback: three `numbalm serve` replicas behind Debian's nginx running
the repo's deploy/nginx/numbalm.conf, a steady streaming load through nginx, and then:

- a second (and third) replica started against the same read-only model cache, with the JIT
  cache warm, compiles nothing and writes nothing;
- SIGTERM to one replica mid-load: no request fails (it drains, nginx sends new work elsewhere);
- SIGKILL to one: only requests in flight on it fail; new ones go to the others; it rejoins;
- a rolling restart of all three under load: no request fails;
- and all that time nothing was compiled after the first replica's warm-up.

Each test prints its counts and latencies. Bounded: a few minutes at most on 2 cores.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.deploy.cluster import (
    COLD_START_SECONDS,
    ROOT,
    START_SECONDS,
    Load,
    Nginx,
    Replica,
    Result,
    nginx_binary,
    require_readonly_mounts,
)
from tests.helpers import free_port, model_path

pytestmark = pytest.mark.slow
EXIT_SECONDS = 40  # a replica's drain: --shutdown-grace 20 s is the most it may take
REJOIN_SECONDS = 30  # nginx tries a failed replica again after fail_timeout (5 s)


def jit_files(path) -> dict[str, float]:
    """Every file of the JIT cache and its modification time."""
    return {str(p.relative_to(path)): p.stat().st_mtime for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def cluster():
    from engine.registry import cache_dir

    model_path("smollm2")  # in the cache, or skip/fail
    nginx_binary()
    # a directory of our own: pytest prunes old basetemps when other sessions start, and this
    # one lives for minutes (nginx's config, the JIT cache, the replicas' logs)
    with tempfile.TemporaryDirectory(prefix="numbalm-cluster-") as name:
        yield from _cluster(Path(name), cache_dir().resolve())


def _cluster(tmp: Path, models: Path):
    require_readonly_mounts(tmp)
    jit = tmp / "jit"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(jit), PYTHONDONTWRITEBYTECODE="1")
    readonly = [models, ROOT]  # the models and the code, read-only as in an image
    replicas = [Replica(f"replica-{i}", free_port(), env, readonly, tmp) for i in range(3)]
    nginx = Nginx(tmp, [r.port for r in replicas])
    facts = {"readonly": readonly}
    try:
        replicas[0].start()  # cold: compiles every kernel into NUMBA_CACHE_DIR
        facts["cold_start"] = replicas[0].wait_ready(COLD_START_SECONDS)
        facts["jit_before"] = jit_files(jit)
        facts["warm_starts"] = []
        for replica in replicas[1:]:  # one at a time, so each start is timed alone
            replica.start()
            facts["warm_starts"].append(replica.wait_ready(START_SECONDS))
        facts["jit_after"] = jit_files(jit)
        facts["jit_dir"] = jit
        nginx.start()
        yield replicas, nginx, facts
    finally:
        nginx.stop()
        for replica in replicas:
            replica.stop()


def stats(results: list[Result]) -> str:
    """Counts and latencies (s) of a set of requests."""
    if not results:
        return "0 requests"
    ok = [r for r in results if r.ok]
    total = np.array([r.end - r.start for r in ok]) if ok else np.zeros(1)
    ttft = np.array([r.first_token - r.start for r in ok if r.first_token]) if ok else total
    retried = sum("," in r.upstream for r in results)
    return (f"{len(results)} requests, {len(results) - len(ok)} failed, {retried} retried by "
            f"nginx; latency p50 {np.median(total):.2f} max {total.max():.2f}, "
            f"TTFT p50 {np.median(ttft):.2f} max {ttft.max():.2f}")


def started(results, t0, t1=float("inf")) -> list[Result]:
    return [r for r in results if t0 <= r.start < t1]


def report(capsys, title: str, lines: list[str]) -> None:
    with capsys.disabled():
        print(f"\n[failover] {title}")
        for line in lines:
            print(f"[failover]   {line}")


def failures(results) -> list[str]:
    return [f"{r.id} via {r.upstream or '?'} ({r.upstream_status}): {r.error}"
            for r in results if not r.ok]


def restart(replica: Replica) -> float:
    replica.start()
    return replica.wait_ready(START_SECONDS)


def test_replicas_share_a_read_only_cache_and_a_warm_jit_cache(cluster, capsys):
    replicas, nginx, facts = cluster
    for replica in replicas:
        for path in facts["readonly"]:
            assert "ro" in replica.mount_options(path), (replica.name, path)
    # the warm replicas compiled nothing: the JIT cache is as the first one left it
    assert facts["jit_before"] and facts["jit_after"] == facts["jit_before"]
    report(capsys, "start-up against a read-only model cache", [
        f"first replica (cold JIT cache): ready in {facts['cold_start']:.1f} s",
        "next replicas (warm JIT cache, nothing compiled): ready in "
        + ", ".join(f"{t:.1f} s" for t in facts["warm_starts"]),
        "RSS per replica: " + ", ".join(f"{r.rss_mb():.0f} MB" for r in replicas)])


def test_sigterm_one_replica_under_load_fails_no_request(cluster, capsys):
    replicas, nginx, _ = cluster
    victim = replicas[0]
    with Load(nginx.url) as load:
        time.sleep(3)
        victim.wait_busy()
        t_term = victim.signal(signal.SIGTERM)
        time.sleep(0.2)
        assert not victim.ready()  # /readyz answers 503 while it drains
        assert victim.wait_exit(EXIT_SECONDS) == 0
        t_exit = time.monotonic()
        time.sleep(2)
        t_restart = time.monotonic()
        ready = restart(victim)
        time.sleep(3)
    results = load.attach_log(nginx)
    port = str(victim.port)
    drained = [r for r in results if r.served_by == port and r.start < t_term < r.end]
    assert not failures(results), failures(results)
    assert drained, "no stream was in flight on the replica when it got SIGTERM"
    report(capsys, "SIGTERM to one replica mid-load", [
        f"before: {stats(started(results, 0, t_term))}",
        f"in flight on it at SIGTERM, finished by the drain: {len(drained)}",
        f"SIGTERM -> exit 0 in {t_exit - t_term:.1f} s; meanwhile: "
        f"{stats(started(results, t_term, t_exit))}",
        f"replica down, then restarting (ready in {ready:.1f} s): "
        f"{stats(started(results, t_exit, t_restart + ready))}",
        f"after: {stats(started(results, t_restart + ready))}"])


def test_sigkill_fails_only_the_requests_in_flight_on_it(cluster, capsys):
    replicas, nginx, _ = cluster
    victim = replicas[1]
    port = str(victim.port)
    with Load(nginx.url) as load:
        time.sleep(3)
        victim.wait_busy()
        t_kill = victim.signal(signal.SIGKILL)
        victim.wait_exit(10)
        time.sleep(3)
        t_restart = time.monotonic()
        ready = restart(victim)
        t_ready = time.monotonic()
        deadline = t_ready + REJOIN_SECONDS
        while time.monotonic() < deadline:  # nginx tries it again after fail_timeout
            if any(r.ok and r.start > t_ready for r in load.attach_log(nginx)
                   if r.served_by == port):
                break
            time.sleep(0.5)
        t_rejoined = time.monotonic()
        time.sleep(1)
    results = load.attach_log(nginx)
    failed = [r for r in results if not r.ok]
    for r in failed:  # every failure was on the killed replica, and already running there
        assert r.served_by == port and r.start < t_kill, failures([r])
    assert not failures(started(results, t_kill)), failures(started(results, t_kill))
    rejoined = [r for r in started(results, t_ready) if r.served_by == port and r.ok]
    assert rejoined, f"the restarted replica got no request within {REJOIN_SECONDS} s"
    report(capsys, "SIGKILL to one replica mid-load", [
        f"before: {stats(started(results, 0, t_kill))}",
        f"failed: {len(failed)}, all in flight on the killed replica",
        f"after the kill, replica down: {stats(started(results, t_kill, t_restart))}",
        f"restarting (ready in {ready:.1f} s): {stats(started(results, t_restart, t_ready))}",
        f"first request served by it {t_rejoined - t_ready:.1f} s after it was ready; "
        f"after: {stats(started(results, t_ready))}, {len(rejoined)} of them by it"])


def wait_rejoined(replica: Replica, load: Load, nginx: Nginx, since: float) -> float:
    """Seconds until nginx has sent `replica` a request (started after `since`) that it
    served; fails after REJOIN_SECONDS."""
    port, deadline = str(replica.port), time.monotonic() + REJOIN_SECONDS
    while time.monotonic() < deadline:
        if any(r.ok and r.start > since and r.served_by == port
               for r in load.attach_log(nginx)):
            return time.monotonic() - since
        time.sleep(0.5)
    raise AssertionError(f"{replica.name} got no request within {REJOIN_SECONDS} s of ready")


def test_rolling_restart_under_load_fails_no_request(cluster, capsys):
    """One replica at a time, as deploy/k8s (maxUnavailable 0) and docs/deploy.md do it: the
    next one drains only once nginx sends the restarted one work again. Its 503s while it
    drained kept it out of nginx's rotation for fail_timeout (5 s) even after it was ready;
    draining the next one sooner leaves, with three, none in rotation for a moment: a 502."""
    replicas, nginx, _ = cluster
    steps = []
    with Load(nginx.url) as load:
        time.sleep(2)
        t_start = time.monotonic()
        for replica in replicas:
            replica.wait_busy()
            t_term = replica.signal(signal.SIGTERM)
            assert replica.wait_exit(EXIT_SECONDS) == 0
            t_exit = time.monotonic()
            ready = restart(replica)
            rejoined = wait_rejoined(replica, load, nginx, time.monotonic())
            steps.append(f"{replica.name}: drained and exited in {t_exit - t_term:.1f} s, "
                         f"ready again {ready:.1f} s later, back in nginx's rotation "
                         f"{rejoined:.1f} s after that")
        t_end = time.monotonic()
        time.sleep(2)
    results = load.attach_log(nginx)
    assert not failures(results), failures(results)
    report(capsys, "rolling restart of all three under load", [
        f"before: {stats(started(results, 0, t_start))}", *steps,
        f"during the restart ({t_end - t_start:.1f} s): {stats(started(results, t_start, t_end))}",
        f"after: {stats(started(results, t_end))}"])


def test_serving_compiled_nothing_after_the_first_warm_up(cluster):
    """The warm-up compiles every kernel the requests above ran (prefill and decode, one stream
    and four, sampled), so a replica that says ready never stops to compile."""
    _, _, facts = cluster
    assert jit_files(facts["jit_dir"]) == facts["jit_before"]
