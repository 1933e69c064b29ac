"""Any fsspec filesystem as a store (``s3://bucket/prefix``, ``gcs://``, ``abfs://``...).

Object stores write whole objects atomically on their own, so ``put`` is one
``pipe``. Refs are compare-and-set only where the backend offers conditional
writes; elsewhere the capability flag says last-writer-wins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import fsspec

from shardstore.errors import NotFoundError, StoreError
from shardstore.store.base import ObjectInfo, Store, StoreCapabilities, check_key

# Where fsspec backends put an object's modification time, in the order we trust them.
_MTIME_FIELDS = ("LastModified", "mtime", "last_modified", "updated", "modified", "created")


def modified_time(info: Mapping[str, Any]) -> float | None:
    """Seconds since the epoch from an fsspec ``info`` dict, whatever the backend calls the field."""
    for name in _MTIME_FIELDS:
        value = info.get(name)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


class FsspecStore(Store):
    capabilities = StoreCapabilities(atomic_compare_and_set=False, shared=True)

    def __init__(self, url: str, **storage_options: Any) -> None:
        self._url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self._url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open store {url}: {exc}") from None
        self.root = self.root.rstrip("/")

    @property
    def url(self) -> str:
        return self._url

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def get(self, key: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None
        except OSError as exc:
            raise StoreError(f"{key}: cannot read from {self.url}: {exc}") from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            # An empty range is no HTTP range at all ("bytes=0--1"), which S3 ignores, sending the whole
            # object: answer it here, after checking the object exists.
            self.size(key)
            return b""
        try:
            return bytes(self.fs.cat_file(self._path(key), start=start, end=end))
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None

    def signed_url(self, key: str, expires_s: int) -> str | None:
        # fsspec's sign() is implemented by the object-store backends (s3fs, gcsfs, adlfs) and
        # raises NotImplementedError elsewhere; either way no request leaves the process.
        try:
            return str(self.fs.sign(self._path(key), expiration=expires_s))
        except NotImplementedError:
            return None

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        try:
            try:
                self.fs.pipe_file(path, bytes(data))
            except FileNotFoundError:
                # Filesystems with real folders (local, sftp) need the parent first;
                # object stores never get here.
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.pipe_file(path, bytes(data))
        except OSError as exc:
            raise StoreError(f"{key}: cannot write to {self.url}: {exc}") from None

    def root_exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.root))
        except OSError:
            return False

    def exists(self, key: str) -> bool:
        try:
            return bool(self._info(key).get("type", "file") == "file")
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        try:
            return int(self._info(key)["size"])
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None

    def _info(self, key: str) -> dict[str, Any]:
        """The backend's metadata of one object, always asked afresh (never from a listings cache)."""
        # refresh: a listing cached by this process must never make a deleted object
        # look present (a push would then skip uploading it; see gc).
        return dict(self.fs.info(self._path(key), refresh=True))

    def modified(self, key: str) -> float | None:
        try:
            return modified_time(self._info(key))
        except FileNotFoundError:
            raise NotFoundError(f"{key}: not in store {self.url}") from None

    def _find(self, prefix: str) -> dict[str, dict[str, Any]]:
        base = self._path(prefix) if prefix else self.root
        # Always a fresh listing: another process (gc, a push) may have changed the store since
        # this filesystem object last listed it, and a stale listing would resurrect deleted objects.
        self.fs.invalidate_cache(base)
        try:
            found: dict[str, dict[str, Any]] = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        strip = len(self.root) + 1
        return {(path[strip:] if path.startswith(self.root + "/") else path): info for path, info in found.items()}

    def list(self, prefix: str = "") -> Iterator[str]:
        yield from self._find(prefix)

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for key, info in self._find(prefix).items():
            yield ObjectInfo(key, int(info.get("size") or 0), modified_time(info))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def compare_and_set(self, key: str, expected: bytes | None, new: bytes) -> bool:
        # Without conditional writes this is read-compare-write: a concurrent
        # writer between the read and the write wins (documented in docs/design.md).
        try:
            current: bytes | None = self.get(key)
        except NotFoundError:
            current = None
        if current != expected:
            return False
        self.put(key, new)
        return True
