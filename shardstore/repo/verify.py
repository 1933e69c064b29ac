"""Verify a store, restic ``check`` style: refs → manifests → shards and blobs, optionally every byte.

Without ``read_data`` it proves the structure (every ref names a stored, valid manifest;
every manifest's base manifest, shards and blobs exist with the recorded sizes). With
``read_data`` it also reads every object, checks it against its id, and decodes every
stream against its checksum. Each problem names the object key.

``repair`` fixes only what can be fixed without losing anything:

* a corrupt entry of the client's shard cache is deleted (the cache refetches it);
* a corrupt or misnamed object that nothing references is deleted;
* a corrupt *referenced* shard is rewritten from an intact copy in the shard cache
  when there is one. A referenced object is never deleted: it stays a problem
  (exit status 1) until the model is pushed again.

Healthy unreferenced objects are left to ``gc``, which knows about pushes in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardstore.errors import IntegrityError, NotFoundError, ShardstoreError
from shardstore.format.digest import digest, is_object_id
from shardstore.format.manifest import Manifest
from shardstore.format.shard import parse_shard
from shardstore.progress import ProgressCallback, progress_task
from shardstore.repo.gc import KINDS, manifest_references, object_id_of
from shardstore.repo.pieces import decode_stream
from shardstore.repo.pool import ordered_map
from shardstore.repo.repository import Repository, blob_key, manifest_key, shard_key
from shardstore.store.cache import ShardCache


@dataclass
class VerifyReport:
    refs: int = 0
    manifests: int = 0
    shards: int = 0
    blobs: int = 0
    unreferenced: int = 0  # objects no manifest or ref names (gc's business unless corrupt)
    cache_entries: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    # The store's format version (docs/formats.md), and whether it has its config object yet: a
    # store made before config existed reads as version 1 and gets it with its next write.
    store_version: int = 1
    has_config: bool = True

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"refs": self.refs, "manifests": self.manifests, "shards": self.shards, "blobs": self.blobs,
                "unreferenced": self.unreferenced, "cache_entries": self.cache_entries,
                "bytes_read": self.bytes_read, "seconds": self.seconds, "healthy": self.healthy,
                "problems": list(self.problems), "repaired": list(self.repaired),
                "store_version": self.store_version, "has_config": self.has_config}


@dataclass
class _Outcome:
    read: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)


def verify(repo: Repository, *, read_data: bool = False, repair: bool = False,
           cache: ShardCache | None = None, progress: ProgressCallback | None = None) -> VerifyReport:
    """Check the store (see the module doc); ``progress`` hears of the referenced shards and blobs, in bytes."""
    started = time.perf_counter()
    config = repo.check_readable()  # a store that does not exist is an error, not "healthy"
    if repair:  # a repair writes, so it needs to know the store's write features too
        config = repo.check_writable()
    report = VerifyReport(store_version=config.version, has_config=not config.legacy)
    manifests, referenced_manifests = _load_manifests(repo, report)
    report.manifests = len(manifests)

    shards: dict[str, int | None] = {}
    blobs: dict[str, int | None] = {}
    for manifest_id, manifest in list(manifests.items()):
        shard_ids, blob_ids, bases = manifest_references(manifest)
        referenced_manifests |= bases
        shards.update({s: manifest.shards.get(s, shards.get(s)) for s in shard_ids})
        blobs.update({b: blobs.get(b) for b in blob_ids})
        blobs.update({b.id: b.size for b in manifest.blobs.values()})
        for base in sorted(bases - set(manifests)):
            report.problems.append(f"{manifest_key(manifest_id)}: base manifest {base} is not readable in the store")
    report.shards, report.blobs = len(shards), len(blobs)

    def check_shard(item: tuple[str, int | None]) -> _Outcome:
        shard_id, size = item
        key = shard_key(shard_id)
        try:
            if not read_data:
                actual = repo.store.size(key)
                if size is None or actual == size:
                    return _Outcome()
                raise IntegrityError(f"size {actual}, manifest says {size}")
            data = repo.store.get(key)
            shard = parse_shard(data, shard_id)
            for stream in shard.streams:
                decode_stream(shard, stream)
            return _Outcome(read=len(data))
        except (IntegrityError, NotFoundError) as exc:
            restored = _restore_from_cache(repo, cache, shard_id) if repair else None
            if restored:
                return _Outcome(repaired=[f"{key}: {exc}; rewritten from an intact copy in the shard cache"])
            hint = "; referenced, so not deleted (delete it by hand and push the model again)" if repair else ""
            return _Outcome(problems=[f"{key}: {exc}{hint}"])
        except ShardstoreError as exc:
            return _Outcome(problems=[f"{key}: {exc}"])

    def check_blob(item: tuple[str, int | None]) -> _Outcome:
        blob_id, size = item
        key = blob_key(blob_id)
        try:
            if not read_data:
                actual = repo.store.size(key)
                ok = size is None or actual == size
                return _Outcome(problems=[] if ok else [f"{key}: size {actual}, manifest says {size}"])
            data = repo.store.get(key)
            ok = digest(data) == blob_id
            return _Outcome(read=len(data), problems=[] if ok else [f"{key}: content does not match its id"])
        except ShardstoreError as exc:
            return _Outcome(problems=[f"{key}: {exc}"])

    threads = max(2, repo.concurrency)
    # Sizes a legacy manifest does not give count as 0: the bar then ends a little early, never late.
    total = sum(size or 0 for size in shards.values()) + sum(size or 0 for size in blobs.values())
    checked = progress_task(progress, "verify: reading and decoding" if read_data else "verify: sizes", total)
    for check, objects in ((check_shard, sorted(shards.items())), (check_blob, sorted(blobs.items()))):
        _collect(report, ordered_map(check, objects, threads), [size for _id, size in objects], checked)
    if read_data or repair:
        referenced = {"manifests": set(manifests) | referenced_manifests, "shards": set(shards), "blobs": set(blobs)}
        _check_unreferenced(repo, report, referenced, repair, threads)
    if cache is not None:
        _check_cache(cache, report, repair)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _collect(report: VerifyReport, outcomes: Any, sizes: list[int | None] | None = None,
             checked: Callable[[int], None] | None = None) -> None:
    """Add each outcome to the report, and its object's size (``sizes``, in order) to ``checked``."""
    for index, outcome in enumerate(outcomes):
        size = sizes[index] if sizes is not None else None
        if size and checked is not None:  # a bar is done at its total: no empty steps after it
            checked(size)
        report.bytes_read += outcome.read
        report.problems.extend(outcome.problems)
        report.repaired.extend(outcome.repaired)


