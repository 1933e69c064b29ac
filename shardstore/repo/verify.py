"""Verify a store, restic ``check`` style: refs → manifests → shards and blobs, optionally every byte.

Without ``read_data`` it proves the structure (every ref names a stored, valid manifest;
every manifest's shards and blobs exist with the recorded sizes). With ``read_data`` it
also reads every shard and blob, checks it against its id, and decodes every stream
against its checksum. Each problem names the object key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shardstore.errors import ShardstoreError
from shardstore.format.digest import digest
from shardstore.format.manifest import Manifest
from shardstore.format.shard import parse_shard
from shardstore.repo.pool import ordered_map
from shardstore.repo.repository import Repository, blob_key, manifest_key, shard_key


@dataclass
class VerifyReport:
    refs: int = 0
    manifests: int = 0
    shards: int = 0
    blobs: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"refs": self.refs, "manifests": self.manifests, "shards": self.shards, "blobs": self.blobs,
                "bytes_read": self.bytes_read, "seconds": self.seconds, "healthy": self.healthy,
                "problems": list(self.problems)}


def verify(repo: Repository, *, read_data: bool = False) -> VerifyReport:
    started = time.perf_counter()
    report = VerifyReport()
    manifests: dict[str, Manifest] = {}
    for key in sorted(repo.store.list("refs")):
        report.refs += 1
        try:
            manifest_id = repo.store.get(key).decode("ascii", "replace").strip()
            if manifest_id not in manifests:
                manifests[manifest_id] = repo.get_manifest(manifest_id)
        except ShardstoreError as exc:
            report.problems.append(f"{key}: {exc}")
    # Manifests no ref reaches are still checked: a half-finished push may be re-run to use them.
    for key in sorted(repo.store.list("manifests")):
        manifest_id = key.rsplit("/", 1)[-1].removesuffix(".json")
        if manifest_id not in manifests:
            try:
                manifests[manifest_id] = repo.get_manifest(manifest_id)
            except ShardstoreError as exc:
                report.problems.append(f"{manifest_key(manifest_id)}: {exc}")
    report.manifests = len(manifests)

    shards: dict[str, int] = {}
    blobs: dict[str, int | None] = {}
    for manifest in manifests.values():
        shards.update(manifest.shards)
        blobs.update({b.id: b.size for b in manifest.blobs.values()})
        blobs.update({f.header: blobs.get(f.header) for f in manifest.files})
    report.shards, report.blobs = len(shards), len(blobs)

    def check_shard(item: tuple[str, int]) -> tuple[int, list[str]]:
        shard_id, size = item
        key = shard_key(shard_id)
        try:
            if not read_data:
                actual = repo.store.size(key)
                return 0, [] if actual == size else [f"{key}: size {actual}, manifest says {size}"]
            data = repo.store.get(key)
            shard = parse_shard(data, shard_id)
            for stream in shard.streams:
                shard.decode(stream)
            return len(data), []
        except ShardstoreError as exc:
            return 0, [f"{key}: {exc}"]

    def check_blob(item: tuple[str, int | None]) -> tuple[int, list[str]]:
        blob_id, size = item
        key = blob_key(blob_id)
        try:
            if not read_data:
                actual = repo.store.size(key)
                return 0, [] if size is None or actual == size else [f"{key}: size {actual}, manifest says {size}"]
            data = repo.store.get(key)
            return len(data), [] if digest(data) == blob_id else [f"{key}: content does not match its id"]
        except ShardstoreError as exc:
            return 0, [f"{key}: {exc}"]

    threads = max(2, repo.concurrency)
    for read, problems in ordered_map(check_shard, sorted(shards.items()), threads):
        report.bytes_read += read
        report.problems.extend(problems)
    for read, problems in ordered_map(check_blob, sorted(blobs.items()), threads):
        report.bytes_read += read
        report.problems.extend(problems)
    report.seconds = round(time.perf_counter() - started, 3)
    return report
