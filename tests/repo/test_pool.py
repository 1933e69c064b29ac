"""The shared worker pool: maps nested inside running tasks finish however many threads the outer map has."""

from __future__ import annotations

import threading
import time

from shardstore.repo.pool import POOL_WORKERS, ordered_map


def test_nested_maps_finish_even_when_the_outer_window_covers_every_worker() -> None:
    # The shape of a delta pull: each outer task (decode a piece) runs an inner map (fetch its base
    # shard) on the same pool. With 32 threads the outer window is 64 tasks, every worker: tasks that
    # waited for a slot inside a worker would leave none for the inner maps.
    threads = POOL_WORKERS // 2
    assert 2 * threads >= POOL_WORKERS

    def fetch(i: int) -> int:
        time.sleep(0.001)
        return i

    def place(i: int) -> int:
        time.sleep(0.05)  # long enough for the whole window to be submitted before any inner map starts
        return next(iter(ordered_map(fetch, [i], 2))) * 2

    got: list[int] = []
    worker = threading.Thread(target=lambda: got.extend(ordered_map(place, range(200), threads)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "nested maps made no progress in 60 s"
    assert got == [2 * i for i in range(200)]


def test_at_most_threads_tasks_run_at_once_and_results_keep_their_order() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.002)
        with lock:
            running -= 1
        return i

    assert list(ordered_map(work, range(200), 3)) == list(range(200))
    assert most == 3


def test_a_started_map_runs_before_it_is_read_and_closing_it_unread_waits_for_what_started() -> None:
    from shardstore.repo.pool import OrderedMap

    started: list[int] = []
    release = threading.Event()

    def work(i: int) -> int:
        started.append(i)
        release.wait(10)
        return i * 3

    run = OrderedMap(work, range(10), 2, window=2).start()
    deadline = time.monotonic() + 5
    while len(started) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sorted(started) == [0, 1]  # two slots: two running before anyone read a result, no more
    release.set()
    assert list(run) == [i * 3 for i in range(10)]

    release.clear()
    started.clear()
    unread = OrderedMap(work, range(10), 2, window=2).start()
    while len(started) < 2 and time.monotonic() < deadline + 5:
        time.sleep(0.005)
    threading.Timer(0.2, release.set).start()
    began = time.monotonic()
    unread.close()  # never iterated: still waits for the two running tasks, and starts no other
    assert time.monotonic() - began >= 0.15
    assert sorted(started) == [0, 1]


def test_a_started_map_never_holds_more_than_its_window() -> None:
    # Pull's headers are a started map of window 4, and a server decides how large each header is:
    # the window is what bounds the memory they take, so a fifth must not start before one is read.
    from shardstore.repo.pool import OrderedMap

    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        return i

    def once_started(count: int) -> list[int]:
        deadline = time.monotonic() + 10
        while len(started) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return sorted(started)

    run = OrderedMap(work, range(10), 2, window=2).start()
    results = iter(run)
    assert once_started(2) == [0, 1]
    assert next(results) == 0
    time.sleep(0.2)  # whatever iterating submitted has had time to start
    assert sorted(started) == [0, 1]  # the first result went out before a third task came in
    assert next(results) == 1
    assert once_started(3) == [0, 1, 2]
    assert list(results) == list(range(2, 10))
