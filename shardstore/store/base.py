"""The Store interface: a few primitives over keys, in the manner of zarr-python.

Keys are ``/``-separated relative paths (``shards/ab/ab12...``). Every backend
implements the same primitives and passes one shared conformance suite
(``shardstore.testing.store.StoreTests``; ``docs/testing.md``). A missing key is a typed result:
:class:`~shardstore.errors.NotFoundError`, never a backend-specific accident.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from shardstore.errors import InvalidInputError, NotFoundError, StoreError

log = logging.getLogger("shardstore.store")

# What a writer keeps in memory before it spills to a temporary file (stores without their own writer).
SPOOL_IN_MEMORY_BYTES = 1 << 20
_KEY_PART = re.compile(r"^[A-Za-z0-9._@:+=-]+$")


def check_key(key: str) -> str:
    """Refuse keys that could escape the store root or alias another key."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or not _KEY_PART.match(p) for p in parts):
        raise InvalidInputError(f"invalid store key {key!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says about one object: gc needs its size (bytes freed) and age (grace period)."""

    key: str
    size: int
    # Seconds since the epoch of the last write, by the backend's clock; None where the
    # backend keeps no such time (gc then treats the object as young: never deleted by age).
    modified: float | None


@dataclass(frozen=True)
class StoreCapabilities:
    # A conditional write (create-if-absent / replace-if-unchanged) is atomic, so
    # refs can be updated with compare-and-set. Without it refs are last-writer-wins.
    atomic_compare_and_set: bool = True
    # The backend is shared with other processes (refs may change under us).
    shared: bool = True


class Store(ABC):
    """Where objects live. Implementations must be safe to call from several threads."""

    capabilities = StoreCapabilities()
    # Requests worth having in flight at once for bulk reads and writes: 1 for a local
    # disk, more for object stores, where each request waits on a round trip.
    concurrency = 1

    @property
    @abstractmethod
    def url(self) -> str:
        """A URL that :func:`shardstore.store.open_store` turns back into this store."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; raises NotFoundError when it does not exist."""

    def get_buffer(self, key: str, see: Callable[[memoryview], object] | None = None) -> bytes | memoryview:
        """The whole object, as :meth:`get`, for bulk reads that drop it soon (the load path).

        A store may read it into a reused buffer (:mod:`shardstore.buffers`) and hands each
        part to ``see`` as it arrives, so a hash runs over bytes still in the CPU's cache
        rather than over the whole object again from memory. The default reads with :meth:`get`.
        """
        data = self.get(key)
        if see is not None:
            see(memoryview(data))
        return data

    @abstractmethod
    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (clipped at its end)."""

    @abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Write the object atomically: readers see the old bytes or the new, never a mix."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; raises NotFoundError."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (a folder path, without trailing slash), in any order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (retries are safe)."""

    @abstractmethod
    def compare_and_set(self, key: str, expected: bytes | None, new: bytes) -> bool:
        """Write ``new`` only if the object currently holds ``expected`` (None: absent).

        Returns whether the write happened. Backends without conditional writes
        document themselves as last-writer-wins (capabilities).
        """

    def modified(self, key: str) -> float | None:
        """When the object was last written (seconds since the epoch), None if the backend cannot say.

        Raises NotFoundError for a missing key. Optional: the default knows no times.
        """
        self.size(key)  # a missing key is still an error
        return None

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` with its size and modification time.

        The default asks per key; backends whose listings carry both override it
        (one request per page instead of two per object). Objects deleted between
        the listing and the question are skipped.
        """
        for key in self.list(prefix):
            try:
                yield ObjectInfo(key, self.size(key), self.modified(key))
            except NotFoundError:
                continue

    def root_exists(self) -> bool:
        """Whether the store itself (folder, bucket) exists: reading a store that does not is a mistake to report.

        The default says yes (stores without a root: memory).
        """
        return True

    def stored_size(self, key: str) -> int | None:
        """The object's size, None when it does not exist."""
        try:
            return self.size(key)
        except NotFoundError:
            return None

    def has(self, key: str, size: int | None = None) -> bool:
        """Whether the object exists, and (given ``size``) has that size: a truncated object is not had."""
        if size is None:
            return self.exists(key)
        return self.stored_size(key) == size

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Write an immutable object unless it exists whole; returns whether it was written.

        Content-addressed objects never change, so skipping an existing one is
        always correct and makes every retry safe (DESIGN invariant 1). "Exists"
        means "exists with this size": an object left truncated (a torn copy, a
        disk that lied) is written again, so a re-push heals it.
        """
        size = self.stored_size(key)
        if size == len(memoryview(data)):
            return False
        if size is not None:
            log.warning("%s: stored with %d bytes instead of %d; writing it again", key, size, len(data))
        self.put(key, data)
        return True

    def writer(self, key: str) -> ObjectWriter:
        """A writer that receives an immutable object in pieces and stores it on :meth:`ObjectWriter.commit`.

        The default spools to a temporary file (memory stays bounded whatever the size) and
        stores it with :meth:`put_file_if_absent`; backends that can write in place override it.
        """
        return SpoolingWriter(self, key)

    def put_file_if_absent(self, key: str, file: IO[bytes], size: int) -> bool:
        """Store ``size`` bytes read from ``file`` (at its start) unless the object exists with that size.

        The default reads the file into memory; backends override it to stream.
        """
        if self.stored_size(key) == size:
            return False
        file.seek(0)
        self.put(key, file.read())
        return True

    def signed_url(self, key: str, expires_s: int) -> str | None:
        """A URL from which anyone may GET the object for ``expires_s`` seconds without credentials.

        None when the backend cannot sign (a local folder, memory): readers then go through the
        server. Object stores that can (S3 presigned URLs) let clients read shard bytes straight
        from the bucket while the server hands out only manifests (docs/operations.md).
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections; the default holds none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class ObjectWriter:
    """An object arriving in pieces (an upload): :meth:`write` each piece, then :meth:`commit` or :meth:`discard`.

    Memory held is at most one piece plus a small buffer, whatever the object's size. A context
    manager: leaving it without a commit discards what was written.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)

    def commit(self) -> bool:
        """Store the object unless it exists with this size; returns whether it was written."""
        raise NotImplementedError

    def discard(self) -> None:
        """Forget what was written (idempotent)."""

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class SpoolingWriter(ObjectWriter):
    """Spools to a temporary file (in memory while small), then hands it to ``store.put_file_if_absent``."""

    def __init__(self, store: Store, key: str) -> None:
        super().__init__(key)
        self._store = store
        # Closed by commit() or discard(): the writer outlives any one with-block.
        self._file: IO[bytes] | None = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=SPOOL_IN_MEMORY_BYTES)

    def write(self, data: bytes | memoryview) -> None:
        assert self._file is not None, "writer already committed or discarded"
        try:
            self._file.write(data)
        except OSError as exc:
            raise StoreError(f"{self.key}: cannot spool the upload to {tempfile.gettempdir()}: "
                             f"{exc.strerror}") from None
        super().write(data)

    def commit(self) -> bool:
        assert self._file is not None, "writer already committed or discarded"
        self._file.flush()
        try:
            return self._store.put_file_if_absent(self.key, self._file, self.size)
        finally:
            self.discard()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def copy_file(source: IO[bytes], target: IO[bytes]) -> None:
    """Copy from the start of ``source`` in bounded pieces."""
    source.seek(0)
    shutil.copyfileobj(source, target, SPOOL_IN_MEMORY_BYTES)
