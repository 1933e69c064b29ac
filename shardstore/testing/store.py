"""The store conformance suite: every backend, ours or a third party's, passes the same checks.

In zarr-python's ``StoreTests`` shape: subclass :class:`StoreTests` in a test module (name it
``Test...`` so pytest collects it), override the ``store`` fixture to give a fresh, empty store,
and implement the raw accessors, which read and write the backend *without* going through the
store (a file path, a bucket client, a database connection). The checks then hold the store to
what another process, or another implementation, would see::

    class TestMyStore(StoreTests):
        @pytest.fixture
        def store(self, tmp_path):
            store = MyStore(tmp_path / "db")
            yield store
            store.close()

        def get_raw(self, store, key): ...      # raise KeyError when absent
        def set_raw(self, store, key, value): ...
        def delete_raw(self, store, key): ...

Capability attributes say what a backend does not promise (none of them skips a check: each
changes what the check expects).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardstore.errors import InvalidInputError, NotFoundError
from shardstore.store import Store, open_store

BAD_KEYS = ["", "/abs", "a//b", "a/../b", "../x", "a/./b", "a b", "a\\b", "trailing/"]


class StoreTests:
    """Subclass, override :meth:`store`, :meth:`get_raw`, :meth:`set_raw`, :meth:`delete_raw`."""

    # The backend records when each object was written (gc's grace period needs it). When False,
    # ``modified`` must answer None for every existing object, and listings must carry None.
    keeps_modified_times: bool = True
    # Allowed skew, in seconds, between the backend's clock (an object store's) and ours.
    clock_skew_s: float = 2.0

    # -- what a subclass supplies --------------------------------------------------------

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        """A fresh, empty store; close it after the test."""
        raise NotImplementedError(f"{type(self).__name__} must override the `store` fixture")

    def get_raw(self, store: Store, key: str) -> bytes:
        """The object's bytes read directly from the backend, not through ``store``; KeyError when absent."""
        raise NotImplementedError

    def set_raw(self, store: Store, key: str, value: bytes) -> None:
        """Write an object directly into the backend, as another process or implementation would."""
        raise NotImplementedError

    def delete_raw(self, store: Store, key: str) -> None:
        """Delete an object directly in the backend, behind the store's back."""
        raise NotImplementedError

    def reopen(self, store: Store) -> Store:
        """A second store over the same backend. The default goes through the store's URL."""
        return open_store(store.url)

    def _raw_absent(self, store: Store, key: str) -> bool:
        try:
            self.get_raw(store, key)
        except KeyError:
            return True
        return False

    # -- the checks ----------------------------------------------------------------------

    def test_store_is_a_store(self, store: Store) -> None:
        assert isinstance(store, Store)
        assert isinstance(store.url, str) and store.url

    def test_get_reads_what_was_written_behind_its_back(self, store: Store) -> None:
        self.set_raw(store, "shards/ab/raw", b"written raw")
        assert store.get("shards/ab/raw") == b"written raw"
        assert store.exists("shards/ab/raw")
        assert store.size("shards/ab/raw") == len(b"written raw")

    def test_put_writes_what_the_backend_holds(self, store: Store) -> None:
        store.put("shards/ab/abc", b"hello")
        assert self.get_raw(store, "shards/ab/abc") == b"hello"
        assert store.get("shards/ab/abc") == b"hello"
        assert store.exists("shards/ab/abc")
        assert store.size("shards/ab/abc") == 5

    def test_put_accepts_a_memoryview(self, store: Store) -> None:
        data = bytearray(b"0123456789")
        store.put("blobs/view", memoryview(data)[2:6])
        assert self.get_raw(store, "blobs/view") == b"2345"

    def test_missing_key_is_typed(self, store: Store) -> None:
        with pytest.raises(NotFoundError) as info:
            store.get("shards/no/such")
        assert "shards/no/such" in str(info.value)
        assert isinstance(info.value, KeyError)  # leaves subclass the builtin they resemble
        assert not store.exists("shards/no/such")
        with pytest.raises(NotFoundError):
            store.size("shards/no/such")
        with pytest.raises(NotFoundError):
            store.get_range("shards/no/such", 0, 1)

    def test_get_buffer_reads_the_object_and_shows_every_part_once(self, store: Store) -> None:
        # Larger than one read part of the local store (1 MiB), not a multiple of it.
        value = bytes(range(256)) * 10_000 + b"tail"
        self.set_raw(store, "shards/cd/big", value)
        parts: list[bytes] = []
        data = store.get_buffer("shards/cd/big", lambda part: parts.append(bytes(part)))
        assert bytes(data) == value
        assert b"".join(parts) == value
        assert bytes(store.get_buffer("shards/cd/big")) == value
        with pytest.raises(NotFoundError):
            store.get_buffer("shards/no/such")

    def test_get_range(self, store: Store) -> None:
        self.set_raw(store, "blobs/x", bytes(range(100)))
        assert store.get_range("blobs/x", 10, 20) == bytes(range(10, 20))
        assert store.get_range("blobs/x", 95, 200) == bytes(range(95, 100))
        assert store.get_range("blobs/x", 0, 0) == b""

    def test_overwrite_replaces_whole_object(self, store: Store) -> None:
        store.put("refs/m/latest", b"a" * 1000)
        store.put("refs/m/latest", b"b")
        assert store.get("refs/m/latest") == b"b"
        assert self.get_raw(store, "refs/m/latest") == b"b"

    def test_put_if_absent_never_rewrites(self, store: Store) -> None:
        assert store.put_if_absent("shards/aa/aa", b"first") is True
        assert store.put_if_absent("shards/aa/aa", b"other") is False  # same size: a whole object is kept
        assert self.get_raw(store, "shards/aa/aa") == b"first"
        self.set_raw(store, "shards/aa/bb", b"by someone else")
        assert store.put_if_absent("shards/aa/bb", b"by us, not them") is False
        assert store.get("shards/aa/bb") == b"by someone else"

    def test_put_if_absent_heals_an_object_of_the_wrong_size(self, store: Store) -> None:
        """A truncated object (torn copy, a disk that lied) is not "already stored": writing it again heals it."""
        self.set_raw(store, "shards/aa/aa", b"trunc")
        assert store.put_if_absent("shards/aa/aa", b"truncated object, whole") is True
        assert self.get_raw(store, "shards/aa/aa") == b"truncated object, whole"

    def test_writer_streams_an_object_and_commits_it_once(self, store: Store) -> None:
        with store.writer("blobs/bb/bb") as writer:
            for piece in (b"abc", b"def", b"g"):
                writer.write(piece)
            assert not store.exists("blobs/bb/bb")  # nothing visible before the commit
            assert writer.commit() is True
        assert self.get_raw(store, "blobs/bb/bb") == b"abcdefg"
        with store.writer("blobs/bb/bb") as again:
            again.write(b"ABCDEFG")
            assert again.commit() is False  # there whole already
        with store.writer("blobs/cc/cc") as abandoned:
            abandoned.write(b"partial")
        assert not store.exists("blobs/cc/cc") and list(store.list("blobs")) == ["blobs/bb/bb"]

    def test_list_by_prefix(self, store: Store) -> None:
        for key in ("shards/aa/1", "shards/bb/2", "blobs/cc/3", "refs/org/model/v1"):
            self.set_raw(store, key, b"x")
        assert sorted(store.list("shards")) == ["shards/aa/1", "shards/bb/2"]
        assert sorted(store.list("refs")) == ["refs/org/model/v1"]
        assert sorted(store.list("refs/org")) == ["refs/org/model/v1"]
        assert sorted(store.list()) == ["blobs/cc/3", "refs/org/model/v1", "shards/aa/1", "shards/bb/2"]
        assert list(store.list("manifests")) == []
        # A prefix is a folder, not a string prefix: "shard" lists nothing of "shards/".
        assert list(store.list("shard")) == []

    def test_delete_is_idempotent(self, store: Store) -> None:
        store.put("blobs/x", b"1")
        store.delete("blobs/x")
        store.delete("blobs/x")
        assert not store.exists("blobs/x")
        assert self._raw_absent(store, "blobs/x")

    def test_empty_object(self, store: Store) -> None:
        store.put("blobs/empty", b"")
        assert store.get("blobs/empty") == b""
        assert store.size("blobs/empty") == 0
        assert store.exists("blobs/empty")
        assert self.get_raw(store, "blobs/empty") == b""

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_bad_keys_refused(self, store: Store, key: str) -> None:
        with pytest.raises(InvalidInputError):
            store.put(key, b"x")
        with pytest.raises(InvalidInputError):
            store.get(key)

    def test_compare_and_set(self, store: Store) -> None:
        assert store.compare_and_set("refs/m/v1", None, b"one") is True
        assert store.compare_and_set("refs/m/v1", None, b"two") is False
        assert store.compare_and_set("refs/m/v1", b"wrong", b"two") is False
        assert store.compare_and_set("refs/m/v1", b"one", b"two") is True
        assert self.get_raw(store, "refs/m/v1") == b"two"
        self.set_raw(store, "refs/m/v1", b"moved by another writer")
        assert store.compare_and_set("refs/m/v1", b"two", b"three") is False
        assert store.get("refs/m/v1") == b"moved by another writer"

    def test_concurrent_puts_of_same_object(self, store: Store) -> None:
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

    def test_reopened_store_sees_the_same_objects(self, store: Store) -> None:
        store.put("blobs/u", b"url")
        other = self.reopen(store)
        try:
            assert other.get("blobs/u") == b"url"
        finally:
            if other is not store:
                other.close()

    def test_modified_time_and_listing_with_info(self, store: Store) -> None:
        before = time.time()
        store.put("shards/ab/one", b"12345")
        store.put("shards/cd/two", b"")
        store.put("refs/m/v1", b"x")
        infos = {i.key: i for i in store.list_info("shards")}
        assert set(infos) == {"shards/ab/one", "shards/cd/two"}
        assert (infos["shards/ab/one"].size, infos["shards/cd/two"].size) == (5, 0)
        stamped = store.modified("shards/ab/one")
        if self.keeps_modified_times:
            assert stamped is not None and before - self.clock_skew_s <= stamped <= time.time() + self.clock_skew_s
            assert all(i.modified is not None and abs(i.modified - stamped) < 5 for i in infos.values())
        else:
            assert stamped is None and all(i.modified is None for i in infos.values())
        with pytest.raises(NotFoundError):
            store.modified("shards/ab/missing")

    def test_exists_never_trusts_a_listing_made_before_a_delete(self, store: Store) -> None:
        # gc may run in another process: after it deletes, no cache in this one may still say "present",
        # or a push would skip uploading an object its manifest then names.
        store.put("shards/ee/gone", b"data")
        assert list(store.list("shards")) == ["shards/ee/gone"]  # fills any listings cache
        self.delete_raw(store, "shards/ee/gone")
        assert not store.exists("shards/ee/gone")
        with pytest.raises(NotFoundError):
            store.size("shards/ee/gone")
        with pytest.raises(NotFoundError):
            store.get("shards/ee/gone")
        assert list(store.list("shards")) == []

    def test_an_object_replaced_behind_its_back_reads_new(self, store: Store) -> None:
        store.put("refs/m/v1", b"old")
        assert store.get("refs/m/v1") == b"old"
        self.set_raw(store, "refs/m/v1", b"new and longer")
        assert store.get("refs/m/v1") == b"new and longer"
        assert store.size("refs/m/v1") == len(b"new and longer")
