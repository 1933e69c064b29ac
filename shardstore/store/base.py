"""The Store interface: a few primitives over keys, in the manner of zarr-python.

Keys are ``/``-separated relative paths (``shards/ab/ab12...``). Every backend
implements the same primitives and passes one shared conformance suite
(``tests/store/test_conformance.py``). A missing key is a typed result:
:class:`~shardstore.errors.NotFoundError`, never a backend-specific accident.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from shardstore.errors import InvalidInputError, NotFoundError

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

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Write an immutable object unless it exists; returns whether it was written.

        Content-addressed objects never change, so skipping an existing one is
        always correct and makes every retry safe (DESIGN invariant 1).
        """
        if self.exists(key):
            return False
        self.put(key, data)
        return True

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections; the default holds none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
