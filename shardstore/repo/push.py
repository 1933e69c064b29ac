"""Push: read a model, cut it into pieces, encode, upload the shards the store lacks, then manifest, then ref.

The order is DESIGN invariant 2: every shard and blob is stored before the
manifest that names them, and the manifest before the ref. A push killed at
any point leaves only unreferenced (harmless, collectable) objects, and
re-running it skips every shard already stored.

Before encoding, every shard plan is hashed and looked up in the content
index (``shardstore.repo.content_index``) with one batched query; a plan the
store already holds, checked by size, is not encoded again. A push with
``base`` codes pieces against that base and does not use the index.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from shardstore.codecs import DEFAULT_CODEC_NAME, Codec, PieceInfo, Pipeline, codec_from_name
from shardstore.codecs.sparse import prefer_sparse
from shardstore.errors import InvalidInputError, NotFoundError
from shardstore.format import canonical_json
from shardstore.format.digest import digest
from shardstore.format.manifest import (
    CREATED_FORMAT,
    BlobRecord,
    FileRecord,
    Manifest,
    PieceBase,
    PieceRef,
    TensorRecord,
)
from shardstore.format.shard import StreamHeader, build_shard
from shardstore.progress import ProgressCallback, progress_task
from shardstore.repo.chunking import DEFAULT_CHUNK_BYTES, PiecePlan, TensorSpec, plan_shards
from shardstore.repo.content_index import IndexedPiece, IndexEntry, PieceInput, plan_key
from shardstore.repo.delta import DeltaBase, EncodedPiece, encode_piece
from shardstore.repo.inspect import tensor_figures
from shardstore.repo.model_files import MappedFiles, ModelFiles, scan_model
from shardstore.repo.policy import Policy, Prepared
from shardstore.repo.pool import default_threads, ordered_map
from shardstore.repo.quality import ErrorStats, encode_stream
from shardstore.repo.refs import Ref
from shardstore.repo.registry import Registry

# The reproducible-builds convention: when set, pushes date their manifests at this time, not now.
SOURCE_DATE_EPOCH_ENV = "SOURCE_DATE_EPOCH"


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
    # What the content index saved: pieces (and their raw bytes) encoded now, and those whose
    # shard the store already held, so they were not encoded again.
    pieces_encoded: int = 0
    pieces_reused: int = 0
    bytes_encoded: int = 0
    bytes_reused: int = 0
    shards_reused: int = 0
    base: str | None = None  # the base ref of a push with --base
    # name -> codec, raw/stored/new bytes, ratio (``shardstore.repo.inspect.tensor_figures``)
    per_tensor: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Files of the folder not pushed: path -> why (pickle weights beside safetensors, --include/--exclude).
    skipped_files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = round(self.stored_bytes / self.raw_bytes, 6) if self.raw_bytes else 1.0
        return data


@dataclass(frozen=True)
class _EncodedShard:
    shard_id: str | None  # None when every piece of the plan is the base's, unchanged
    size: int
    uploaded: bool
    pieces: list[tuple[PiecePlan, PieceRef]]
    raw_bytes: int
    errors: list[tuple[str, ErrorStats]] = field(default_factory=list)  # (tensor, error) of each lossy piece
    reused: bool = False  # the content index named a stored shard holding exactly these pieces
    index_entry: IndexEntry | None = None  # for the content index, when this plan was encoded now


def _raw_piece(piece: PiecePlan, views: dict[str, memoryview]) -> memoryview:
    start = piece.rows[0] * piece.tensor.row_bytes
    return views[piece.tensor.name][start : start + piece.nbytes]


def _plan_inputs(plan: Sequence[PiecePlan], views: dict[str, memoryview],
                 pipelines: dict[str, Pipeline]) -> list[PieceInput]:
    return [PieceInput.of(p.tensor.dtype, p.shape, _raw_piece(p, views), pipelines[p.tensor.name].configs())
            for p in plan]


def _reuse_shard(plan: Sequence[PiecePlan], entry: IndexEntry) -> _EncodedShard:
    """The pieces of ``plan`` as the streams of the stored shard the index names (stream i = piece i)."""
    pieces = [(piece, PieceRef(entry.shard, str(i), piece.rows, indexed.stored_bytes))
              for i, (piece, indexed) in enumerate(zip(plan, entry.pieces, strict=True))]
    errors = [(piece.tensor.name, indexed.error) for piece, indexed in zip(plan, entry.pieces, strict=True)
              if indexed.error is not None]
    return _EncodedShard(entry.shard, entry.size, False, pieces, sum(p.nbytes for p in plan), errors, reused=True)


def _encode_shard(
    plan: Sequence[PiecePlan], views: dict[str, memoryview], pipelines: dict[str, Pipeline], target: Registry,
    base: DeltaBase | None = None, inputs: Sequence[PieceInput] | None = None, prepared: Prepared | None = None,
) -> _EncodedShard:
    """Encode and store one shard; ``inputs`` (the plan's index inputs) also give its index entry.

    ``prepared`` holds streams already encoded under the piece's pipeline (by ``--lossy auto``).
    """
    streams: list[tuple[StreamHeader, bytes]] = []
    placed: list[tuple[PiecePlan, PieceRef | tuple[str, PieceBase | None]]] = []  # the base's piece, or our stream
    raw_total = 0
    errors: list[tuple[str, ErrorStats]] = []
    piece_errors: list[ErrorStats | None] = []
    for index, piece in enumerate(plan):
        tensor = piece.tensor
        raw = _raw_piece(piece, views)
        pipeline = pipelines[tensor.name]
        encoded: EncodedPiece | PieceRef
        ready = prepared.get((tensor.name, piece.rows)) if prepared else None
        if ready is not None:
            header = StreamHeader(tensor.dtype, piece.shape, tuple(pipeline.configs()), ready.checksum)
            encoded = EncodedPiece(header, ready.data)
            if ready.error is not None:
                errors.append((tensor.name, ready.error))
            piece_errors.append(ready.error)
        elif pipeline.lossless:
            encoded = encode_piece(raw, PieceInfo(tensor.dtype, piece.shape), pipeline, base,
                                   name=tensor.name, shape=tensor.shape, rows=piece.rows,
                                   raw_checksum=inputs[index].check if inputs is not None else None)
            piece_errors.append(None)
        else:  # lossy: never a delta; the checksum covers what decodes (dequantized), and the error is kept
            lossy = encode_stream(pipeline, raw, PieceInfo(tensor.dtype, piece.shape), tensor.name)
            header = StreamHeader(tensor.dtype, piece.shape, tuple(pipeline.configs()), lossy.checksum)
            encoded = EncodedPiece(header, lossy.data)
            errors.append((tensor.name, lossy.error or ErrorStats()))
            piece_errors.append(lossy.error or ErrorStats())
        if isinstance(encoded, PieceRef):
            placed.append((piece, encoded))
        else:
            placed.append((piece, (str(len(streams)), encoded.base)))
            streams.append((encoded.header, encoded.payload))
        raw_total += piece.nbytes
    shard_id, size, uploaded = None, 0, False
    if streams:
        data = build_shard(streams)
        shard_id, size = digest(data), len(data)
        uploaded = target.put_shard(shard_id, data)
    pieces: list[tuple[PiecePlan, PieceRef]] = []
    for piece, where in placed:
        if isinstance(where, PieceRef):
            pieces.append((piece, where))
        else:
            assert shard_id is not None
            stream, piece_base = where
            pieces.append((piece, PieceRef(shard_id, stream, piece.rows, len(streams[int(stream)][1]), piece_base)))
    entry = None
    if inputs is not None and shard_id is not None and len(streams) == len(plan):
        entry = IndexEntry(shard_id, size, tuple(IndexedPiece(i, len(payload), e) for i, (_h, payload), e
                                                 in zip(inputs, streams, piece_errors, strict=True)))
    return _EncodedShard(shard_id, size, uploaded, pieces, raw_total, errors, index_entry=entry)


def push_model(
    model: ModelFiles,
    ref: Ref,
    target: Registry,
    *,
    codec: Codec | str = DEFAULT_CODEC_NAME,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    base: DeltaBase | None = None,
    policy: Policy | None = None,
) -> PushReport:
    """Push ``model`` as ``ref``; with ``base``, each piece is coded against the base model's same piece.

    ``policy`` says which tensors are quantized and how (``shardstore.repo.policy``);
    without one every tensor gets ``codec``. ``progress`` is told about each stage.
    """
    started = time.perf_counter()
    created = creation_time()  # a bad $SOURCE_DATE_EPOCH fails before anything is written
    if isinstance(codec, str):
        codec = codec_from_name(codec)
    specs = [
        TensorSpec(entry.name, entry.dtype, entry.shape) for f in model.tensor_files for entry in f.header.tensors
    ]
    plans = plan_shards(specs, chunk_bytes)
    policy = policy or Policy(lossless=codec)
    policy.check_patterns(specs)  # a typo in a --lossy pattern fails before anything shows or is written
    raw_total = sum(p.nbytes for plan in plans for p in plan)
    pieces: dict[str, list[PieceRef]] = {spec.name: [] for spec in specs}
    shard_sizes: dict[str, int] = {}
    uploaded_bytes = shards_uploaded = 0

    counts = {"pieces_encoded": 0, "pieces_reused": 0, "bytes_encoded": 0, "bytes_reused": 0, "shards_reused": 0}
    # Uploads to an object store wait on round trips, so keep at least its request
    # concurrency in flight even where that exceeds the cores.
    workers = threads or max(default_threads(), target.concurrency)

    # Push already runs one thread per core; BLAS's own threads (the error figures' dot products)
    # would only spin beside them, and make those figures depend on the BLAS thread count.
    mapped = MappedFiles(model)
    with mapped as views, threadpool_limits(1, user_api="blas"):
        prepared: Prepared = {}  # streams --lossy auto encoded while measuring: stored as they are
        chosen = policy.resolve(plans, views, threads=threads, progress=progress, prepared=prepared)
        # Tensors with many exact zeros (pruned, 2:4 sparse) go to the sparse coder.
        pipelines = {s.name: prefer_sparse(chosen[s.name], views[s.name], s.dtype) for s in specs}
        for name, rows in list(prepared):
            if pipelines[name] != chosen[name] or (base is not None and pipelines[name].lossless):
                del prepared[name, rows]  # not the pipeline measured, or a piece a delta may code
        inputs: list[list[PieceInput]] | None = None
        keys: list[str] = []
        found: dict[str, IndexEntry] = {}
        if base is None:  # a delta's streams depend on its base as well: those pushes encode everything
            hashed = progress_task(progress, "push: hashing", raw_total)

            def hash_plan(plan: list[PiecePlan]) -> list[PieceInput]:
                plan_inputs = _plan_inputs(plan, views, pipelines)
                hashed(sum(p.nbytes for p in plan))
                return plan_inputs

            inputs = list(ordered_map(hash_plan, plans, workers))
            keys = [plan_key(plan_inputs) for plan_inputs in inputs]
            found = target.find_indexed(keys)
        errors: dict[str, ErrorStats] = {}
        new_entries: list[IndexEntry] = []

        def encode(index: int) -> _EncodedShard:
            plan = plans[index]
            entry = found.get(keys[index]) if inputs is not None else None
            if entry is not None and len(entry.pieces) == len(plan):
                return _reuse_shard(plan, entry)
            return _encode_shard(plan, views, pipelines, target, base, inputs[index] if inputs is not None else None,
                                 prepared)

        advance = progress_task(progress, f"push {ref}", raw_total)
        for shard in ordered_map(encode, range(len(plans)), workers):
            if shard.shard_id is not None:
                shard_sizes[shard.shard_id] = shard.size
            if shard.uploaded:
                uploaded_bytes += shard.size
                shards_uploaded += 1
            done = "reused" if shard.reused else "encoded"
            counts[f"pieces_{done}"] += len(shard.pieces)
            counts[f"bytes_{done}"] += shard.raw_bytes
            counts["shards_reused"] += shard.reused
            if shard.index_entry is not None:
                new_entries.append(shard.index_entry)
            for plan, piece_ref in shard.pieces:
                pieces[plan.tensor.name].append(piece_ref)
            for name, error in shard.errors:
                errors[name] = errors.get(name, ErrorStats()) + error
            advance(shard.raw_bytes)
        # Before any index entry, manifest or ref: an input rewritten under the push was read wrong.
        mapped.check_unchanged()

    if new_entries:  # after their shards, so an entry never names a shard not yet written
        target.put_index(new_entries)
    files, blobs, blob_bytes, blobs_uploaded = _upload_files(model, target)
    uploaded_bytes += blob_bytes
    tensors = {
        spec.name: TensorRecord(spec.dtype, spec.shape, tuple(pipelines[spec.name].configs()),
                                tuple(pieces[spec.name]),
                                errors[spec.name].to_json() if spec.name in errors else None)
        for spec in specs
    }
    shards_total = len(shard_sizes)
    if base is None:
        manifest = Manifest(tensors, files, blobs, shard_sizes)
    else:  # list the base's shards it reads too, so the manifest names everything it needs
        all_shards, base_shards = base.shards_needed(shard_sizes, (p for ps in pieces.values() for p in ps))
        manifest = Manifest(tensors, files, blobs, all_shards, base.manifest_id, base_shards)
    manifest = replace(manifest, created=created)
    unchanged = _current_if_same(target, ref, manifest)
    manifest_id, manifest_bytes = (unchanged, 0) if unchanged else target.put_manifest(manifest)
    target.set_ref(ref, manifest_id)
    return PushReport(
        ref=str(ref),
        manifest_id=manifest_id,
        codec=codec.codec_id,
        tensors=len(tensors),
        raw_bytes=manifest.raw_bytes,
        stored_bytes=manifest.stored_bytes,
        uploaded_bytes=uploaded_bytes + manifest_bytes,
        shards_total=shards_total,
        shards_uploaded=shards_uploaded,
        blobs_uploaded=blobs_uploaded,
        seconds=round(time.perf_counter() - started, 3),
        base=str(base.ref) if base is not None else None,
        pieces_encoded=counts["pieces_encoded"],
        pieces_reused=counts["pieces_reused"],
        bytes_encoded=counts["bytes_encoded"],
        bytes_reused=counts["bytes_reused"],
        shards_reused=counts["shards_reused"],
        per_tensor={name: tensor_figures(manifest, name) for name in tensors},
    )


def creation_time() -> str:
    """Now as a manifest's ``created`` (UTC, whole seconds); ``$SOURCE_DATE_EPOCH`` if set (reproducible builds)."""
    epoch = os.environ.get(SOURCE_DATE_EPOCH_ENV, "").strip()
    try:
        seconds = int(epoch) if epoch else time.time()
    except ValueError:
        raise InvalidInputError(f"${SOURCE_DATE_EPOCH_ENV}: expected seconds since 1970, not {epoch!r}") from None
    return time.strftime(CREATED_FORMAT, time.gmtime(seconds))


def _current_if_same(target: Registry, ref: Ref, manifest: Manifest) -> str | None:
    """The id ``ref`` points at when that manifest is this one but for its creation time, else None.

    Pushing the same model to the same ref again is then a no-op (same manifest id, nothing
    written) instead of a new version that differs only in its date.
    """
    try:
        current_id = target.resolve(ref)
        current = target.get_manifest(current_id)
    except (NotFoundError, PermissionError):
        # A write-only token may not read the ref it replaces: push on, and let the write's own check judge it.
        return None
    return str(current_id) if _without_time(current) == _without_time(manifest) else None


def _without_time(manifest: Manifest) -> bytes:
    doc = manifest.to_json()
    doc.pop("created", None)
    return canonical_json.dumps(doc)


def _upload_files(
    model: ModelFiles, target: Registry
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
    target: Registry,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    **options: Any,
) -> PushReport:
    """Scan ``src`` (validating every header before anything is written), then push it.

    ``include``/``exclude``: globs on the folder's file paths (``scan_model``).

    The push holds a lease from before its first upload until its ref is set, so that
    gc never deletes an object it found already stored and skipped (DESIGN invariant 6).
    """
    model = scan_model(src, include, exclude)
    target.check_writable()  # before the lease: a store of a newer format gets nothing written, not even that
    with target.push_lease(f"push {ref}"):
        report = push_model(model, ref, target, **options)
    return replace(report, skipped_files=dict(model.skipped))

