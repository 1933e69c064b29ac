"""Reused read buffers: shard bytes land in memory that is already mapped.

Why a pool. A load reads every shard into a fresh multi-MiB buffer and drops it a
moment later. malloc hands such a buffer out as a new mapping (or trims it from
its arena on free), so each one is page-faulted in again 4 KiB at a time: here
that was about 220,000 faults and half a second of kernel time per GB of shards,
a quarter of the CPU a two-core load has (docs/benchmarks.md). Buffers taken from
:data:`READ_BUFFERS` were faulted in once and are reused.

Why no "give back" call. A buffer goes back to the pool when the last view of it
is dropped (CPython frees by reference count, at once and in whichever thread
drops it). Readers hand out ordinary memoryviews; a consumer that keeps a shard
(the lazy view's small cache, the write-behind cache writer) just holds its view
longer, and a buffer can never be reused while anyone can still read it.

The pool is bounded: it keeps at most ``keep_bytes`` of idle buffers and lets
larger surpluses go back to the system, so it never holds more than a load's
in-flight shards did at their peak, capped.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from shardstore.direct_io import aligned_mapping

# Buffers are sized in these steps so shards of slightly different sizes share them.
_STEP = 1 << 20


class _Lease:
    """Owns one pooled array while any view of it lives; returns it to the pool when the last view goes."""

    __slots__ = ("__array_interface__", "_array", "_pool")

    def __init__(self, pool: BufferPool, array: np.ndarray[Any, Any], size: int) -> None:
        self._pool = pool
        self._array = array
        # numpy takes this object as the base of the array it builds from the interface, so every
        # memoryview or slice made from that array keeps the lease (and the buffer) alive.
        self.__array_interface__ = {**array.__array_interface__, "shape": (size,)}

    def __del__(self) -> None:
        self._pool._give(self._array)


class BufferPool:
    """Byte buffers handed out as memoryviews and reused once every view of them is gone."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[np.ndarray[Any, Any]] = []
        self._free_bytes = 0
        # Reentrant: a garbage collection run inside take() (any allocation can start one) may free a
        # lease caught in a reference cycle, whose __del__ then gives its buffer back on this thread.
        self._lock = threading.RLock()
        self.allocated = 0  # buffers made (not reused): what the pool saves is reads minus this

    def take(self, size: int) -> memoryview:
        """A writable view of exactly ``size`` bytes (contents undefined).

        Small requests get a plain buffer of their own (malloc serves those from memory it
        keeps), and a pooled buffer is reused only for a request of at least half its size:
        whoever keeps a view (the lazy view's shard cache, the cache writer) counts the view's
        length, so the memory it really pins must stay within a small factor of that.
        """
        if size < _STEP // 2:
            return memoryview(bytearray(size))
        rounded = -(-size // _STEP) * _STEP
        with self._lock:
            fitting = [i for i, array in enumerate(self._free) if size <= array.nbytes <= 2 * rounded]
            if fitting:
                index = min(fitting, key=lambda i: self._free[i].nbytes)
                array = self._free.pop(index)
                self._free_bytes -= array.nbytes
            else:
                array = None
                self.allocated += 1
        if array is None:
            # Page-aligned (an anonymous mapping), so the shard cache can write it past the page cache.
            array = np.frombuffer(aligned_mapping(rounded), dtype=np.uint8)
        return np.asarray(_Lease(self, array, size)).data

    def _give(self, array: np.ndarray[Any, Any]) -> None:
        with self._lock:
            if self._free_bytes + array.nbytes <= self.keep_bytes:
                self._free.append(array)
                self._free_bytes += array.nbytes

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return self._free_bytes


def held_bytes(data: bytes | bytearray | memoryview) -> int:
    """The memory ``data`` keeps alive: the whole pooled buffer a view lives in, else its own length.

    A cache that keeps views must count this, not ``len``: the pool may hand a request a buffer
    up to twice its rounded size.
    """
    owner = data.obj if isinstance(data, memoryview) else None
    lease = getattr(owner, "base", None)
    return int(lease._array.nbytes) if isinstance(lease, _Lease) else len(data)


# Shards read from local files. 64 MiB idle covers the shards a 16-core load keeps in flight
# (two per decoding thread, 4 MiB default shards) without holding a model's worth.
READ_BUFFERS = BufferPool(keep_bytes=64 << 20)
