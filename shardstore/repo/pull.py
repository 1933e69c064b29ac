"""Pull: write a stored model back to disk as safetensors files plus its other files.

``weights=False`` writes only the other files (config.json, tokenizer...,
the index): what ``hf download REPO --exclude '*.safetensors'`` gives.

Shards are fetched in order, checked against their ids by the source, decoded in
threads and written with ``pwrite`` at each piece's final offset, so memory holds
only the shards in flight (DESIGN invariant 7) however large the model. Each
file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import wait
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from shardstore.direct_io import DirectWriter
from shardstore.errors import InvalidInputError, NotFoundError
from shardstore.format import canonical_json
from shardstore.format.manifest import BlobRecord, FileRecord, Manifest
from shardstore.format.safetensors_io import build_header
from shardstore.progress import ProgressCallback, progress_task
from shardstore.repo.model_files import INDEX_SUFFIX
from shardstore.repo.pieces import RecentShards
from shardstore.repo.pool import OrderedMap, default_threads, ordered_map, shared_pool
from shardstore.repo.read_path import FileSink, FileSpot, PipelineStats, Placement, naming, read_pieces
from shardstore.repo.refs import parse_ref
from shardstore.repo.registry import ModelSource, ShardData

# Objects fetched at once before and after the shards: safetensors headers, and non-tensor files of at
# most SMALL_BLOB_BYTES (larger ones one at a time). Over a link with a 20 ms round trip a folder of a
# dozen files otherwise waits a quarter of a second for them one by one. A header's size is not in the
# manifest, only capped (MAX_HEADER_BYTES): four in flight keep what a server can make us hold for
# headers to four caps, refused by id as each completes.
HEADERS_IN_FLIGHT = 4
SMALL_BLOBS_IN_FLIGHT = 8
SMALL_BLOB_BYTES = 8 << 20
# Small files fetched while the shards stream are held until the weights are written: at most this much.
PREFETCH_BLOB_BYTES = 64 << 20


@dataclass(frozen=True)
class PullReport:
    ref: str
    manifest_id: str
    dest: str
    tensors: int
    files: int
    raw_bytes: int
    transferred_bytes: int
    shards_fetched: int
    shards_cached: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def safe_path(dest: Path, rel: str) -> Path:
    """``dest/rel``, refusing paths from a manifest that would escape ``dest``."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\\" in rel:
        raise InvalidInputError(f"refusing unsafe file path {rel!r} in manifest")
    return dest.joinpath(*parts)


@dataclass
class _OpenFile:
    path: Path
    partial: Path
    fd: int
    offsets: dict[str, int]  # tensor name → absolute offset of its data in the file
    writer: DirectWriter


def _open_file(root: Path, record: FileRecord, manifest: Manifest, selected: set[str],
               header: bytes | None) -> _OpenFile:
    """``record``'s file created under a temporary name, its header written and its size set."""
    head, offsets = _layout(record, manifest, selected, header)
    path = safe_path(root, record.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    handle = _OpenFile(path, partial, fd, offsets, DirectWriter(fd, partial))
    size = len(head) + sum(manifest.tensors[n].raw_bytes for n in offsets)
    try:
        with naming(path):
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, size)
    except BaseException:
        handle.writer.close()
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return handle


