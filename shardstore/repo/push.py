"""Push: read a model, cut it into pieces, encode, upload the shards the store lacks, then manifest, then ref.

The order is DESIGN invariant 2: every shard and blob is stored before the
manifest that names them, and the manifest before the ref. A push killed at
any point leaves only unreferenced (harmless, collectable) objects, and
re-running it skips every shard already stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from shardstore.codecs import DEFAULT_CODEC_NAME, Codec, PieceInfo, Pipeline, codec_from_name
from shardstore.errors import InvalidInputError
from shardstore.format.digest import digest
from shardstore.format.manifest import BlobRecord, FileRecord, Manifest, PieceRef, TensorRecord
from shardstore.format.shard import StreamHeader, build_shard
from shardstore.progress import Progress
from shardstore.repo.chunking import DEFAULT_CHUNK_BYTES, PiecePlan, TensorSpec, plan_shards
from shardstore.repo.model_files import MappedFiles, ModelFiles, scan_model
from shardstore.repo.pool import default_threads, ordered_map
from shardstore.repo.refs import Ref


class PushTarget(Protocol):
    """Where a push writes: a repository over a store, or a server."""

    def put_shard(self, shard_id: str, data: bytes | memoryview) -> bool: ...

    def put_blob(self, data: bytes) -> tuple[str, bool]: ...

    def put_manifest(self, manifest: Manifest) -> tuple[str, int]: ...

    def set_ref(self, ref: Ref, manifest_id: str) -> None: ...


@dataclass(frozen=True)
class PushReport:
    ref: str
    manifest_id: str
    codec: str
    tensors: int
    raw_bytes: int
    stored_bytes: int
    uploaded_bytes: int
    shards_total: int
    shards_uploaded: int
    blobs_uploaded: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = round(self.stored_bytes / self.raw_bytes, 6) if self.raw_bytes else 1.0
        return data


@dataclass(frozen=True)
class _EncodedShard:
    shard_id: str
    size: int
    uploaded: bool
    pieces: list[tuple[PiecePlan, str, int]]  # plan, stream key, stored bytes
    raw_bytes: int


def _encode_shard(
    plan: Sequence[PiecePlan], views: dict[str, memoryview], pipeline: Pipeline, target: PushTarget
) -> _EncodedShard:
    streams: list[tuple[StreamHeader, bytes]] = []
    raw_total = 0
    for piece in plan:
        tensor = piece.tensor
        start = piece.rows[0] * tensor.row_bytes
        raw = views[tensor.name][start : start + piece.nbytes]
        encoded = pipeline.encode(raw, PieceInfo(tensor.dtype, piece.shape))
        streams.append((StreamHeader(tensor.dtype, piece.shape, tuple(pipeline.configs()), digest(raw)), encoded))
        raw_total += piece.nbytes
    data = build_shard(streams)
    shard_id = digest(data)
    uploaded = target.put_shard(shard_id, data)
    pieces = [(p, str(i), len(s[1])) for i, (p, s) in enumerate(zip(plan, streams, strict=True))]
    return _EncodedShard(shard_id, len(data), uploaded, pieces, raw_total)


def push_model(
    model: ModelFiles,
    ref: Ref,
    target: PushTarget,
    *,
    codec: Codec | str = DEFAULT_CODEC_NAME,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: bool = False,
) -> PushReport:
    started = time.perf_counter()
    if isinstance(codec, str):
        codec = codec_from_name(codec)
    pipeline = Pipeline((codec,))
    specs = [
        TensorSpec(entry.name, entry.dtype, entry.shape) for f in model.tensor_files for entry in f.header.tensors
    ]
    plans = plan_shards(specs, chunk_bytes)
    raw_total = sum(p.nbytes for plan in plans for p in plan)
    pieces: dict[str, list[PieceRef]] = {spec.name: [] for spec in specs}
    shard_sizes: dict[str, int] = {}
    uploaded_bytes = shards_uploaded = 0

    with MappedFiles(model) as views, Progress(f"push {ref}", raw_total, progress) as bar:
        encode = lambda plan: _encode_shard(plan, views, pipeline, target)  # noqa: E731
        # Uploads to an object store wait on round trips, so keep at least its request
        # concurrency in flight even where that exceeds the cores.
        workers = threads or max(default_threads(), getattr(target, "concurrency", 1))
        for shard in ordered_map(encode, plans, workers):
            shard_sizes[shard.shard_id] = shard.size
            if shard.uploaded:
                uploaded_bytes += shard.size
                shards_uploaded += 1
            for plan, stream, stored in shard.pieces:
                pieces[plan.tensor.name].append(PieceRef(shard.shard_id, stream, plan.rows, stored))
            bar.update(shard.raw_bytes)

    files, blobs, blob_bytes, blobs_uploaded = _upload_files(model, target)
    uploaded_bytes += blob_bytes
    tensors = {
        spec.name: TensorRecord(spec.dtype, spec.shape, tuple(pipeline.configs()), tuple(pieces[spec.name]))
        for spec in specs
    }
    manifest = Manifest(tensors, files, blobs, shard_sizes)
    manifest_id, manifest_bytes = target.put_manifest(manifest)
    target.set_ref(ref, manifest_id)
    return PushReport(
        ref=str(ref),
        manifest_id=manifest_id,
        codec=codec.codec_id,
        tensors=len(tensors),
        raw_bytes=manifest.raw_bytes,
        stored_bytes=manifest.stored_bytes,
        uploaded_bytes=uploaded_bytes + manifest_bytes,
        shards_total=len(shard_sizes),
        shards_uploaded=shards_uploaded,
        blobs_uploaded=blobs_uploaded,
        seconds=round(time.perf_counter() - started, 3),
    )


def _upload_files(
    model: ModelFiles, target: PushTarget
) -> tuple[tuple[FileRecord, ...], dict[str, BlobRecord], int, int]:
    """Store each safetensors header and each non-tensor file as a blob."""
    uploaded_bytes = uploaded = 0

    def put(data: bytes) -> str:
        nonlocal uploaded_bytes, uploaded
        blob_id, written = target.put_blob(data)
        if written:
            uploaded_bytes += len(data)
            uploaded += 1
        return blob_id

    files = tuple(
        FileRecord(f.rel, put(f.header.header_bytes), f.header.metadata, tuple(t.name for t in f.header.tensors))
        for f in model.tensor_files
    )
    blobs: dict[str, BlobRecord] = {}
    for rel, path in model.other_files:
        data = _read(path)
        blobs[rel] = BlobRecord(put(data), len(data))
    return files, blobs, uploaded_bytes, uploaded


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read: {exc.strerror}") from None


def push(
    src: str | os.PathLike[str],
    ref: Ref,
    target: PushTarget,
    **options: Any,
) -> PushReport:
    """Scan ``src`` (validating every header before anything is written), then push it."""
    return push_model(scan_model(src), ref, target, **options)

