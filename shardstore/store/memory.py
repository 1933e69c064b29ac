"""An in-process store: a dict behind a lock. ``memory://name`` stores are shared by name within a process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from shardstore.errors import NotFoundError
from shardstore.store.base import ObjectInfo, Store, StoreCapabilities, check_key

_NAMED: dict[str, MemoryStore] = {}
_NAMED_LOCK = threading.Lock()


class MemoryStore(Store):
    capabilities = StoreCapabilities(atomic_compare_and_set=True, shared=False)

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._objects: dict[str, bytes] = {}
        self._modified: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def named(cls, name: str) -> MemoryStore:
        with _NAMED_LOCK:
            store = _NAMED.get(name)
            if store is None:
                store = _NAMED[name] = cls(name)
            return store

    @property
    def url(self) -> str:
        return f"memory://{self.name}"

    def get(self, key: str) -> bytes:
        try:
            return self._objects[check_key(key)]
        except KeyError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.get(key)[start:end]

    def put(self, key: str, data: bytes | memoryview) -> None:
        blob = bytes(data)
        with self._lock:
            self._objects[check_key(key)] = blob
            self._modified[key] = time.time()

    def exists(self, key: str) -> bool:
        return check_key(key) in self._objects

    def size(self, key: str) -> int:
        return len(self.get(key))

    def modified(self, key: str) -> float | None:
        with self._lock:
            try:
                return self._modified[check_key(key)]
            except KeyError:
                raise NotFoundError(f"{key}: not in store {self.url}") from None

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        head = f"{prefix}/" if prefix else ""
        with self._lock:
            infos = [ObjectInfo(k, len(v), self._modified[k]) for k, v in self._objects.items() if k.startswith(head)]
        yield from infos

    def list(self, prefix: str = "") -> Iterator[str]:
        head = f"{prefix}/" if prefix else ""
        with self._lock:
            keys = [k for k in self._objects if k.startswith(head)]
        yield from keys

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)
            self._modified.pop(key, None)

    def compare_and_set(self, key: str, expected: bytes | None, new: bytes) -> bool:
        with self._lock:
            if self._objects.get(check_key(key)) != expected:
                return False
            self._objects[key] = bytes(new)
            self._modified[key] = time.time()
            return True
