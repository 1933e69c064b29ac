"""Garbage collection: delete what no ref reaches, never what a push in flight will reference.

Mark: every ref names a manifest; a manifest reaches its shards, its blobs
(safetensors headers and other files), its base manifest and the base shards
its pieces decode against (deltas), transitively. Manifests written within
the grace period count as roots too: a push that took no lease (an older
client) writes its manifest just before its ref.

Sweep: an unreachable object is deleted only if it is older than the grace
period (by the store's modification time), and only while no push holds a
live lease (:mod:`shardstore.repo.leases`). Manifests go first, then shards
and blobs, so a gc killed half way never leaves a manifest without its shards.

Whatever gc cannot read it does not guess about: an unreadable ref or a
missing or corrupt reachable manifest stops it before anything is deleted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from shardstore.errors import IntegrityError, InvalidInputError, NotFoundError, ShardstoreError
from shardstore.format.digest import is_object_id
from shardstore.format.manifest import Manifest
from shardstore.progress import ProgressCallback, progress_task
from shardstore.repo.leases import Lease, live_leases, remove_expired
from shardstore.repo.refs import ref_from_key
from shardstore.repo.repository import Repository
from shardstore.store.base import ObjectInfo, Store
from shardstore.store.local import LocalStore

DEFAULT_GRACE_S = 3600.0
# Object kinds in the order the sweep deletes them (reverse of the push order).
KINDS = ("manifests", "shards", "blobs")
# Attributes of a piece that may name the base shards a delta decodes against. Read with getattr:
# pieces gain them only where deltas are stored.
_PIECE_BASE_FIELDS = ("base", "base_shard", "base_shards")


@dataclass
class Reachable:
    manifests: set[str] = field(default_factory=set)
    shards: set[str] = field(default_factory=set)
    blobs: set[str] = field(default_factory=set)

    def holds(self, kind: str, object_id: str) -> bool:
        ids: set[str] = getattr(self, kind)
        return object_id in ids


def _ids_in(value: object) -> Iterator[str]:
    """Object ids in a piece's base field, whatever shape it takes (an id, a piece-like, a list of either)."""
    if is_object_id(value):
        yield str(value)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _ids_in(item)
    elif value is not None:  # a piece-like base: its shard, and the base it is itself a delta of
        yield from _ids_in(getattr(value, "shard", None))
        yield from _ids_in(getattr(value, "base", None))


def manifest_references(manifest: Manifest) -> tuple[set[str], set[str], set[str]]:
    """The (shards, blobs, manifests) one manifest names directly: its own, and those its deltas need."""
    shards = set(manifest.shards)
    for record in manifest.tensors.values():
        for piece in record.pieces:
            shards.add(piece.shard)
            for name in _PIECE_BASE_FIELDS:
                shards.update(_ids_in(getattr(piece, name, None)))
    blobs = {f.header for f in manifest.files} | {b.id for b in manifest.blobs.values()}
    manifests = {manifest.base} if manifest.base else set()
    return shards, blobs, manifests


def mark(repo: Repository, roots: Iterable[str]) -> Reachable:
    """Everything the root manifests reach; raises if a reachable manifest is missing or corrupt."""
    reachable = Reachable()
    pending = list(dict.fromkeys(roots))
    while pending:
        manifest_id = pending.pop()
        if manifest_id in reachable.manifests:
            continue
        reachable.manifests.add(manifest_id)
        try:
            manifest = repo.get_manifest(manifest_id)
        except ShardstoreError as exc:
            raise IntegrityError(f"gc stopped, nothing deleted: reachable manifest {manifest_id} cannot be read "
                                 f"({exc}); run `shardstore verify`") from None
        shards, blobs, bases = manifest_references(manifest)
        reachable.shards |= shards
        reachable.blobs |= blobs
        pending.extend(bases - reachable.manifests)
    return reachable


def ref_roots(store: Store) -> tuple[int, list[str]]:
    """(number of refs, the manifest ids they name); an unreadable ref stops gc."""
    roots: list[str] = []
    keys = sorted(store.list("refs"))
    for key in keys:
        try:
            value = store.get(key).decode("ascii", "replace").strip()
        except NotFoundError:
            continue  # deleted since the listing: it reaches nothing any more
        if not is_object_id(value):
            if ref_from_key(key) is None:
                continue  # a stray file, not a ref (it could name nothing)
            raise IntegrityError(f"gc stopped, nothing deleted: {key} does not hold a manifest id ({value[:80]!r})")
        roots.append(value)
    return len(keys), roots


