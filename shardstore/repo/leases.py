"""Leases: how pushes in flight and garbage collection keep out of each other's way (DESIGN invariant 6).

A push may skip uploading a shard because the store already has it, and only
later write the manifest that names it. If gc deleted that shard in between
(it was unreachable: its model had been deleted), the new manifest would point
at nothing: the registry garbage-collection race. Content addressing makes
"already have it" cheap, and also makes it a promise someone must keep.

The protocol, restic's locks over a store with no locking primitive (a listing
that is consistent after a write, as local disks and S3 give)::

    push: write leases/push-<uuid>.json  →  wait while a live gc lease exists  →  upload,
          manifest, ref  →  delete its lease
    gc:   write leases/gc-<uuid>.json    →  if a live push lease exists: delete nothing  →
          mark and sweep  →  delete its lease

Each side writes its own lease *before* it looks for the other's, so at least
one of them sees the other: either gc sees the push's lease and deletes
nothing, or the push sees gc's lease and waits until gc is done. A lease
carries its expiry and is renewed by a background thread while its holder
runs, so a holder killed with SIGKILL blocks the other side for at most one
TTL; expired leases are ignored and removed by gc.

A gRPC server holds one write lease for as long as write calls keep coming
(:class:`WriteLease`), since the pushes it serves take no lease of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from shardstore.errors import NotFoundError, ShardstoreError, StoreError
from shardstore.store.base import Store

LEASE_PREFIX = "leases"
# Short, because a holder killed without cleaning up blocks the other side this long;
# renewed at a third of it, so a live holder's lease never lapses.
DEFAULT_TTL_S = 300.0
# A push waits this long at most for a gc to finish before giving up.
DEFAULT_GC_WAIT_S = 3600.0
_POLL_S = 0.5

LeaseKind = Literal["push", "gc"]


@dataclass(frozen=True)
class LeaseInfo:
    key: str
    kind: str
    created: float
    expires: float
    holder: str  # host:pid and what it is doing, for people reading `gc` output

    def live(self, now: float | None = None) -> bool:
        return self.expires > (time.time() if now is None else now)


def _lease_document(kind: LeaseKind, created: float, expires: float, note: str) -> bytes:
    holder = f"{socket.gethostname()}:{os.getpid()} {note}".strip()
    return json.dumps({"kind": kind, "created": created, "expires": expires, "holder": holder}).encode()


def _parse(key: str, data: bytes) -> LeaseInfo | None:
    try:
        doc = json.loads(data)
        return LeaseInfo(key, str(doc["kind"]), float(doc["created"]), float(doc["expires"]), str(doc["holder"]))
    except (ValueError, KeyError, TypeError):
        return None  # a torn or foreign file: treated like an expired lease


def list_leases(store: Store) -> list[LeaseInfo]:
    """Every lease in the store, live or not; unreadable ones come back as expired."""
    found: list[LeaseInfo] = []
    for key in store.list(LEASE_PREFIX):
        try:
            data = store.get(key)
        except NotFoundError:
            continue  # released between the listing and the read
        found.append(_parse(key, data) or LeaseInfo(key, "unknown", 0.0, 0.0, "unreadable"))
    return found


def live_leases(store: Store, kind: LeaseKind, *, exclude: str = "") -> list[LeaseInfo]:
    now = time.time()
    return [lease for lease in list_leases(store) if lease.kind == kind and lease.live(now) and lease.key != exclude]


def remove_expired(store: Store) -> int:
    """Delete leases whose holders stopped renewing them (killed); returns how many."""
    now = time.time()
    expired = [lease for lease in list_leases(store) if not lease.live(now)]
    for lease in expired:
        store.delete(lease.key)
    return len(expired)


class Lease:
    """One lease in a store, renewed in the background until released. A context manager."""

    def __init__(self, store: Store, kind: LeaseKind, *, ttl: float = DEFAULT_TTL_S, note: str = "") -> None:
        self.store = store
        self.kind = kind
        self.ttl = ttl
        self.note = note
        self.key = f"{LEASE_PREFIX}/{kind}-{uuid.uuid4().hex}.json"
        self.created = time.time()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._held_until = 0.0  # the expiry of the last lease actually written
        self.lapsed_at: float | None = None  # when the written lease ran out while still held

    def _write(self) -> None:
        expires = time.time() + self.ttl
        self.store.put(self.key, _lease_document(self.kind, self.created, expires, self.note))
        self._held_until = expires  # held only once written

    def _check_lapse(self) -> None:
        now = time.time()
        if self.lapsed_at is None and now >= self._held_until:
            self.lapsed_at = self._held_until

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self._check_lapse()
            with contextlib.suppress(ShardstoreError):
                self._write()  # a failed renewal is retried at the next tick, well before expiry

    def acquire(self) -> Lease:
        self._write()
        self._renewer = threading.Thread(target=self._renew_until_released, name=f"shardstore-{self.kind}-lease",
                                         daemon=True)
        self._renewer.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        with contextlib.suppress(ShardstoreError):
            self.store.delete(self.key)  # if this fails the lease simply expires

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._check_lapse()
        self.release()
        if exc_type is None and self.lapsed_at is not None:
            # Renewals failed until the lease ran out: a gc in that window saw no push and may have
            # deleted objects this push found stored and skipped. Say so rather than report success.
            raise StoreError(f"{self.kind} lease {self.key} could not be renewed and lapsed for a while "
                             f"(store {self.store.url}); a gc may have removed objects it relied on: run "
                             "`shardstore verify` and push again")


def wait_for_gc(store: Store, *, timeout: float = DEFAULT_GC_WAIT_S, sleep: Callable[[float], None] = time.sleep
                ) -> None:
    """Block while a live gc lease exists (call after writing one's own push lease)."""
    deadline = time.monotonic() + timeout
    while running := live_leases(store, "gc"):
        if time.monotonic() >= deadline:
            raise StoreError(f"garbage collection in {store.url} still running after {timeout:.0f} s "
                             f"({running[0].holder}); try again later")
        sleep(_POLL_S)


@contextlib.contextmanager
def push_lease(store: Store, note: str = "", *, ttl: float = DEFAULT_TTL_S) -> Iterator[Lease | None]:
    """Hold a push lease on ``store`` for the whole push (a server holds its own for the pushes it serves)."""
    with Lease(store, "push", ttl=ttl, note=note) as lease:
        wait_for_gc(store)
        yield lease


class WriteLease:
    """A push lease a server holds while write calls keep arriving, released after ``ttl`` of quiet.

    :meth:`hold` is called at the start of every write call; it costs a store
    write only when the lease is missing or half spent.
    """

    def __init__(self, store: Store, *, ttl: float = DEFAULT_TTL_S, note: str = "server") -> None:
        self.store = store
        self.ttl = ttl
        self.note = note
        self.key = f"{LEASE_PREFIX}/push-{uuid.uuid4().hex}.json"
        self._expires = 0.0
        self._created = 0.0
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            now = time.time()
            if self._expires - now > self.ttl / 2:
                return
            lapsed = self._expires <= now
            created = now if lapsed else self._created
            expires = now + self.ttl
            # Believed held only once written: a failed write leaves the lease lapsed, so the next
            # call tries again instead of trusting a lease that gc cannot see.
            self.store.put(self.key, _lease_document("push", created, expires, self.note))
            self._created, self._expires = created, expires
            if lapsed:
                # A gc may have started while we held nothing: let it finish before any write.
                wait_for_gc(self.store)

    def release(self) -> None:
        with self._lock:
            self._expires = 0.0
            with contextlib.suppress(ShardstoreError):
                self.store.delete(self.key)
