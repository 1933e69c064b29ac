"""A repository: the store layout of DESIGN.md over any :class:`Store`, with every read verified.

    shards/<id[:2]>/<id>     immutable, written once
    blobs/<id[:2]>/<id>      non-tensor files, immutable
    manifests/<id>.json      immutable
    refs/<name>/@<tag>       mutable: the manifest id (stores without ``tag-keys``: refs/<name>/<tag>)
    leases/<kind>-<uuid>.json  mutable: pushes and gc in flight (``shardstore.repo.leases``)
    index/<key[:2]>/<key>    mutable cache: a shard plan's inputs -> its shard (``repo.content_index``)
    config                   the store's format version and features (``shardstore.format.store_config``)

Every read first checks the store's ``config`` (once per repository), every write
also its write features, and the first write into a store without one writes it.

:class:`Repository` is the :class:`~shardstore.repo.registry.Registry` of a
store; the gRPC server serves one, and every write check (a manifest names only
stored objects, a ref names only a stored manifest) lives here, once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Self

from shardstore.errors import (
    ConflictError,
    FormatError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ShardstoreError,
    StoreMissingError,
)
from shardstore.format.digest import IdHasher, check_object_id, digest, matches
from shardstore.format.manifest import Manifest, parse_manifest
from shardstore.format.shard import StreamHeader, parse_shard_head, read_stream_headers, shard_head_length
from shardstore.format.store_config import (
    CONFIG_KEY,
    TAG_KEYS,
    StoreConfig,
    legacy_store_config,
    new_store_config,
    parse_store_config,
)
from shardstore.repo.content_index import IndexEntry, index_key
from shardstore.repo.leases import push_lease
from shardstore.repo.pool import default_threads, ordered_map
from shardstore.repo.refs import Ref, parse_ref, ref_from_key
from shardstore.repo.registry import ModelSource as ModelSource  # also importable from here, as it used to be
from shardstore.repo.registry import ShardData
from shardstore.store.base import Store

# A not-found error lists at most this many of the name's tags.
_TAGS_SHOWN = 20
# One range read fetches the header of a shard of up to ~200 streams; longer headers take a second.
_HEAD_READ_BYTES = 64 << 10


def shard_key(shard_id: str) -> str:
    return f"shards/{shard_id[:2]}/{shard_id}"


def blob_key(blob_id: str) -> str:
    return f"blobs/{blob_id[:2]}/{blob_id}"


def manifest_key(manifest_id: str) -> str:
    return f"manifests/{manifest_id}.json"


def _mismatch(kind: str, object_id: str) -> IntegrityError:
    """What a read says of an object whose bytes do not hash to its id, however it was read."""
    return IntegrityError(f"{kind} {object_id}: content does not match its id (corrupt or truncated)")


class Repository:
    """Reads and writes the objects of one store, in the order the invariants require."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._transferred = 0
        self._lock = threading.Lock()
        self._config: StoreConfig | None = None
        self._writable = False

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def concurrency(self) -> int:
        return self.store.concurrency

    def push_lease(self, note: str) -> AbstractContextManager[object]:
        return push_lease(self.store, note)

    @property
    def cached_shards(self) -> int:
        return 0  # a store is read directly: there is no cache in front of it

    def close(self) -> None:
        pass  # stores hold no connection that outlives a call

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Repository({self.store.url!r})"

    def _count(self, size: int) -> None:
        with self._lock:
            self._transferred += size

    @property
    def transferred_bytes(self) -> int:
        return self._transferred

    # -- the store's format -----------------------------------------------------

    def _read_config(self, must_exist: bool) -> StoreConfig:
        try:
            data = self.store.get(CONFIG_KEY)
        except NotFoundError:
            # No config: a store made before config existed, a new one, or none at all. Reading a
            # store that does not exist (a typo, a missing bucket) must not look like an empty one.
            if must_exist and not self.store.root_exists():
                raise StoreMissingError(f"store {self.store.url} does not exist (check the path or bucket; "
                                        "a first push creates a local store)") from None
            return legacy_store_config()  # made before config existed: version 1, no features
        return parse_store_config(data, self.store.url)

    def check_readable(self, *, must_exist: bool = True) -> StoreConfig:
        """The store's config, once checked that this program can read the store (one request, then cached).

        Raises :class:`~shardstore.errors.UnsupportedFormatError` for a newer version or an unknown read feature,
        and :class:`StoreMissingError` when the store itself does not exist (unless ``must_exist`` is false:
        a first push, or a server that will receive one).
        """
        config = self._config
        if config is None:
            config = self._read_config(must_exist)
            config.check_readable(self.store.url)
            self._config = config
        return config

    def check_writable(self) -> StoreConfig:
        """Like :meth:`check_readable`, also for writing; a store without a config gets one here (first push)."""
        if self._writable and self._config is not None:
            return self._config
        with self._lock:
            config = self.check_readable(must_exist=False)
            config.check_writable(self.store.url)
            if config.legacy:
                fresh = new_store_config()
                # Canonical bytes, so two first pushes racing write the same object; if another
                # program's config got there first, that one is what counts: check it again.
                if not self.store.put_if_absent(CONFIG_KEY, fresh.to_bytes()):
                    self._config = None
                    config = self.check_readable(must_exist=False)
                    config.check_writable(self.store.url)
                else:
                    config = self._config = fresh
            self._writable = True
            return config

    # -- reads ------------------------------------------------------------------

    def _ref_key(self, ref: Ref) -> str:
        """Where this store writes ``ref``: the ``@`` layout in stores whose config has ``tag-keys``.

        Stores made before it keep the older layout, which the programs that wrote them can read.
        """
        return ref.key if TAG_KEYS in self.check_readable(must_exist=False).read_features else ref.legacy_key

    def _read_ref(self, ref: Ref) -> bytes:
        """The ref's bytes: its key, else its key in the layout of older stores; NotFoundError when neither."""
        try:
            return self.store.get(ref.key)
        except NotFoundError:
            return self.store.get(ref.legacy_key)

    def resolve(self, ref: Ref, *, with_manifest: bool = True) -> str:
        # with_manifest saves a round trip to a server; reading the manifest from a store is no dearer later.
        self.check_readable()
        try:
            value = self._read_ref(ref).decode("ascii", "replace").strip()
        except NotFoundError:
            raise self._no_such_ref(ref) from None
        return check_object_id(value, f"manifest id in ref {ref}")

    def tags(self, name: str) -> list[str]:
        """The tags that exist for model ``name``, sorted (one LIST, no reads)."""
        self.check_readable()
        found = (ref_from_key(key) for key in self.store.list("refs"))
        return sorted({ref.tag for ref in found if ref is not None and ref.name == name})

    def _no_such_ref(self, ref: Ref) -> NotFoundError:
        """A not-found error that says what does exist: the user's next move is usually one of those tags."""
        try:
            tags = self.tags(ref.name)
        except ShardstoreError:
            tags = []  # the listing is a courtesy: never let it hide the real error
        where = f"in {self.store.url}"
        if not tags:
            return NotFoundError(f"{ref}: no such model {where} (no tags of {ref.name!r})")
        shown = ", ".join(tags[:_TAGS_SHOWN]) + (f" and {len(tags) - _TAGS_SHOWN} more" if len(tags) > _TAGS_SHOWN
                                                  else "")
        return NotFoundError(f"{ref}: no such model {where}; tags of {ref.name!r}: {shown}")

    def get_manifest(self, manifest_id: str) -> Manifest:
        check_object_id(manifest_id, "manifest id")
        self.check_readable()
        data = self.store.get(manifest_key(manifest_id))
        self._count(len(data))
        return parse_manifest(data, manifest_id)

    def get_manifest_bytes(self, manifest_id: str) -> bytes:
        """The stored manifest's bytes, checked against its id (what a server sends)."""
        return self._get_verified(manifest_key(check_object_id(manifest_id, "manifest id")), manifest_id, "manifest")

    def _get_verified(self, key: str, object_id: str, kind: str) -> bytes:
        self.check_readable()
        data = self.store.get(key)
        self._count(len(data))
        if not matches(data, object_id):
            raise _mismatch(kind, object_id)
        return data

    def get_blob(self, blob_id: str) -> bytes:
        return self._get_verified(blob_key(check_object_id(blob_id, "blob id")), blob_id, "blob")

    def get_shard_head(self, shard_id: str, size: int) -> dict[str, StreamHeader]:
        """The stream headers of a shard of ``size`` bytes (the manifest's figure), read with range reads only.

        Unverified against the shard id (that needs every byte): for describing a shard, never for data.
        """
        key = shard_key(check_object_id(shard_id, "shard id"))
        self.check_readable()
        head = self.store.get_range(key, 0, min(size, _HEAD_READ_BYTES))
        length = shard_head_length(head, shard_id, size)
        if length > len(head):  # a shard of many streams: its header goes past the first read
            head += self.store.get_range(key, len(head), length)
        self._count(len(head))
        return parse_shard_head(head, shard_id, size)

    def fetch_shards(self, shard_ids: Iterable[str]) -> Iterator[tuple[str, ShardData]]:
        # Reading and checking a shard is a core's work on a local disk and a round trip on an
        # object store: keep as many in flight as there are cores, or as the store wants if more,
        # still yielding in order so the consumer's memory stays bounded.
        workers = max(self.concurrency, default_threads())
        yield from ordered_map(lambda s: (s, self.get_shard_bytes(s)), dict.fromkeys(shard_ids), workers)

    def get_shard_bytes(self, shard_id: str) -> ShardData:
        """A shard checked against its id, for every reader (loads, pulls, the servers).

        Hashed as it is read and read into a buffer the store may reuse once every view of it is
        dropped (shardstore/buffers.py), so a consumer that keeps the bytes keeps the view.
        """
        self.check_readable()
        hasher = IdHasher()
        data = self.store.get_buffer(shard_key(check_object_id(shard_id, "shard id")), hasher.update)
        self._count(len(data))
        if not hasher.matches(shard_id):
            raise _mismatch("shard", shard_id)
        return data

    def has_shard(self, shard_id: str) -> bool:
        return self.store.exists(shard_key(shard_id))

    def missing_shards(self, shard_ids: Iterable[str], sizes: Sequence[int] = ()) -> list[str]:
        """The shards not stored; given ``sizes`` (parallel to the ids), also those stored with another size."""
        return self._missing(shard_key, list(shard_ids), sizes)

    def missing_blobs(self, blob_ids: Iterable[str], sizes: Sequence[int] = ()) -> list[str]:
        return self._missing(blob_key, list(blob_ids), sizes)

    def _missing(self, key: Callable[[str], str], ids: list[str], sizes: Sequence[int]) -> list[str]:
        if sizes and len(sizes) != len(ids):
            raise InvalidInputError(f"{len(sizes)} sizes for {len(ids)} ids")
        sized = dict(zip(ids, sizes, strict=True)) if sizes else {}
        return [i for i in dict.fromkeys(ids) if not self.store.has(key(i), sized.get(i))]

    def check_complete(self, manifest: Manifest) -> None:
        """Raise :class:`NotFoundError` naming the first shard or blob ``manifest`` names that is not stored."""
        for shard_id in self.missing_shards(manifest.shards):
            raise NotFoundError(f"manifest refused: shard {shard_id} is not in the store")
        blob_ids = [f.header for f in manifest.files] + [b.id for b in manifest.blobs.values()]
        for blob_id in self.missing_blobs(blob_ids):
            raise NotFoundError(f"manifest refused: blob {blob_id} is not in the store")

    def list_refs(self) -> list[tuple[Ref, str]]:
        self.check_readable()
        refs: list[tuple[Ref, str]] = []
        # A ref in both layouts (a migration cut short) is listed once; resolve prefers the current key.
        for ref in dict.fromkeys(ref_from_key(key) for key in sorted(self.store.list("refs"))):
            if ref is not None:
                try:
                    refs.append((ref, self.resolve(ref)))
                except (NotFoundError, InvalidInputError):
                    continue  # deleted or garbled between list and read; verify reports it
        return refs

    # -- writes (shards and blobs, then manifest, then ref) ---------------------

    def put_shard(self, shard_id: str, data: bytes | memoryview) -> bool:
        """Write a shard unless present whole; returns whether bytes were written.

        A stored object of another size is a truncated or torn copy of these
        very bytes (the id says what they must be): it is replaced, so a
        re-push heals it.
        """
        self.check_writable()
        key = shard_key(shard_id)
        if self.store.put_if_absent(key, data):
            return True
        if self.store.size(key) == memoryview(data).nbytes:
            return False
        self.store.put(key, data)
        return True

    # -- the content index (``shardstore.repo.content_index``) ------------------

    def find_indexed(self, keys: Iterable[str]) -> dict[str, IndexEntry]:
        """The entries of ``keys`` whose shard the store holds at the size the entry records.

        Absent, unparsable and stale entries (their shard deleted or truncated)
        are simply left out: push then encodes those plans and rewrites them.
        """
        self.check_readable()

        def check(key: str) -> tuple[str, IndexEntry | None]:
            try:
                entry = IndexEntry.parse(self.store.get(index_key(key)), key)
                return key, entry if self.store.size(shard_key(entry.shard)) == entry.size else None
            except (NotFoundError, FormatError):
                return key, None

        found = ordered_map(check, dict.fromkeys(keys), self.concurrency)
        return {key: entry for key, entry in found if entry is not None}

    def put_index(self, entries: Iterable[IndexEntry], *, check: bool = False) -> int:
        """Write (or rewrite) index entries, after their shards; returns how many were written.

        ``check``: write only entries that the stored shard bears out (its size,
        and each stream's header: see :meth:`IndexEntry.matches`) -- what a
        server does with entries from clients it does not otherwise trust.
        """

        self.check_writable()

        def put(entry: IndexEntry) -> bool:
            if check and not self._entry_holds(entry):
                return False
            self.store.put(index_key(entry.key), entry.to_bytes())
            return True

        return sum(ordered_map(put, list(entries), self.concurrency))

    def _entry_holds(self, entry: IndexEntry) -> bool:
        key = shard_key(entry.shard)
        try:
            if self.store.size(key) != entry.size:
                return False
            streams = read_stream_headers(lambda start, end: self.store.get_range(key, start, end),
                                          entry.shard, entry.size)
        except (NotFoundError, FormatError):
            return False
        return entry.matches(streams)

    def put_blob(self, data: bytes) -> tuple[str, bool]:
        self.check_writable()
        blob_id = digest(data)
        return blob_id, self.store.put_if_absent(blob_key(blob_id), data)

    def put_manifest(self, manifest: Manifest, *, check_complete: bool = False) -> tuple[str, int]:
        """Write the manifest; its shards and blobs must already be stored (invariant 2).

        A push through this repository wrote them itself just before; a writer
        we do not control (a server's client) asks for ``check_complete``.
        """
        self.check_writable()
        if check_complete:
            self.check_complete(manifest)
        data = manifest.to_bytes()
        manifest_id = digest(data)
        written = self.store.put_if_absent(manifest_key(manifest_id), data)
        return manifest_id, len(data) if written else 0

    def set_ref(self, ref: Ref, manifest_id: str) -> None:
        """Point ``ref`` at a manifest that is already stored (last step of a push)."""
        check_object_id(manifest_id, "manifest id")
        self.check_writable()
        if not self.store.exists(manifest_key(manifest_id)):
            raise NotFoundError(f"{ref}: manifest {manifest_id} is not in the store")
        key = self._ref_key(ref)
        self.store.put(key, manifest_id.encode() + b"\n")
        if key != ref.legacy_key:
            self.store.delete(ref.legacy_key)  # a ref of an older layout moves to the current one

    def tag(self, src: Ref, dst: Ref) -> str:
        """Point ``dst`` at the manifest ``src`` points at (``dst`` is created or moved); returns that id."""
        manifest_id = self.resolve(src)
        self.set_ref(dst, manifest_id)
        return manifest_id

    def delete_ref(self, ref: Ref) -> str:
        """Remove ``ref`` (only the ref: gc reclaims what no other ref reaches); returns the manifest id it named.

        Read then delete, not atomic: a push that moves the ref in between loses its update, like
        two pushes racing on a store without conditional writes (docs/design.md).
        """
        self.check_readable()  # removing from a store that does not exist is a mistake, not a write to make
        self.check_writable()
        manifest_id = self.resolve(ref)
        self.store.delete(ref.key)
        self.store.delete(ref.legacy_key)
        return manifest_id

    def _migrate_ref(self, ref: Ref) -> None:
        """Move a ref of an older layout to the current key, so a compare-and-set sees its value there."""
        if self._ref_key(ref) == ref.legacy_key:
            return
        try:
            old = self.store.get(ref.legacy_key)
        except NotFoundError:
            return
        self.store.compare_and_set(ref.key, None, old)  # lost to a concurrent writer: theirs is newer
        self.store.delete(ref.legacy_key)

    def compare_and_set_ref(self, ref: Ref, manifest_id: str, expected: str | None) -> str:
        """Point ``ref`` at a stored manifest if it points at ``expected`` ("" = must not exist; None = any).

        Returns the manifest id it pointed at before ("" when new); a lost race raises :class:`ConflictError`.
        """
        try:
            previous = self.resolve(ref)
        except NotFoundError:
            previous = ""
        if expected is None:
            self.set_ref(ref, manifest_id)
            return previous
        check_object_id(manifest_id, "manifest id")
        self.check_writable()
        if not self.store.exists(manifest_key(manifest_id)):
            raise NotFoundError(f"{ref}: manifest {manifest_id} is not in the store")
        want = (check_object_id(expected, "expected manifest id") + "\n").encode() if expected else None
        self._migrate_ref(ref)
        if not self.store.compare_and_set(self._ref_key(ref), want, manifest_id.encode() + b"\n"):
            raise ConflictError(f"{ref}: changed meanwhile (expected {expected or 'no ref'}); not updated")
        return previous


def resolve_ref_text(source: ModelSource, text: str) -> tuple[Ref, str, Manifest]:
    ref = parse_ref(text)
    manifest_id = source.resolve(ref)
    return ref, manifest_id, source.get_manifest(manifest_id)