def object_id_of(kind: str, key: str) -> str | None:
    """The id a layout key names (``shards/ab/ab…``, ``manifests/….json``), None for anything else."""
    parts = key.split("/")
    if kind == "manifests":
        name = parts[1] if len(parts) == 2 else ""
        object_id = name.removesuffix(".json")
        return object_id if name.endswith(".json") and is_object_id(object_id) else None
    if len(parts) == 3 and is_object_id(parts[2]) and parts[1] == parts[2][:2]:
        return parts[2]
    return None


@dataclass
class GcReport:
    store: str
    dry_run: bool
    grace_s: float
    refs: int = 0
    reachable_manifests: int = 0
    reachable_shards: int = 0
    reachable_blobs: int = 0
    deleted_manifests: int = 0
    deleted_shards: int = 0
    deleted_blobs: int = 0
    bytes_freed: int = 0
    kept_young: int = 0  # unreachable, but within the grace period
    pushes_in_flight: int = 0  # live push leases: when > 0 nothing was deleted
    expired_leases_removed: int = 0
    temporaries_removed: int = 0
    seconds: float = 0.0

    @property
    def deleted(self) -> int:
        return self.deleted_manifests + self.deleted_shards + self.deleted_blobs

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["deleted"] = self.deleted
        return data


def collect(repo: Repository, *, grace: float = DEFAULT_GRACE_S, dry_run: bool = False,
            progress: ProgressCallback | None = None) -> GcReport:
    """Delete every object no ref reaches that is older than ``grace`` seconds; see the module doc."""
    if not math.isfinite(grace) or grace < 0:  # NaN compares false with every age: nothing would count as young
        raise InvalidInputError(f"gc: the grace period must be 0 or more seconds, not {grace!r}")
    started = time.perf_counter()
    store = repo.store
    # gc deletes: a store whose format (or write features) this program does not know is left alone.
    repo.check_readable()  # a store that does not exist is an error, not "nothing to collect"
    if not dry_run:
        repo.check_writable()
    report = GcReport(store=store.url, dry_run=dry_run, grace_s=grace)
    if dry_run:
        report.pushes_in_flight = len(live_leases(store, "push"))
        _mark_and_sweep(repo, report, delete=False, progress=progress)
    else:
        with Lease(store, "gc", note="gc") as lease:
            # Our lease is written before we look: a push that starts after this sees it and waits.
            report.pushes_in_flight = len(live_leases(store, "push", exclude=lease.key))
            if not report.pushes_in_flight:
                _mark_and_sweep(repo, report, delete=True, progress=progress)
            report.expired_leases_removed = remove_expired(store)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _mark_and_sweep(repo: Repository, report: GcReport, *, delete: bool,
                    progress: ProgressCallback | None) -> None:
    store = repo.store
    now = time.time()
    cutoff = now - report.grace_s

    def young(info: ObjectInfo) -> bool:
        # No time from the backend: age unknown, so never old enough (only leases could protect it).
        return info.modified is None or info.modified > cutoff

    listed = {kind: list(store.list_info(kind)) for kind in KINDS}
    report.refs, roots = ref_roots(store)
    recent = [m for info in listed["manifests"] if young(info) and (m := object_id_of("manifests", info.key))]
    reachable = mark(repo, roots)
    # Recent manifests are roots only if readable: a corrupt one protects nothing (verify --repair removes it).
    for manifest_id in recent:
        if manifest_id not in reachable.manifests:
            try:
                more = mark(repo, [manifest_id])
            except IntegrityError:
                continue
            reachable.manifests |= more.manifests
            reachable.shards |= more.shards
            reachable.blobs |= more.blobs
    report.reachable_manifests = len(reachable.manifests)
    report.reachable_shards = len(reachable.shards)
    report.reachable_blobs = len(reachable.blobs)

    doomed: list[tuple[str, ObjectInfo]] = []
    for kind in KINDS:
        for info in listed[kind]:
            object_id = object_id_of(kind, info.key)
            if object_id is None or reachable.holds(kind, object_id):
                continue  # not ours to judge (foreign key), or alive
            if young(info):
                report.kept_young += 1
                continue
            doomed.append((kind, info))
    advance = progress_task(progress if delete else None, "gc", sum(info.size for _kind, info in doomed))
    for kind, info in doomed:  # manifests first: KINDS order
        if delete:
            store.delete(info.key)
            advance(info.size)
        setattr(report, f"deleted_{kind}", getattr(report, f"deleted_{kind}") + 1)
        report.bytes_freed += info.size
    if isinstance(store, LocalStore):
        for path in store.stale_temporaries(cutoff):
            if delete:
                path.unlink(missing_ok=True)
            report.temporaries_removed += 1