def _load_manifests(repo: Repository, report: VerifyReport) -> tuple[dict[str, Manifest], set[str]]:
    """Every readable manifest (ref targets, their bases, and stored ones no ref reaches); and the ids refs name."""
    manifests: dict[str, Manifest] = {}
    named: set[str] = set()

    def load(manifest_id: str, where: str) -> None:
        if manifest_id in manifests:
            return
        try:
            manifests[manifest_id] = repo.get_manifest(manifest_id)
        except ShardstoreError as exc:
            report.problems.append(f"{where}: {exc}")

    for key in sorted(repo.store.list("refs")):
        report.refs += 1
        try:
            value = repo.store.get(key).decode("ascii", "replace").strip()
        except NotFoundError:
            continue
        if not is_object_id(value):
            report.problems.append(f"{key}: does not hold a manifest id ({value[:80]!r})")
            continue
        named.add(value)
        load(value, key)
    # Manifests no ref reaches are still checked: a half-finished push may be re-run to use them.
    for key in sorted(repo.store.list("manifests")):
        manifest_id = object_id_of("manifests", key)
        if manifest_id is not None:
            load(manifest_id, manifest_key(manifest_id))
    return manifests, named


def _restore_from_cache(repo: Repository, cache: ShardCache | None, shard_id: str) -> bool:
    """Rewrite a corrupt stored shard from the cache's copy, which :meth:`ShardCache.get` checks against its id."""
    data = cache.get(shard_id) if cache is not None else None
    if data is None:
        return False
    repo.store.put(shard_key(shard_id), data)
    return True


def _check_unreferenced(repo: Repository, report: VerifyReport, referenced: dict[str, set[str]], repair: bool,
                        threads: int) -> None:
    """Read every object nothing references: report (and with ``repair`` delete) the corrupt or misnamed ones."""
    candidates: list[tuple[str, str | None]] = []
    for kind in KINDS:
        for key in sorted(repo.store.list(kind)):
            object_id = object_id_of(kind, key)
            if object_id is None or object_id not in referenced[kind]:
                candidates.append((key, object_id))
    report.unreferenced = len(candidates)

    def check(item: tuple[str, str | None]) -> _Outcome:
        key, object_id = item
        try:
            data = repo.store.get(key)
        except NotFoundError:
            return _Outcome()  # deleted since the listing (gc)
        except ShardstoreError as exc:
            return _Outcome(problems=[f"{key}: {exc}"])
        if object_id is not None and digest(data) == object_id:
            return _Outcome(read=len(data))
        problem = "not a name of the store layout" if object_id is None else "content does not match its id"
        if not repair:
            return _Outcome(read=len(data), problems=[f"{key}: unreferenced and {problem} (--repair deletes it)"])
        repo.store.delete(key)
        return _Outcome(read=len(data), repaired=[f"{key}: unreferenced and {problem}; deleted"])

    _collect(report, ordered_map(check, candidates, threads))


def _check_cache(cache: ShardCache, report: VerifyReport, repair: bool) -> None:
    entries, corrupt = cache.scrub(delete=repair)
    report.cache_entries = entries
    for path in corrupt:
        problem = f"cache entry {path}: content does not match its id"
        if repair:
            report.repaired.append(f"{problem}; deleted")
        else:
            report.problems.append(f"{problem} (--repair deletes it)")
