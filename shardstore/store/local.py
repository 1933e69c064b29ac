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
from collections.abc import Iterator
from pathlib import Path

from shardstore.errors import NotFoundError, StoreError
from shardstore.store.base import Store, check_key

_TMP_PREFIX = ".tmp-"


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None
        except OSError as exc:
            raise StoreError(f"{key}: cannot read from {self.url}: {exc.strerror}") from None

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

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if not name.startswith(_TMP_PREFIX):
                    yield (rel / name).as_posix()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def compare_and_set(self, key: str, expected: bytes | None, new: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # An exclusive flock on a sidecar file serialises writers of this key
        # across processes; the write itself stays atomic through put().
        lock_path = path.parent / f".{path.name}.lock"
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
