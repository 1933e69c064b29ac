"""A bounded, ordered parallel map over one process-wide worker pool: how push, pull, load and verify use threads.

At most ``window`` tasks are in flight, so memory stays bounded however large
the model (DESIGN invariant 7), and results come back in input order, so the
consumer can write them sequentially. Codecs and hashing release the GIL, so
threads give real parallelism.

The pool is created once and reused: a load does not pay for starting
threads. Nested maps (a decode that fetches a delta's base shard through a
source that itself reads in parallel) cannot deadlock: each map limits *its
own* concurrency to ``threads`` with a semaphore taken *before* a task is
submitted, so the pool only ever holds running tasks, never tasks waiting for
a slot. Outer tasks that wait for inner ones thus hold at most ``threads``
workers, and the inner tasks (which wait for nothing) get the rest, as long as
``threads`` stays below :data:`POOL_WORKERS`.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Workers in the shared pool: enough for every map in flight at once (each holds at most
# ``threads`` running tasks and ``window`` queued ones); idle workers cost nothing but a stack.
POOL_WORKERS = 64

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def shared_pool() -> ThreadPoolExecutor:
    """The process-wide worker pool (threads start lazily and are kept)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=POOL_WORKERS, thread_name_prefix="shardstore")
        return _pool


def ordered_map(func: Callable[[T], R], items: Iterable[T], threads: int, window: int | None = None
                ) -> Generator[R, None, None]:
    """``map(func, items)`` with at most ``threads`` calls running and ``window`` (default 2 x threads) in flight."""
    if threads <= 1:
        yield from map(func, items)
        return
    run = OrderedMap(func, items, threads, window)
    try:
        yield from run
    finally:
        run.close()


class OrderedMap(Generic[T, R]):
    """The machinery of :func:`ordered_map`, for a caller that wants the first tasks running before it asks.

    :meth:`start` submits as many tasks as there are free slots, without waiting: pull's headers
    are fetched while its shard stream starts. Iterating yields results in input order, submitting
    the rest as it goes; :meth:`close` cancels what has not started and waits for what has,
    whether or not iteration ever began.
    """

    def __init__(self, func: Callable[[T], R], items: Iterable[T], threads: int, window: int | None = None) -> None:
        self._func = func
        self._items = iter(items)
        self._threads = max(1, threads)
        self._window = window or 2 * self._threads
        self._running = threading.BoundedSemaphore(self._threads)
        self._pending: deque[Future[R]] = deque()

    def _limited(self, item: T) -> R:
        try:
            return self._func(item)
        finally:
            self._running.release()

    def _submit(self, item: T) -> None:
        self._pending.append(shared_pool().submit(self._limited, item))

    def start(self) -> OrderedMap[T, R]:
        """Submit tasks while a slot is free and the window has room; never waits."""
        while len(self._pending) < self._window and self._running.acquire(blocking=False):
            try:
                item = next(self._items)
            except StopIteration:
                self._running.release()
                break
            self._submit(item)
        return self

    def __iter__(self) -> Generator[R, None, None]:
        # After start() the window may already be full: a result goes out before another task comes in,
        # so no more than ``window`` results are ever held.
        while len(self._pending) >= self._window:
            yield self._pending.popleft().result()
        for item in self._items:
            # A slot is taken before the task reaches the pool, not inside it: a task waiting for a
            # slot must not hold a pool worker, or maps nested inside running tasks (a delta's base
            # shards) could find every worker taken by tasks that wait for them.
            self._running.acquire()
            self._submit(item)
            if len(self._pending) >= self._window:
                yield self._pending.popleft().result()
        while self._pending:
            yield self._pending.popleft().result()

    def close(self) -> None:
        # On an early exit, cancel what has not started and wait for what has: a task still
        # running after we return could write into a buffer or file its caller already let go.
        started = [future for future in self._pending if not future.cancel()]
        self._pending.clear()
        wait(started)

