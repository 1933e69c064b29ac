"""The default store: a directory on a local filesystem.

Writes go to a temporary file in the destination folder, are fsynced, then
renamed over the final name, so a crash leaves either no object or a whole one
(never a torn write that a later ``exists`` would trust).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from shardstore.buffers import READ_BUFFERS
from shardstore.errors import NotFoundError, StoreError
from shardstore.store.base import ObjectInfo, ObjectWriter, Store, check_key, copy_file

_TMP_PREFIX = ".tmp-"
# Bulk reads go in parts this size: small enough to still be in a core's L2 cache when hashed.
_READ_PART = 1 << 20
_LOCK_SUFFIX = ".lock"


def _lock_file(name: str) -> str:
    return f".{name}{_LOCK_SUFFIX}"


def _is_lock_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(_LOCK_SUFFIX)


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def _reading(self, key: str) -> Iterator[None]:
        """A missing object is NotFoundError, any other OS error one line naming the key."""
        try:
            yield
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None
        except OSError as exc:
            raise StoreError(f"{key}: cannot read from {self.url}: {exc.strerror}") from None

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with self._reading(key):
            return path.read_bytes()

    def get_buffer(self, key: str, see: Callable[[memoryview], object] | None = None) -> bytes | memoryview:
        # Read into a pooled buffer (no fresh pages to fault in) a part at a time, each part
        # handed to ``see`` while it is still in the CPU's cache.
        path = self._path(key)
        with self._reading(key), path.open("rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            view = READ_BUFFERS.take(size)
            filled = 0
            while filled < size:
                got = handle.readinto(view[filled : filled + _READ_PART])
                if not got:  # shrank under us: what was read is all there is (the id check says so)
                    view = view[:filled]
                    break
                if see is not None:
                    see(view[filled : filled + got])
                filled += got
            return view

    def get_range(self, key: str, start: int, end: int) -> bytes:
        path = self._path(key)
        try:
            with path.open("rb") as handle:
                handle.seek(start)
                return handle.read(max(0, end - start))
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                with tmp.open("wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        except OSError as exc:
            raise StoreError(f"{key}: cannot write to {self.url}: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def root_exists(self) -> bool:
        return self.root.is_dir()

    def writer(self, key: str) -> ObjectWriter:
        return _LocalWriter(self, key, self._path(key))

    def put_file_if_absent(self, key: str, file: IO[bytes], size: int) -> bool:
        with self.writer(key) as writer:
            assert isinstance(writer, _LocalWriter)
            writer.copy_from(file, size)
            return writer.commit()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None

    def modified(self, key: str) -> float | None:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                # Temporary files of writes in flight (or of writers killed mid-write) and
                # compare-and-set lock files are not objects.
                if not (name.startswith(_TMP_PREFIX) or _is_lock_file(name)):
                    yield (rel / name).as_posix(), Path(dirpath) / name

    def list(self, prefix: str = "") -> Iterator[str]:
        for key, _path in self._walk(prefix):
            yield key

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for key, path in self._walk(prefix):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                yield ObjectInfo(key, stat.st_size, stat.st_mtime)

    def stale_temporaries(self, older_than: float) -> Iterator[Path]:
        """Temporary files of writes that never finished (a writer killed mid-write), older than a time."""
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    path = Path(dirpath) / name
                    with contextlib.suppress(FileNotFoundError):
                        if path.stat().st_mtime < older_than:
                            yield path

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def compare_and_set(self, key: str, expected: bytes | None, new: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # An exclusive flock on a sidecar file serialises writers of this key
        # across processes; the write itself stays atomic through put().
        lock_path = path.parent / _lock_file(path.name)
        with lock_path.open("a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current: bytes | None = path.read_bytes()
            except FileNotFoundError:
                current = None
            except OSError as exc:
                if exc.errno != errno.EISDIR:
                    raise
                raise StoreError(f"{key}: is a folder in {self.url}") from None
            if current != expected:
                return False
            self.put(key, new)
            return True


class _LocalWriter(ObjectWriter):
    """Writes into a temporary file next to the object (never listed), renamed over it on commit."""

    def __init__(self, store: LocalStore, key: str, path: Path) -> None:
        super().__init__(key)
        self._store = store
        self._path = path
        self._tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle: IO[bytes] | None = self._tmp.open("wb")
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> StoreError:
        return StoreError(f"{self.key}: cannot write to {self._store.url}: {exc.strerror}")

    def write(self, data: bytes | memoryview) -> None:
        assert self._handle is not None, "writer already committed or discarded"
        try:
            self._handle.write(data)
        except OSError as exc:  # a full disk names the object
            raise self._failed(exc) from None
        super().write(data)

    def copy_from(self, file: IO[bytes], size: int) -> None:
        assert self._handle is not None
        try:
            copy_file(file, self._handle)
        except OSError as exc:
            raise self._failed(exc) from None
        self.size = size

    def commit(self) -> bool:
        assert self._handle is not None, "writer already committed or discarded"
        try:
            if self._store.stored_size(self.key) == self.size:
                return False
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
            os.replace(self._tmp, self._path)
            return True
        except OSError as exc:
            raise self._failed(exc) from None
        finally:
            self.discard()

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()
