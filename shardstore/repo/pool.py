"""A bounded, ordered parallel map: the one way push, pull and load run work in threads.

At most ``window`` tasks are in flight, so memory stays bounded however large
the model (DESIGN invariant 7), and results come back in input order, so the
consumer can write them sequentially. Codecs and hashing release the GIL, so
threads give real parallelism.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def ordered_map(func: Callable[[T], R], items: Iterable[T], threads: int, window: int | None = None) -> Iterator[R]:
    if threads <= 1:
        yield from map(func, items)
        return
    window = window or 2 * threads
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shardstore") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(func, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
