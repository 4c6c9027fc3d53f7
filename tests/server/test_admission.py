"""The admission queue on its own: slots, FIFO hand-off, refusals and timeouts."""

from __future__ import annotations

import threading
import time

import pytest

from server.serving.admission import Admission, QueueFull, QueueTimeout


def test_slots_then_queue_then_refusal():
    adm = Admission(max_active=2, max_waiting=1, timeout=5)
    adm.acquire()
    adm.acquire()
    waiter = threading.Thread(target=adm.acquire)
    waiter.start()
    while adm.waiting != 1:
        time.sleep(0.001)
    with pytest.raises(QueueFull):
        adm.acquire()
    adm.release()  # hands the slot to the waiter; the count stays at 2
    waiter.join(1)
    assert not waiter.is_alive() and (adm.active, adm.waiting) == (2, 0)
    adm.release()
    adm.release()
    assert adm.active == 0 and adm.wait_idle(0.1)


def test_waiters_are_served_in_arrival_order():
    adm = Admission(max_active=1, max_waiting=5, timeout=5)
    adm.acquire()
    order = []

    def wait(i):
        adm.acquire()
        order.append(i)
        adm.release()

    threads = []
    for i in range(5):
        threads.append(threading.Thread(target=wait, args=(i,)))
        threads[-1].start()
        while adm.waiting != i + 1:
            time.sleep(0.001)
    adm.release()
    for t in threads:
        t.join(2)
    assert order == [0, 1, 2, 3, 4] and adm.active == 0


def test_wait_past_the_timeout_gives_up_and_leaves_the_queue():
    adm = Admission(max_active=1, max_waiting=1, timeout=0.05)
    adm.acquire()
    t0 = time.monotonic()
    with pytest.raises(QueueTimeout):
        adm.acquire()
    assert 0.04 < time.monotonic() - t0 < 1 and adm.waiting == 0
    adm.release()
    assert adm.active == 0


def test_zero_queue_refuses_at_once():
    adm = Admission(max_active=1, max_waiting=0, timeout=5)
    adm.acquire()
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        adm.acquire()
    assert time.monotonic() - t0 < 0.05 and adm.retry_after() >= 1


def test_many_threads_never_exceed_the_slots():
    adm = Admission(max_active=2, max_waiting=100, timeout=5)
    running, peak, lock = [0], [0], threading.Lock()

    def work():
        adm.acquire()
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        adm.release()

    threads = [threading.Thread(target=work) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert peak[0] == 2 and adm.active == 0 and adm.waiting == 0
