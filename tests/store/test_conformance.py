"""Every built-in store backend passes the shipped conformance suite (``shardstore.testing.store``).

Each class supplies a fresh store and raw access to its backend that bypasses the store: the
files under a folder, the memory store's dict, a second fsspec filesystem, a boto3 client. The
shared checks know nothing of backends; what only one backend does is tested in its own class.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from shardstore.store import LocalStore, MemoryStore, Store, open_store
from shardstore.store.fsspec_store import FsspecStore
from shardstore.store.s3 import S3Store
from shardstore.testing.store import StoreTests


class TestLocalStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        yield LocalStore(tmp_path / "local")

    def _file(self, store: Store, key: str) -> Path:
        assert isinstance(store, LocalStore)
        return store.root / key

    def get_raw(self, store: Store, key: str) -> bytes:
        try:
            return self._file(store, key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def set_raw(self, store: Store, key: str, value: bytes) -> None:
        path = self._file(store, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value)

    def delete_raw(self, store: Store, key: str) -> None:
        self._file(store, key).unlink()

    def test_leaves_no_temp_files(self, tmp_path: Path) -> None:
        store = LocalStore(tmp_path)
        store.put("shards/aa/x", b"data")
        assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["x"]

    def test_lists_no_lock_or_temporary_files(self, tmp_path: Path) -> None:
        store = LocalStore(tmp_path)
        assert store.compare_and_set("refs/m/v1", None, b"a")
        (tmp_path / "shards" / "aa").mkdir(parents=True)
        (tmp_path / "shards" / "aa" / ".tmp-deadbeef").write_bytes(b"torn write of a killed writer")
        assert list(store.list("")) == ["refs/m/v1"]
        assert [i.key for i in store.list_info("")] == ["refs/m/v1"]
        stale = list(store.stale_temporaries(time.time() + 1))
        assert [p.name for p in stale] == [".tmp-deadbeef"]
        assert list(store.stale_temporaries(time.time() - 3600)) == []

    def test_default_store_from_environment(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv("SHARDSTORE_STORE", str(tmp_path / "env-store"))
        store = open_store()
        assert isinstance(store, LocalStore)
        assert store.root == tmp_path / "env-store"


class TestMemoryStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        yield MemoryStore.named(f"conformance-{tmp_path.name}")

    # The backend is the store's own dict: "raw" is that dict, under the store's lock, as another
    # thread of the process holding the same named store would change it.
    def get_raw(self, store: Store, key: str) -> bytes:
        assert isinstance(store, MemoryStore)
        return store._objects[key]

    def set_raw(self, store: Store, key: str, value: bytes) -> None:
        assert isinstance(store, MemoryStore)
        with store._lock:
            store._objects[key] = value
            store._modified[key] = time.time()

    def delete_raw(self, store: Store, key: str) -> None:
        assert isinstance(store, MemoryStore)
        with store._lock:
            del store._objects[key]
            del store._modified[key]

    def test_named_memory_store_is_shared(self) -> None:
        open_store("memory://shared-test").put("blobs/k", b"v")
        assert open_store("memory://shared-test").get("blobs/k") == b"v"


class TestFsspecFileStore(StoreTests):
    """The generic fsspec path, over fsspec's local filesystem, with a second filesystem as the raw side."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        yield FsspecStore(f"file://{tmp_path / 'fsspec'}")

    def _raw(self, store: Store, key: str) -> tuple[Any, str]:
        assert isinstance(store, FsspecStore)
        return fsspec.filesystem("file", skip_instance_cache=True), f"{store.root}/{key}"

    def get_raw(self, store: Store, key: str) -> bytes:
        fs, path = self._raw(store, key)
        try:
            return bytes(fs.cat_file(path))
        except FileNotFoundError:
            raise KeyError(key) from None

    def set_raw(self, store: Store, key: str, value: bytes) -> None:
        fs, path = self._raw(store, key)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, value)

    def delete_raw(self, store: Store, key: str) -> None:
        fs, path = self._raw(store, key)
        fs.rm_file(path)


class TestS3Store(StoreTests):
    """The real S3 protocol against moto's HTTP server on loopback; raw access through boto3."""

    @pytest.fixture
    def store(self, s3_endpoint: str, s3_bucket: str) -> Iterator[Store]:
        store = open_store(f"s3://{s3_bucket}/prefix", endpoint_url=s3_endpoint)
        self._client = __import__("boto3").client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        yield store
        store.close()

    def _where(self, store: Store, key: str) -> dict[str, str]:
        assert isinstance(store, S3Store)
        return {"Bucket": store.bucket, "Key": f"{store.root.split('/', 1)[1]}/{key}"}

    def get_raw(self, store: Store, key: str) -> bytes:
        try:
            return bytes(self._client.get_object(**self._where(store, key))["Body"].read())
        except self._client.exceptions.NoSuchKey:
            raise KeyError(key) from None

    def set_raw(self, store: Store, key: str, value: bytes) -> None:
        self._client.put_object(Body=value, **self._where(store, key))

    def delete_raw(self, store: Store, key: str) -> None:
        self._client.delete_object(**self._where(store, key))