class _OutputFiles(Mapping[str, FileSpot]):
    """Where each tensor goes: its file, opened once that file's header has come.

    The headers are asked for at once (:data:`HEADERS_IN_FLIGHT` at a time) and the shard stream
    starts without waiting for them. :meth:`fetch_shards` hands each shard on only once the files
    its pieces go to are open, waiting there for their headers; it runs on the thread that feeds
    the read pipeline (pull's own), so no pool worker ever waits for a fetch that may itself need
    a pool worker. Files open in file order, one thread only.
    """

    def __init__(self, source: ModelSource, root: Path, records: list[FileRecord], manifest: Manifest,
                 selected: set[str], header_of: Callable[[FileRecord], bytes | None]) -> None:
        self.source, self._root, self._records, self._manifest = source, root, records, manifest
        self._selected = selected
        self._headers = OrderedMap(header_of, records, HEADERS_IN_FLIGHT, window=HEADERS_IN_FLIGHT).start()
        self._next_header = iter(self._headers)
        self._file_of = {name: index for index, record in enumerate(records) for name in record.tensors
                         if name in selected}
        # The last file (in file order) each shard has a piece for: what must be open before it is decoded.
        self._last_file_of_shard: dict[str, int] = {}
        for name, index in self._file_of.items():
            for piece in manifest.tensors[name].pieces:
                self._last_file_of_shard[piece.shard] = max(index, self._last_file_of_shard.get(piece.shard, -1))
        self._spots: dict[str, FileSpot] = {}
        self._failed: BaseException | None = None
        self.opened: list[_OpenFile] = []

    def __getitem__(self, name: str) -> FileSpot:
        return self._spots[name]  # opened by fetch_shards before any piece of it was handed on

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def fetch_shards(self, shard_ids: Iterable[str]) -> Iterator[tuple[str, ShardData]]:
        """The source's shards, each handed on once the files of its pieces are open."""
        for shard_id, data in self.source.fetch_shards(shard_ids):
            self._open_through(self._last_file_of_shard.get(shard_id, -1))
            yield shard_id, data

    def _open_through(self, index: int) -> None:
        if self._failed is not None:
            raise self._failed  # a header was taken for a file that did not open: never give it to the next
        try:
            while len(self.opened) <= index:
                record = self._records[len(self.opened)]
                handle = _open_file(self._root, record, self._manifest, self._selected, next(self._next_header))
                self.opened.append(handle)
                for name, offset in handle.offsets.items():
                    self._spots[name] = FileSpot(handle.writer, offset, handle.path)
        except BaseException as exc:
            self._failed = exc
            raise

    def open_all(self) -> None:
        self._open_through(len(self._records) - 1)

    def close(self) -> None:
        """Stop the header fetches still running (a failed pull); the files are the caller's to close."""
        self._headers.close()


def _layout(
    record: FileRecord, manifest: Manifest, selected: set[str], header: bytes | None
) -> tuple[bytes, dict[str, int]]:
    """The header bytes to write and where each selected tensor's data goes."""
    names = [n for n in record.tensors if n in selected]
    if header is None:  # a subset: a fresh header for just these tensors
        records = [(n, manifest.tensors[n]) for n in names]
        entries = [(n, t.dtype, t.shape, t.raw_bytes) for n, t in records]
        head = build_header(entries, record.metadata)
    else:
        head = len(header).to_bytes(8, "little") + header
    offsets: dict[str, int] = {}
    position = len(head)
    for name in names:
        offsets[name] = position
        position += manifest.tensors[name].raw_bytes
    return head, offsets


def pull(
    source: ModelSource,
    ref_text: str,
    dest: str | os.PathLike[str],
    *,
    only: Iterable[str] | None = None,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    exclude: Iterable[str] | None = None,
    weights: bool = True,
) -> PullReport:
    """Write ``ref_text`` into ``dest``; ``weights=False`` writes only its other files (config, tokenizer...)."""
    started = time.perf_counter()
    received_before = source.transferred_bytes
    ref = parse_ref(ref_text)
    manifest_id = source.resolve(ref)
    manifest = source.get_manifest(manifest_id)
    return write_model(source, str(ref), manifest_id, manifest, dest, only=only, exclude=exclude, weights=weights,
                       threads=threads, progress=progress, started=started, received_before=received_before)


