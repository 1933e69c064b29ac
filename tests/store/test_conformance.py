"""One conformance suite that every store backend passes (zarr-python style)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardstore.errors import InvalidInputError, NotFoundError
from shardstore.store import LocalStore, MemoryStore, Store, open_store
from shardstore.store.fsspec_store import FsspecStore
from shardstore.store.s3 import S3Store

StoreFactory = Callable[[Path], Store]

BACKENDS: dict[str, StoreFactory] = {
    "local": lambda tmp: LocalStore(tmp / "local"),
    "memory": lambda tmp: MemoryStore.named(f"conformance-{tmp.name}"),
    "fsspec-file": lambda tmp: FsspecStore(f"file://{tmp / 'fsspec'}"),
}


@pytest.fixture(params=[*sorted(BACKENDS), "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "s3":
        # The real S3 protocol against moto's HTTP server on loopback.
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        backend: Store = open_store(f"s3://{bucket}/prefix", endpoint_url=endpoint)
    else:
        backend = BACKENDS[request.param](tmp_path)
    yield backend
    backend.close()


def test_put_get_roundtrip(store: Store) -> None:
    store.put("shards/ab/abc", b"hello")
    assert store.get("shards/ab/abc") == b"hello"
    assert store.exists("shards/ab/abc")
    assert store.size("shards/ab/abc") == 5


def test_missing_key_is_typed(store: Store) -> None:
    with pytest.raises(NotFoundError) as info:
        store.get("shards/no/such")
    assert "shards/no/such" in str(info.value)
    assert isinstance(info.value, KeyError)  # leaves subclass the builtin they resemble
    assert not store.exists("shards/no/such")
    with pytest.raises(NotFoundError):
        store.size("shards/no/such")


def test_get_range(store: Store) -> None:
    store.put("blobs/x", bytes(range(100)))
    assert store.get_range("blobs/x", 10, 20) == bytes(range(10, 20))
    assert store.get_range("blobs/x", 95, 200) == bytes(range(95, 100))


def test_overwrite_replaces_whole_object(store: Store) -> None:
    store.put("refs/m/latest", b"a" * 1000)
    store.put("refs/m/latest", b"b")
    assert store.get("refs/m/latest") == b"b"


def test_put_if_absent_never_rewrites(store: Store) -> None:
    assert store.put_if_absent("shards/aa/aa", b"first") is True
    assert store.put_if_absent("shards/aa/aa", b"other") is False  # same size: a whole object is kept
    assert store.get("shards/aa/aa") == b"first"


def test_put_if_absent_heals_an_object_of_the_wrong_size(store: Store) -> None:
    """A truncated object (torn copy, a disk that lied) is not "already stored": writing it again heals it."""
    store.put("shards/aa/aa", b"trunc")
    assert store.put_if_absent("shards/aa/aa", b"truncated object, whole") is True
    assert store.get("shards/aa/aa") == b"truncated object, whole"


def test_writer_streams_an_object_and_commits_it_once(store: Store) -> None:
    with store.writer("blobs/bb/bb") as writer:
        for piece in (b"abc", b"def", b"g"):
            writer.write(piece)
        assert not store.exists("blobs/bb/bb")  # nothing visible before the commit
        assert writer.commit() is True
    assert store.get("blobs/bb/bb") == b"abcdefg"
    with store.writer("blobs/bb/bb") as again:
        again.write(b"ABCDEFG")
        assert again.commit() is False  # there whole already
    with store.writer("blobs/cc/cc") as abandoned:
        abandoned.write(b"partial")
    assert not store.exists("blobs/cc/cc") and list(store.list("blobs")) == ["blobs/bb/bb"]


def test_list_by_prefix(store: Store) -> None:
    for key in ("shards/aa/1", "shards/bb/2", "blobs/cc/3", "refs/org/model/v1"):
        store.put(key, b"x")
    assert sorted(store.list("shards")) == ["shards/aa/1", "shards/bb/2"]
    assert sorted(store.list("refs")) == ["refs/org/model/v1"]
    assert sorted(store.list()) == ["blobs/cc/3", "refs/org/model/v1", "shards/aa/1", "shards/bb/2"]
    assert list(store.list("manifests")) == []


def test_delete_is_idempotent(store: Store) -> None:
    store.put("blobs/x", b"1")
    store.delete("blobs/x")
    store.delete("blobs/x")
    assert not store.exists("blobs/x")


def test_empty_object(store: Store) -> None:
    store.put("blobs/empty", b"")
    assert store.get("blobs/empty") == b""
    assert store.size("blobs/empty") == 0


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "../x", "a/./b", "a b", "a\\b"])
def test_bad_keys_refused(store: Store, key: str) -> None:
    with pytest.raises(InvalidInputError):
        store.put(key, b"x")


def test_compare_and_set(store: Store) -> None:
    assert store.compare_and_set("refs/m/v1", None, b"one") is True
    assert store.compare_and_set("refs/m/v1", None, b"two") is False
    assert store.compare_and_set("refs/m/v1", b"wrong", b"two") is False
    assert store.compare_and_set("refs/m/v1", b"one", b"two") is True
    assert store.get("refs/m/v1") == b"two"


def test_concurrent_puts_of_same_object(store: Store) -> None:
    payload = bytes(range(256)) * 4096

    def writer() -> None:
        for _ in range(5):
            store.put_if_absent("shards/cc/same", payload)
            store.put("shards/cc/overwritten", payload)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("shards/cc/same") == payload
    assert store.get("shards/cc/overwritten") == payload


def test_url_round_trip(store: Store) -> None:
    store.put("blobs/u", b"url")
    assert open_store(store.url).get("blobs/u") == b"url"


def test_named_memory_store_is_shared() -> None:
    open_store("memory://shared-test").put("blobs/k", b"v")
    assert open_store("memory://shared-test").get("blobs/k") == b"v"


def test_local_store_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("shards/aa/x", b"data")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["x"]


def test_default_store_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHARDSTORE_STORE", str(tmp_path / "env-store"))
    store = open_store()
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path / "env-store"


def test_modified_time_and_listing_with_info(store: Store) -> None:
    before = time.time()
    store.put("shards/ab/one", b"12345")
    store.put("shards/cd/two", b"")
    store.put("refs/m/v1", b"x")
    # Object stores stamp with their own clock at one-second resolution: allow for both.
    stamped = store.modified("shards/ab/one")
    assert stamped is not None and before - 2 <= stamped <= time.time() + 2
    infos = {i.key: i for i in store.list_info("shards")}
    assert set(infos) == {"shards/ab/one", "shards/cd/two"}
    assert (infos["shards/ab/one"].size, infos["shards/cd/two"].size) == (5, 0)
    assert all(i.modified is not None and abs(i.modified - stamped) < 5 for i in infos.values())
    with pytest.raises(NotFoundError):
        store.modified("shards/ab/missing")


def test_exists_never_trusts_a_listing_made_before_a_delete(store: Store) -> None:
    # gc may run in another process: after it deletes, no cache in this one may still say "present",
    # or a push would skip uploading an object its manifest then names.
    store.put("shards/ee/gone", b"data")
    assert list(store.list("shards")) == ["shards/ee/gone"]  # fills any listings cache
    if isinstance(store, S3Store):  # behind s3fs's back, as another process would
        store.fs.call_s3("delete_object", Bucket=store.bucket, Key=f"{store.root.split('/', 1)[1]}/shards/ee/gone")
    else:
        (store if isinstance(store, MemoryStore) else open_store(store.url)).delete("shards/ee/gone")
    assert not store.exists("shards/ee/gone")
    with pytest.raises(NotFoundError):
        store.size("shards/ee/gone")


def test_local_store_lists_no_lock_or_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.compare_and_set("refs/m/v1", None, b"a")
    (tmp_path / "shards" / "aa").mkdir(parents=True)
    (tmp_path / "shards" / "aa" / ".tmp-deadbeef").write_bytes(b"torn write of a killed writer")
    assert list(store.list("")) == ["refs/m/v1"]
    assert [i.key for i in store.list_info("")] == ["refs/m/v1"]
    stale = list(store.stale_temporaries(time.time() + 1))
    assert [p.name for p in stale] == [".tmp-deadbeef"]
    assert list(store.stale_temporaries(time.time() - 3600)) == []
