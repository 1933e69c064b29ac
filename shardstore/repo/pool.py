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
from typing import TypeVar

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
    window = window or 2 * threads
    running = threading.BoundedSemaphore(threads)

    def limited(item: T) -> R:
        try:
            return func(item)
        finally:
            running.release()

    pool = shared_pool()
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            # A slot is taken before the task reaches the pool, not inside it: a task waiting for a
            # slot must not hold a pool worker, or maps nested inside running tasks (a delta's base
            # shards) could find every worker taken by tasks that wait for them.
            running.acquire()
            pending.append(pool.submit(limited, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # On an early exit, cancel what has not started and wait for what has: a task still
        # running after we return could write into a buffer or file its caller already let go.
        started = [future for future in pending if not future.cancel()]
        wait(started)