def write_model(
    source: ModelSource,
    ref: str,
    manifest_id: str,
    manifest: Manifest,
    dest: str | os.PathLike[str],
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    weights: bool = True,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    started: float | None = None,
    received_before: int | None = None,
) -> PullReport:
    """Write a resolved model's files into ``dest``: what :func:`pull` and ``snapshot`` share."""
    started = time.perf_counter() if started is None else started
    received_before = source.transferred_bytes if received_before is None else received_before
    # Sources with a local shard cache (the gRPC client) count what it served.
    cached_before = source.cached_shards
    patterns, excluded = list(only or []), list(exclude or [])
    selected_names = select_tensors(manifest, patterns, excluded) if weights else []
    if weights and (patterns or excluded) and not selected_names:
        less = f" less {' '.join(excluded)}" if excluded else ""
        raise NotFoundError(f"{ref}: no tensor matches {' '.join(patterns) or '*'}{less}")
    selected = set(selected_names)
    # Without weights the index stays as pushed (hf download --exclude '*.safetensors' keeps it too).
    subset = weights and len(selected_names) < len(manifest.tensors)
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)

    records = [r for r in manifest.files if selected.intersection(r.tensors)]

    def original_header(record: FileRecord) -> bytes | None:
        # A file pulled whole gets its header back byte for byte; a subset gets a fresh one.
        return source.get_blob(record.header) if selected.issuperset(record.tensors) else None

    wanted_blobs = _wanted_blobs(manifest, excluded)
    outputs: _OutputFiles | None = None
    early: _BlobPrefetch | None = None
    open_files: list[_OpenFile] = []
    try:
        # Headers are asked for first and the shard stream starts while they come: over a real link
        # each is a round trip, and they now overlap.
        outputs = _OutputFiles(source, root, records, manifest, selected, original_header)
        open_files = outputs.opened
        # The small files come while the shards stream (their round trips hidden behind it), and are
        # written only once the weights are complete, as before.
        early = _BlobPrefetch(source, wanted_blobs) if selected_names else None
        fetched = _write_tensors(outputs, manifest, selected_names, threads, progress, ref) if selected_names else 0
        outputs.open_all()  # a file none of whose pieces were written (empty tensors) still gets its header
        for handle in open_files:
            handle.writer.close()
            with naming(handle.path):
                os.fsync(handle.fd)
                os.close(handle.fd)
                handle.fd = -1
                os.replace(handle.partial, handle.path)
    finally:
        if outputs is not None:
            outputs.close()
        if early is not None:
            early.settle()
        for handle in open_files:
            handle.writer.close()
            if handle.fd >= 0:
                os.close(handle.fd)
                with contextlib.suppress(FileNotFoundError):
                    handle.partial.unlink()

    _write_blobs(source, wanted_blobs, root, selected if subset else None, early.result() if early else {})
    cached = source.cached_shards - cached_before
    return PullReport(
        ref=ref,
        manifest_id=manifest_id,
        dest=str(root),
        tensors=len(selected_names),
        files=len(open_files) + len(wanted_blobs),
        raw_bytes=sum(manifest.tensors[n].raw_bytes for n in selected_names),
        transferred_bytes=source.transferred_bytes - received_before,
        shards_fetched=fetched - cached,
        shards_cached=cached,
        seconds=round(time.perf_counter() - started, 3),
    )


def _write_tensors(
    outputs: _OutputFiles,
    manifest: Manifest,
    names: list[str],
    threads: int | None,
    progress: ProgressCallback | None,
    label: str,
) -> int:
    """Every tensor's data into its file, through the read path every loader runs; returns the shards read."""
    sink = FileSink(outputs)
    placements = [Placement(name, manifest.tensors[name], "file") for name in names]
    stats = PipelineStats()
    advance = progress_task(progress, f"pull {label}", sum(manifest.tensors[n].raw_bytes for n in names))
    # A delta's pieces mostly read the same few base shards: keep the recent ones parsed. Twice as many
    # pieces in flight as threads (a one-thread pull stays one): each spends part of its time waiting
    # for the disk to take its write.
    workers = threads or default_threads()
    read_pieces(outputs, placements, {"file": sink}, lookup=RecentShards(outputs.source),
                threads=2 * workers if workers > 1 else 1, stats=stats, progress=advance)
    return stats.shards


def _matches(text: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(text, p) for p in patterns)


