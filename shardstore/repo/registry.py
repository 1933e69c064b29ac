"""What every registry is: the one protocol that pull, push, load and the CLI talk to.

A registry holds refs, manifests, blobs and shards. Three kinds exist today and
all are reached through :func:`shardstore.registry.open_registry`:

* a :class:`~shardstore.repo.repository.Repository` over a store (a local
  folder, ``memory://``, ``s3://`` or any fsspec URL);
* a :class:`~shardstore.rpc.client.GrpcClient` on a ``grpc[s]://`` server.

Readers never ask which kind they hold. A new way to reach shards plugs in by
implementing :meth:`ModelSource.fetch_shards` — fetch a batch of shards by id,
check each against its id once, hand them over as they arrive — and delegating
the rest to a registry it wraps. The two that exist sit where their order
matters: an HTTP mirror and signed object-store URLs are carriers inside the
gRPC client's ``fetch_shards``, after its disk cache and before its stream
(:mod:`shardstore.rpc.http_fetch`); a group of ranks sharing shards sits above
the source, in the load pipeline (:mod:`shardstore.load.cooperative`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, Self

from shardstore.format.manifest import Manifest
from shardstore.repo.content_index import IndexEntry
from shardstore.repo.refs import Ref

# Shard bytes as a source hands them over: already checked against their id, never copied to be joined.
ShardData = bytes | bytearray | memoryview


class ShardSource(Protocol):
    """Anything that hands over checked shards by id: a registry, or a cache in front of one."""

    def fetch_shards(self, shard_ids: Iterable[str]) -> Iterator[tuple[str, ShardData]]:
        """Yield ``(id, bytes)`` once for each distinct id, each already checked against its id.

        Order is the source's choice (input order where it can, cached shards
        first otherwise). A source keeps only a bounded number of shards ahead
        of its consumer, so memory stays bounded however many ids are asked
        for, and fetches them concurrently where its medium allows. Closing
        the iterator early cancels what is still in flight.
        """
        ...


class ModelSource(ShardSource, Protocol):
    """The read half: what pull, the lazy view and the loader need."""

    def resolve(self, ref: Ref, *, with_manifest: bool = True) -> str:
        """The manifest id ``ref`` points at (:class:`~shardstore.errors.NotFoundError` when none).

        ``with_manifest``: the caller reads that manifest next, so a remote registry brings it in the
        same round trip; False where only the id matters (a snapshot that may already be on disk).
        """
        ...

    def get_manifest(self, manifest_id: str) -> Manifest:
        """The manifest, checked against its id."""
        ...

    def get_blob(self, blob_id: str) -> bytes:
        """A non-tensor file, checked against its id."""
        ...

    @property
    def transferred_bytes(self) -> int:
        """Bytes moved from the registry so far (what a pull reports)."""
        ...

    @property
    def cached_shards(self) -> int:
        """Shards served from a local cache instead of the registry so far (0 where there is no cache)."""
        ...


class PushTarget(Protocol):
    """The write half, in the order a push calls it (DESIGN invariant 2)."""

    @property
    def concurrency(self) -> int:
        """Requests worth keeping in flight at once (an object store waits on round trips)."""
        ...

    def check_writable(self) -> object:
        """Refuse (one line) before anything is written when the store's format is not one this program writes."""
        ...

    def push_lease(self, note: str) -> AbstractContextManager[object]:
        """Held for a whole push, so gc never deletes what it uploads; a server holds its own (a no-op here)."""
        ...

    def missing_shards(self, shard_ids: Iterable[str]) -> list[str]:
        """The ids among ``shard_ids`` the registry lacks (a push uploads only those)."""
        ...

    def find_indexed(self, keys: Sequence[str]) -> dict[str, IndexEntry]:
        """The content-index entries of ``keys`` whose shard is stored at the recorded size: one batched query.

        (``shardstore.repo.content_index``; an entry answers for a whole shard plan.)
        """
        ...

    def put_index(self, entries: Sequence[IndexEntry]) -> int:
        """Write content-index entries for shards already stored; how many were kept."""
        ...

    def put_shard(self, shard_id: str, data: bytes | memoryview) -> bool:
        """Store a shard unless present whole; whether bytes were written."""
        ...

    def put_blob(self, data: bytes) -> tuple[str, bool]:
        """Store a blob unless present: its id, and whether bytes were written."""
        ...

    def put_manifest(self, manifest: Manifest) -> tuple[str, int]:
        """Store a manifest whose shards and blobs are all stored: its id and the bytes written (0: existed)."""
        ...

    def set_ref(self, ref: Ref, manifest_id: str) -> None:
        """Point ``ref`` at a stored manifest, unconditionally (the last step of a push)."""
        ...

    def compare_and_set_ref(self, ref: Ref, manifest_id: str, expected: str | None) -> str:
        """Point ``ref`` at a stored manifest if it points at ``expected`` ("" = must not exist; None = any).

        Returns the manifest id it pointed at before ("" when new); a lost race
        raises :class:`~shardstore.errors.ConflictError`.
        """
        ...


class Registry(ModelSource, PushTarget, Protocol):
    """A whole registry: reads, writes, listing, and a connection to close. A context manager."""

    @property
    def url(self) -> str:
        """Where it is, for messages and reports (a store URL or ``grpc://host:port``)."""
        ...

    def list_refs(self) -> list[tuple[Ref, str]]:
        """Every ``(ref, manifest id)``."""
        ...

    def tag(self, src: Ref, dst: Ref) -> str:
        """Point ``dst`` at the manifest ``src`` points at (created or moved); returns that manifest id."""
        ...

    def delete_ref(self, ref: Ref) -> str:
        """Remove ``ref`` alone (gc frees what no other ref reaches); returns the manifest id it named."""
        ...

    def close(self) -> None:
        """Release connections; a no-op for a store."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
