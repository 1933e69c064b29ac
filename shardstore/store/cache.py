"""A local, content-addressed, size-bounded LRU cache of shards: a directory.

Clients keep every shard they fetch here, so a second pull of the same model,
or of another version sharing tensors with it, fetches only the shards the
cache lacks. Entries are named by their id, written atomically (temporary file
then rename: a crash never leaves a torn entry that looks whole), and checked
against their id on every read: a corrupt entry is deleted and reported as a
miss, never returned (DESIGN invariant 3).

Recency is the file's mtime, touched on each hit, so several processes can
share one cache without a lock file: at worst two of them evict the same
entry, which is harmless. Eviction runs when the running total passes the
bound and trims to 90 % of it, so it costs one directory scan per ~10 % of
churn rather than one per write.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import deque
from pathlib import Path

from shardstore.direct_io import DirectWriter
from shardstore.format.digest import digest, is_object_id, matches
from shardstore.sizes import parse_size

CACHE_ENV = "SHARDSTORE_CACHE"
CACHE_SIZE_ENV = "SHARDSTORE_CACHE_SIZE"
DEFAULT_CACHE_BYTES = 20 << 30
_TRIM_TO = 0.9
_TMP_PREFIX = ".tmp-"


def default_cache_dir() -> Path:
    """``$SHARDSTORE_CACHE``, else ``$XDG_CACHE_HOME/shardstore`` (``~/.cache/shardstore``)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "shardstore"


def default_cache_bytes() -> int:
    """``$SHARDSTORE_CACHE_SIZE`` (``20GiB``, ``500MB``, bytes), else 20 GiB; garbage is an error, never ignored."""
    configured = os.environ.get(CACHE_SIZE_ENV, "").strip()
    return parse_size(configured, f"${CACHE_SIZE_ENV}") if configured else DEFAULT_CACHE_BYTES


class ShardCache:
    """``<root>/shards/<id[:2]>/<id>``, at most ``max_bytes`` in all. Safe to use from several threads."""

    def __init__(self, root: str | os.PathLike[str] | None = None, max_bytes: int | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_bytes = max_bytes if max_bytes is not None else default_cache_bytes()
        self._lock = threading.Lock()
        self._size: int | None = None  # computed lazily: a scan costs a walk of the folder
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    def _path(self, shard_id: str) -> Path:
        return self.root / "shards" / shard_id[:2] / shard_id

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries: list[tuple[float, int, Path]] = []
        base = self.root / "shards"
        if not base.is_dir():
            return entries
        for folder in base.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith(_TMP_PREFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    entries.append((stat.st_mtime, stat.st_size, path))
        return entries

    @property
    def size(self) -> int:
        with self._lock:
            if self._size is None:
                self._size = sum(size for _mtime, size, _path in self._entries())
            return self._size

    def get(self, shard_id: str) -> bytes | None:
        """The shard's bytes if cached and intact; a corrupt entry is deleted and counts as a miss."""
        if not is_object_id(shard_id):
            return None
        path = self._path(shard_id)
        try:
            data = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        if not matches(data, shard_id):
            self.corrupt += 1
            self.misses += 1
            self._remove(path, len(data))
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for LRU
        self.hits += 1
        return data

    def __contains__(self, shard_id: str) -> bool:
        return is_object_id(shard_id) and self._path(shard_id).is_file()

    def put(self, shard_id: str, data: bytes | bytearray | memoryview) -> None:
        """Keep a shard the caller has already checked against its id. Best effort: a full disk only skips it."""
        if not is_object_id(shard_id) or len(data) > self.max_bytes:
            return
        path = self._path(shard_id)
        if path.exists():
            return
        _ = self.size  # scan (once) before the write, so the scan cannot count this entry twice
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                # Past the page cache where it can: an entry is read again only on a later pull.
                with DirectWriter(fd, tmp) as writer:
                    writer.write_at(memoryview(data).cast("B"), 0)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        with self._lock:
            self._size = (self._size or 0) + len(data)
            over = self._size > self.max_bytes
        if over:
            self.evict()

    def evict(self) -> None:
        """Remove least recently used entries until the cache holds at most 90 % of its bound."""
        with self._lock:
            entries = sorted(self._entries())
            total = sum(size for _mtime, size, _path in entries)
            target = int(self.max_bytes * _TRIM_TO)
            for _mtime, size, path in entries:
                if total <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                total -= size
            self._size = total

    def _remove(self, path: Path, size: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with self._lock:
            if self._size is not None:
                self._size = max(0, self._size - size)

    def scrub(self, *, delete: bool) -> tuple[int, list[Path]]:
        """Check every entry against its id: (entries checked, the corrupt ones), deleting those when asked.

        Reads never return a corrupt entry anyway (:meth:`get` checks); this finds
        them all at once, for ``verify --cache``.
        """
        corrupt: list[Path] = []
        entries = self._entries()
        for _mtime, size, path in entries:
            try:
                intact = is_object_id(path.name) and digest(path.read_bytes()) == path.name
            except OSError:
                continue  # evicted meanwhile
            if not intact:
                corrupt.append(path)
                if delete:
                    self._remove(path, size)
        self.corrupt += len(corrupt)
        return len(entries), corrupt

    def clear(self) -> None:
        with self._lock:
            for _mtime, _size, path in self._entries():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._size = 0


class CacheWriter:
    """Write-behind for a :class:`ShardCache`: shards already checked are written by one thread of its own.

    A receive thread or a decode worker hands a shard over and goes on; the
    writer thread does the disk write. At most ``max_bytes`` wait at once: past
    that, :meth:`submit` waits (memory stays bounded, and a disk slower than the
    link slows the pull rather than growing a queue). :meth:`flush` waits until
    every submitted shard is written, so a finished pull has a complete cache.
    """

    def __init__(self, cache: ShardCache, max_bytes: int = 64 << 20) -> None:
        self.cache = cache
        self.max_bytes = max_bytes
        self._queue: deque[tuple[str, bytes | bytearray | memoryview]] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, shard_id: str, data: bytes | bytearray | memoryview) -> None:
        with self._cond:
            # One shard bigger than the bound still goes in, alone, rather than never.
            while self._queued and self._queued + len(data) > self.max_bytes:
                self._cond.wait()
            self._queue.append((shard_id, data))
            self._queued += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shardstore-cache-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                shard_id, data = self._queue[0]
            self.cache.put(shard_id, data)  # best effort: a full disk only skips the entry
            with self._cond:
                self._queue.popleft()
                self._queued -= len(data)
                self._cond.notify_all()

    def flush(self) -> None:
        """Return once every shard submitted so far is in the cache (or skipped by it)."""
        with self._cond:
            while self._queue:
                self._cond.wait()