def select_tensors(manifest: Manifest, include: list[str], exclude: list[str]) -> list[str]:
    """Tensor names (file order) matching an ``include`` glob (all when none) and no ``exclude`` glob.

    A glob matches a tensor's name or the path (or name) of the safetensors file that holds it, so
    ``--include 'encoder.layer.2.*'`` and ``--exclude 'model-00002-of-00002.safetensors'`` both work.
    """
    chosen: list[str] = []
    for record in manifest.files:
        file_names = (record.path, record.path.rsplit("/", 1)[-1])
        for name in record.tensors:
            keys = (name, *file_names)
            if include and not any(_matches(key, include) for key in keys):
                continue
            if any(_matches(key, exclude) for key in keys):
                continue
            chosen.append(name)
    return chosen


def _wanted_blobs(manifest: Manifest, exclude: list[str]) -> list[tuple[str, BlobRecord]]:
    """The non-tensor files to write: all but those ``exclude`` matches (by path or name)."""
    return [(rel, blob) for rel, blob in manifest.blobs.items()
            if not (_matches(rel, exclude) or _matches(rel.rsplit("/", 1)[-1], exclude))]


class _BlobPrefetch:
    """The small non-tensor files, fetched in the background (several at once) while the shards stream.

    Only files of at most :data:`SMALL_BLOB_BYTES`, and no more than :data:`PREFETCH_BLOB_BYTES` of
    them in all, are held: the rest are fetched when they are written.
    """

    def __init__(self, source: ModelSource, wanted: list[tuple[str, BlobRecord]]) -> None:
        ids: list[str] = []
        held = 0
        for _rel, blob in wanted:
            if blob.size <= SMALL_BLOB_BYTES and held + blob.size <= PREFETCH_BLOB_BYTES and blob.id not in ids:
                ids.append(blob.id)
                held += blob.size
        self._future = shared_pool().submit(self._fetch, source, ids) if ids else None

    @staticmethod
    def _fetch(source: ModelSource, ids: list[str]) -> dict[str, bytes]:
        return dict(zip(ids, ordered_map(source.get_blob, ids, SMALL_BLOBS_IN_FLIGHT, window=SMALL_BLOBS_IN_FLIGHT),
                        strict=True))

    def settle(self) -> None:
        """Wait for the fetches (a pull that fails must not leave them running); their error waits for result()."""
        if self._future is not None:
            wait([self._future])

    def result(self) -> dict[str, bytes]:
        return self._future.result() if self._future is not None else {}


def _write_blobs(source: ModelSource, wanted: list[tuple[str, BlobRecord]], root: Path, subset: set[str] | None,
                 prefetched: Mapping[str, bytes]) -> None:
    """The non-tensor files, each under a temporary name renamed into place.

    A Hugging Face folder holds a dozen small files (config, tokenizer, README...). Those not
    already prefetched are fetched several at once (each a round trip over a real link); larger
    ones one at a time, so at most :data:`SMALL_BLOBS_IN_FLIGHT` small blobs and one large one are
    held at once beyond the prefetched ones.
    """
    def write(item: tuple[str, BlobRecord]) -> None:
        rel, blob = item
        data = prefetched[blob.id] if blob.id in prefetched else source.get_blob(blob.id)
        _write_blob(root, rel, data, subset)

    small: list[tuple[str, BlobRecord]] = []
    large: list[tuple[str, BlobRecord]] = []
    for item in wanted:
        (small if item[1].size <= SMALL_BLOB_BYTES else large).append(item)
    for _ in ordered_map(write, small, SMALL_BLOBS_IN_FLIGHT, window=SMALL_BLOBS_IN_FLIGHT):
        pass
    for item in large:
        write(item)


def _write_blob(root: Path, rel: str, data: bytes, subset: set[str] | None) -> None:
    """One non-tensor file, written under a temporary name and renamed into place."""
    if subset is not None and rel.endswith(INDEX_SUFFIX):
        data = _filtered_index(data, subset, rel)
    path = safe_path(root, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with naming(path):
            partial.write_bytes(data)
            os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _filtered_index(data: bytes, subset: set[str], rel: str) -> bytes:
    """An index whose weight_map names only the tensors pulled, so loaders don't look for the rest."""
    doc = canonical_json.loads(data, rel)
    if isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict):
        doc["weight_map"] = {k: v for k, v in doc["weight_map"].items() if k in subset}
    return canonical_json.dumps(doc)
