"""The read-buffer pool: a buffer is reused only once nothing can read it any more, and idle memory is capped."""

from __future__ import annotations

import gc

import numpy as np

from shardstore.buffers import BufferPool

MIB = 1 << 20


def test_a_buffer_comes_back_only_when_its_last_view_is_gone() -> None:
    pool = BufferPool(keep_bytes=16 * MIB)
    view = pool.take(3 * MIB + 5)
    assert view.nbytes == 3 * MIB + 5 and not view.readonly
    view[:4] = b"shrd"
    part = view[:4]
    array = np.frombuffer(part, dtype=np.uint8)
    del view, part
    assert pool.idle_bytes == 0  # the array still reads the buffer
    other = pool.take(3 * MIB)  # so this must be a different buffer
    other[:4] = b"XXXX"
    assert bytes(array) == b"shrd"
    del array
    # Buffers are sized in whole MiB: the first one (4 MiB) is idle again.
    assert pool.idle_bytes == 4 * MIB
    del other
    assert pool.idle_bytes == 7 * MIB
    assert pool.allocated == 2


def test_an_idle_buffer_is_reused_only_for_a_request_of_at_least_half_its_size() -> None:
    pool = BufferPool(keep_bytes=16 * MIB)
    first = pool.take(4 * MIB)
    address = np.frombuffer(first, dtype=np.uint8).ctypes.data
    del first
    again = pool.take(2 * MIB)
    assert np.frombuffer(again, dtype=np.uint8).ctypes.data == address
    assert again.nbytes == 2 * MIB
    assert pool.allocated == 1
    del again
    # A 1 MiB shard kept in a cache must not pin the 4 MiB buffer: it gets one of its own.
    small = pool.take(MIB)
    assert np.frombuffer(small, dtype=np.uint8).ctypes.data != address
    assert pool.allocated == 2 and pool.idle_bytes == 4 * MIB


def test_small_requests_are_not_pooled() -> None:
    pool = BufferPool(keep_bytes=16 * MIB)
    views = [pool.take(100), pool.take(MIB // 2 - 1)]
    assert [v.nbytes for v in views] == [100, MIB // 2 - 1]
    del views
    assert pool.allocated == 0 and pool.idle_bytes == 0


def test_idle_memory_stays_under_its_cap() -> None:
    pool = BufferPool(keep_bytes=5 * MIB)
    views = [pool.take(2 * MIB) for _ in range(4)]  # 8 MiB in use
    del views
    gc.collect()
    assert pool.idle_bytes == 4 * MIB  # two buffers kept; a third would pass 5 MiB


def test_a_view_counts_the_whole_pooled_buffer_it_keeps_alive() -> None:
    from shardstore.buffers import held_bytes
    from shardstore.rpc.server import HotShardCache

    pool = BufferPool(keep_bytes=16 * MIB)
    big = pool.take(4 * MIB)
    del big  # idle: 4 MiB
    small = pool.take(2 * MIB + 1)  # reuses the 4 MiB buffer (at least half its size)
    assert held_bytes(small) == 4 * MIB and held_bytes(small[:10]) == 4 * MIB
    assert held_bytes(b"x" * 100) == 100 and held_bytes(memoryview(bytearray(7))) == 7
    cache = HotShardCache(max_bytes=32 * MIB)
    cache.put("a" * 64, small)
    assert cache.size == 4 * MIB  # what it pins, not the 2 MiB it shows
