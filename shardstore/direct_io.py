"""Large file writes that skip the page cache (``O_DIRECT``), with a plain write where that cannot work.

Why. ``pull`` and the shard cache write gigabytes that are fsynced (pull) or read rarely (the
cache), so keeping them in the page cache buys nothing, and copying them there costs: on this VM
a buffered write of 1 GiB of fresh page cache took 2.6 s of CPU against 0.04 s written direct
(`dd oflag=direct`: 1.8 GB/s against 0.44 GB/s; docs/benchmarks.md). The bytes must reach the
disk before ``pull`` returns anyway (it fsyncs), so direct writes cost no wall time either.

How it stays correct. ``O_DIRECT`` wants the memory, the file offset and the length aligned.
:meth:`DirectWriter.write_at` sends only the whole units in the middle of a write direct (4 KiB
pages, or the page or filesystem block where either is larger), and the unaligned edges through
the ordinary descriptor. A page is thus written either only direct or only through the page
cache, never both: mixing the two on one page can lose a write when threads
race (the kernel warns "Page cache invalidation failure on direct I/O"). Where the filesystem
refuses ``O_DIRECT`` (tmpfs, some network filesystems) or the memory is not aligned with the file
offset, everything goes through the ordinary descriptor, as before.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from typing import Any

import numpy as np

# Page size, and the alignment asked of memory, offsets and lengths: stricter than any block
# device's (512 or 4096), so one rule fits every disk.
ALIGN = 4096


def aligned_mapping(size: int) -> mmap.mmap:
    """``size`` bytes of private anonymous memory, starting on a page boundary; unmapped when its last view goes.

    Private: ``mmap.mmap(-1, n)`` alone maps *shared* anonymous memory, which is shmem (tmpfs)
    underneath, never in huge pages and dearer to fault in.
    """
    return mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def address(view: Any) -> int:
    """The memory address of a buffer's first byte."""
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]) if len(view) else 0


def open_direct(path: str | os.PathLike[str]) -> int | None:
    """A second, write-only, ``O_DIRECT`` descriptor on an existing file, or None where there is none to have.

    Never raises: the ordinary descriptor can always do the writes, so a filesystem that refuses
    ``O_DIRECT`` (EINVAL on tmpfs) or any other failure here only means buffered writes.
    """
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


class DirectWriter:
    """Writes into one file at given offsets: the aligned middle of each write direct, the rest buffered.

    ``fd`` is the caller's ordinary descriptor (it keeps owning it); :meth:`close` closes only the
    direct one. Safe to use from several threads for disjoint ranges.
    """

    def __init__(self, fd: int, path: str | os.PathLike[str]) -> None:
        self.fd = fd
        self._direct = open_direct(path)
        self._buffered_only = self._direct is None
        # The unit no write may split between the two paths: a page of the page cache, or a block of
        # the filesystem where that is larger (64 KiB pages on some arm64 kernels, large XFS blocks).
        self.align = max(ALIGN, mmap.PAGESIZE, os.fstat(fd).st_blksize)

    def write_at(self, view: memoryview, offset: int) -> None:
        """All of ``view`` at ``offset``: the units wholly inside it direct, when memory lines up with the file."""
        align = self.align
        end = offset + len(view)
        first = -(-offset // align) * align  # first boundary at or after the start
        last = end // align * align  # last boundary at or before the end
        if self._buffered_only or last - first < align or (address(view) - offset) % align:
            _pwrite_all(self.fd, view, offset)
            return
        head, tail = first - offset, last - offset
        assert self._direct is not None
        try:
            _pwrite_all(self._direct, view[head:tail], first)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            # Stricter rules than ours (an odd filesystem): from now on, everything buffered. The
            # direct descriptor stays open (another thread may be writing through it) until close().
            self._buffered_only = True
            _pwrite_all(self.fd, view[head:tail], first)
        if head:
            _pwrite_all(self.fd, view[:head], offset)
        if tail < len(view):
            _pwrite_all(self.fd, view[tail:], last)

    def close(self) -> None:
        if self._direct is not None:
            with contextlib.suppress(OSError):
                os.close(self._direct)
            self._direct = None
            self._buffered_only = True

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
