"""Writes past the page cache: every byte lands where it was asked, from any thread, and really skips the cache.

Expectations are built with plain ``bytearray`` slice assignment, never with ``write_at``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstore.buffers import READ_BUFFERS
from shardstore.direct_io import ALIGN, DirectWriter, aligned_mapping, open_direct
from shardstore.format.digest import digest
from shardstore.store.cache import ShardCache

PAGE = 4096
# Starts and sizes around page edges: inside one page, exactly pages, a page plus a byte, many pages.
OFFSETS = [0, 1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 17]
SIZES = [1, 100, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE, 2 * PAGE + 1, 5 * PAGE + 300]


def _resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache, as util-linux's fincore counts them."""
    out = subprocess.run(["fincore", "--json", "--bytes", str(path)], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout)["fincore"][0]["pages"])


def _placed(data: bytes, offset: int) -> memoryview:
    """``data`` in page-aligned memory at ``offset``'s place within a page, as the pull's scratch holds a piece."""
    lead = offset % PAGE
    buffer = memoryview(aligned_mapping(lead + len(data)))
    buffer[lead:] = data
    return buffer[lead:]


@pytest.mark.parametrize("aligned_memory", [True, False])
def test_every_byte_lands_at_its_offset_whatever_the_alignment(tmp_path: Path, aligned_memory: bool) -> None:
    rng = random.Random(7)
    for offset in OFFSETS:
        for size in SIZES:
            path = tmp_path / f"f-{offset}-{size}"
            total = offset + size + 2 * PAGE + 5
            expected = bytearray(b"\x5a" * total)
            data = rng.randbytes(size)
            expected[offset : offset + size] = data
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                os.pwrite(fd, b"\x5a" * total, 0)
                view = _placed(data, offset) if aligned_memory else memoryview(bytearray(b"." + data))[1:]
                with DirectWriter(fd, path) as writer:
                    writer.write_at(view, offset)
            finally:
                os.close(fd)
            assert path.read_bytes() == bytes(expected), (offset, size)


def test_threads_writing_neighbouring_pieces_of_one_file_lose_nothing(tmp_path: Path) -> None:
    # Pieces of odd sizes meet inside pages: those edge pages are written through the page cache by
    # two threads while the whole pages between them go direct. A page written both ways would lose data.
    rng = random.Random(11)
    sizes = [rng.randrange(1, 6 * PAGE) for _ in range(400)]
    starts = [0, *np.cumsum(sizes)[:-1].tolist()]
    expected = rng.randbytes(sum(sizes))
    path = tmp_path / "model.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.ftruncate(fd, len(expected))
    writer = DirectWriter(fd, path)
    order = list(range(len(sizes)))
    rng.shuffle(order)

    def work(part: list[int]) -> None:
        for i in part:
            writer.write_at(_placed(expected[starts[i] : starts[i] + sizes[i]], starts[i]), starts[i])

    threads = [threading.Thread(target=work, args=(order[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    os.fsync(fd)
    os.close(fd)
    assert path.read_bytes() == expected


def test_the_whole_pages_of_a_write_skip_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    size = 64 * PAGE + 123
    data = os.urandom(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, size + 10)
        direct = open_direct(path)
        assert direct is not None, f"{tmp_path}: this filesystem refuses O_DIRECT, so nothing here can skip the cache"
        os.close(direct)
        with DirectWriter(fd, path) as writer:
            writer.write_at(_placed(data, 10), 10)
    finally:
        os.close(fd)
    # Only the first page (10 bytes in) and the last (the unaligned end) went through the cache.
    assert _resident_pages(path) <= 2
    assert path.read_bytes()[10:] == data


def test_a_file_that_cannot_be_opened_direct_is_written_through_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "plain.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    data = os.urandom(8 * PAGE)
    try:
        # A path with no file: no direct descriptor to be had, and no error either.
        with DirectWriter(fd, tmp_path / "missing") as writer:
            writer.write_at(_placed(data, 0), 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert _resident_pages(path) == 8


def test_a_cache_entry_written_from_a_pooled_buffer_reads_back_whole(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 30)
    for size in (1, ALIGN - 1, 3 << 20, (5 << 20) + 777):
        data = os.urandom(size)
        view = READ_BUFFERS.take(size)
        view[:] = data
        shard_id = digest(data)
        cache.put(shard_id, view)
        assert cache.get(shard_id) == data, size


def test_a_filesystem_that_refuses_a_direct_write_gets_it_buffered_and_leaks_no_descriptor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fault this disk cannot produce: O_DIRECT opens, but the write is refused (stricter alignment
    # than ours). Injected at os.pwrite for the direct descriptors only.
    import shardstore.direct_io as direct_io

    direct_fds: set[int] = set()
    real_open, real_pwrite = direct_io.open_direct, os.pwrite

    def tracking_open(path: str | os.PathLike[str]) -> int | None:
        fd = real_open(path)
        if fd is not None:
            direct_fds.add(fd)
        return fd

    def refusing_pwrite(fd: int, data: Any, offset: int) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io, "open_direct", tracking_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    before = len(os.listdir("/proc/self/fd"))
    for index in range(20):
        path = tmp_path / f"f{index}"
        data = os.urandom(3 * PAGE + 5)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            with DirectWriter(fd, path) as writer:
                writer.write_at(_placed(data, 0), 0)
                writer.write_at(_placed(data, len(data)), len(data))  # after the refusal: buffered at once
        finally:
            os.close(fd)
        assert path.read_bytes() == data + data
    assert direct_fds, "the direct path was never tried"
    assert len(os.listdir("/proc/self/fd")) == before
