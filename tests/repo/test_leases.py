"""Leases under the faults that let gc delete a push in flight: a failed lease write, short TTLs, gc racing a server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from repo.test_verify_gc import age_everything, manifest_of
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model

import shardstore
from shardstore.errors import StoreError
from shardstore.repo.gc import collect
from shardstore.repo.leases import Lease, WriteLease, list_leases, live_leases
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository, blob_key, manifest_key, shard_key
from shardstore.store import LocalStore


class FailingLeaseDisk(LocalStore):
    """A local store whose disk refuses lease writes while ``failing`` is set (a full or read-only volume).

    A fake: a disk that fails one write and not the next cannot be produced otherwise in a test.
    """

    failing = False

    def put(self, key: str, data: bytes | memoryview) -> None:
        if self.failing and key.startswith("leases/"):
            raise StoreError(f"{key}: cannot write to {self.url}: No space left on device")
        super().put(key, data)


def _push_in_flight(tmp_path: Path, store: LocalStore) -> list[str]:
    """Every object of a push whose ref is not written yet (old enough for gc to take), as store keys."""
    model = write_small_model(tmp_path / "m")
    shardstore.push(model, "m:v1", store=store, chunk_bytes=SMALL_CHUNK)
    manifest_id, manifest = manifest_of(store, "m:v1")
    store.delete(parse_ref("m:v1").key)
    age_everything(store)
    blobs = [f.header for f in manifest.files] + [b.id for b in manifest.blobs.values()]
    return ([manifest_key(manifest_id)] + [shard_key(s) for s in manifest.shards]
            + [blob_key(b) for b in blobs])


def test_a_lease_that_failed_to_write_is_not_believed_held(tmp_path: Path) -> None:
    store = FailingLeaseDisk(tmp_path / "store")
    objects = _push_in_flight(tmp_path, store)
    lease = WriteLease(store, note="test server")
    store.failing = True
    with pytest.raises(StoreError, match=r"leases/push-.*No space left"):
        lease.hold()
    store.failing = False
    lease.hold()  # the write call that comes next: it must write the lease, not trust the failed one
    assert [held.kind for held in live_leases(store, "push")] == ["push"]
    report = collect(Repository(store), grace=0)
    assert report.pushes_in_flight == 1 and report.deleted == 0
    assert all(store.exists(key) for key in objects)
    lease.release()
    assert collect(Repository(store), grace=0).deleted == len(set(objects))


def test_a_lease_is_renewed_through_a_short_ttl(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    ttl = 0.6
    with Lease(store, "push", ttl=ttl, note="slow push") as lease:
        first = live_leases(store, "push")[0].expires
        time.sleep(4 * ttl)  # without renewals it would have expired three times over
        held = live_leases(store, "push")
        assert [h.key for h in held] == [lease.key]
        assert held[0].expires > first + ttl
    assert list_leases(store) == []


def test_a_server_reacquiring_its_lease_waits_for_a_running_gc(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    server_lease = WriteLease(store, ttl=1.5, note="server")
    server_lease.hold()
    time.sleep(1.6)  # the server's lease lapsed in a quiet moment
    gc_lease = Lease(store, "gc", note="gc").acquire()
    reacquired = threading.Event()
    writer = threading.Thread(target=lambda: (server_lease.hold(), reacquired.set()), daemon=True)
    writer.start()
    try:
        # Its lease is written first (so this gc, were it still marking, would now see a push) and then it waits.
        assert not reacquired.wait(0.5), "a server wrote while gc was running"
        assert live_leases(store, "push")
    finally:
        gc_lease.release()
    assert reacquired.wait(10)
    writer.join(timeout=10)
    server_lease.release()


def test_gc_keeps_the_objects_of_a_recent_manifest_whose_ref_is_not_written_yet(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    objects = _push_in_flight(tmp_path, store)
    now = time.time()
    age_everything(store, now)  # written just now, by a writer that takes no lease (an older client, a script)
    report = collect(Repository(store))  # default grace: 1 h
    assert report.deleted == 0 and all(store.exists(key) for key in objects)
    age_everything(store)
    assert collect(Repository(store)).deleted == len(set(objects))


def test_a_push_whose_lease_lapsed_because_renewals_failed_says_so(tmp_path: Path) -> None:
    store = FailingLeaseDisk(tmp_path / "store")
    ttl = 0.6
    with pytest.raises(StoreError, match="could not be renewed and lapsed"), \
            Lease(store, "push", ttl=ttl, note="push m:v1"):
        store.failing = True  # the renewals fail...
        time.sleep(2 * ttl)  # ...past the written lease's expiry: a gc now would see no push
        store.failing = False
    held = Lease(store, "push", ttl=ttl)
    with held:  # renewals that work: no complaint
        time.sleep(2 * ttl)
    assert held.lapsed_at is None and list_leases(store) == []
