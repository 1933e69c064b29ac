"""The one read pipeline, without torch: fetch shards → (checked by the source) → decode each piece into place.

Every reader runs it: ``pull`` with a :class:`FileSink` (pieces written into files at their final
offsets, so ``pull`` works in an install without torch), the loader (``load/pipeline.py``) with
sinks that hold tensors in host or device memory, the cooperative loader with sinks that are
slices of a send buffer.

Stages overlap, each bounded:

* **fetch**: the source yields checked shards in first-use order, a few ahead (a local store
  reads and hashes on every core into pooled buffers; the gRPC client has a receiver thread
  and a small queue);
* **decode**: :func:`~shardstore.repo.pool.ordered_map` decodes up to ``2 * threads`` shards at
  once, every piece through :func:`~shardstore.repo.pieces.decode_piece`, straight into the
  buffer its sink gives for it;
* **place**: the sink's ``target`` context says where a piece's bytes go and does what follows
  (a file write, a device copy).

A piece only partly wanted (a tensor-parallel slice) is decoded into a temporary buffer of that
one piece and the wanted rows or columns copied out, so a column slice never holds more than one
piece of the full tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from shardstore.buffers import READ_BUFFERS
from shardstore.direct_io import DirectWriter
from shardstore.format.dtypes import nbytes
from shardstore.format.manifest import PieceRef, TensorRecord
from shardstore.format.shard import Shard, parse_shard
from shardstore.repo.pieces import ShardLookup, decode_piece
from shardstore.repo.pool import ordered_map
from shardstore.repo.registry import ShardData, ShardSource


@dataclass(frozen=True)
class Cut:
    """The part ``[start, stop)`` of dim ``dim`` of a tensor that one rank loads."""

    dim: int
    start: int
    stop: int

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        return (*full[: self.dim], self.stop - self.start, *full[self.dim + 1 :])


@dataclass(frozen=True)
class Placement:
    """One tensor to read: all of it or a tensor-parallel cut of it, into one sink ("device")."""

    name: str
    record: TensorRecord
    device: str
    cut: Cut | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.cut.shape(self.record.shape) if self.cut else self.record.shape

    @property
    def nbytes(self) -> int:
        return nbytes(self.record.dtype, self.shape)

    @property
    def rows(self) -> tuple[int, int]:
        """The rows along dim 0 that hold what is wanted."""
        if self.cut is not None and self.cut.dim == 0:
            return self.cut.start, self.cut.stop
        return 0, self.record.rows

    @property
    def out_row_bytes(self) -> int:
        """Bytes of one dim-0 row of the output."""
        if self.cut is not None and self.cut.dim == 1:
            return nbytes(self.record.dtype, self.shape[1:])
        return self.record.row_bytes

    def pieces(self) -> list[PieceRef]:
        return self.record.pieces_for_rows(*self.rows) if self.nbytes else []

    def wanted_rows(self, piece: PieceRef) -> tuple[int, int]:
        """The rows [lo, hi) of ``piece`` that this placement wants (all of them unless a dim-0 cut ends inside it)."""
        first, last = self.rows
        return max(first, piece.rows[0]), min(last, piece.rows[1])

    def span(self, piece: PieceRef) -> tuple[int, int]:
        """Where the wanted part of ``piece`` goes: bytes [start, stop) of this placement's output."""
        lo, hi = self.wanted_rows(piece)
        first = self.rows[0]
        return (lo - first) * self.out_row_bytes, (hi - first) * self.out_row_bytes


@dataclass
class PipelineStats:
    seconds: float = 0.0
    bytes_by_device: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    pieces: int = 0
    # CUDA only: device copies already finished when the last piece was decoded (> 0: copy overlapped decode).
    copies: int = 0
    copies_done_before_decode_end: int = 0


class PieceTarget(Protocol):
    """Where the bytes of one piece go: ``target`` yields a writable buffer of ``stop - start`` bytes."""

    def target(self, placement: Placement, start: int, stop: int) -> AbstractContextManager[memoryview]: ...


class Sink(PieceTarget, Protocol):
    """The destination of one device's placements: buffers made up front, finished at the end."""

    def allocate(self, placement: Placement) -> None: ...

    def finish(self, stats: PipelineStats) -> None: ...

    def gather(self, pieces: Sequence[tuple[Placement, PieceRef]]) -> PieceTarget:
        """Where the pieces of one shard go, given all of them first, in the order they will be placed.

        Part of the protocol: a sink class that subclasses :class:`Sink` inherits this default, one
        that only matches the protocol's shape must define it.

        A sink that can do better with a shard's pieces together than one by one (a file: one
        write for pieces that lie end to end) returns a target of its own; by default each piece
        goes straight through :meth:`target`.
        """
        return self


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """OS errors of a write carry the file they hit: ``os.pwrite`` on a full disk says only ENOSPC."""
    try:
        yield
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


@dataclass(frozen=True)
class FileSpot:
    """Where a tensor's data goes in a file being written: its writer, the data's offset, its name for errors."""

    writer: DirectWriter
    offset: int
    path: Path


# The most bytes one gathered file write holds (FileSink.gather): past ~2 MiB a write runs at the
# disk's full speed, and each worker holds at most one such buffer.
GATHER_BYTES = 8 << 20


class FileSink(Sink):
    """Pieces written into files at their final offsets (pull): no tensor is ever held whole.

    Each piece is decoded into a scratch buffer taken from the read-buffer pool (already
    faulted in, reused from pull to pull), then written; memory holds one piece (or one
    gathered run, below) per worker whatever the model's size. The scratch is page-aligned and the piece placed in
    it at its file offset's place within a page, so the whole pages of a piece can be written
    straight to the disk, past the page cache (:mod:`shardstore.direct_io`).

    A shard's pieces mostly lie end to end in one file (chunking packs tensors in file order), so
    :meth:`gather` decodes such a run of pieces into one scratch buffer and writes it at once: a
    model of many small tensors would otherwise send the disk many small writes, which this VM's
    disk takes at half the speed of large ones (docs/design.md, "Where pulled bytes land").
    """

    def __init__(self, spots: Mapping[str, FileSpot]) -> None:
        self._spots = spots  # tensor name -> where its data goes

    def allocate(self, placement: Placement) -> None:
        pass

    @contextmanager
    def target(self, placement: Placement, start: int, stop: int) -> Iterator[memoryview]:
        spot = self._spots[placement.name]
        view = _scratch(spot.writer, spot.offset + start, stop - start)
        yield view
        with naming(spot.path):
            spot.writer.write_at(view, spot.offset + start)

    def gather(self, pieces: Sequence[tuple[Placement, PieceRef]]) -> PieceTarget:
        return _GatheredWrites(self._spots, pieces, self)

    def finish(self, stats: PipelineStats) -> None:
        pass


def _scratch(writer: DirectWriter, at: int, size: int) -> memoryview:
    """A pooled buffer for ``size`` bytes bound for file offset ``at``, placed as they will sit in the file's pages."""
    lead = at % writer.align
    return READ_BUFFERS.take(lead + size)[lead:]


@dataclass
class _Run:
    """Pieces that lie end to end in one file: written with one call once the last of them is decoded."""

    spot: FileSpot
    at: int  # file offset of the first byte
    size: int = 0
    left: int = 0  # pieces not yet decoded
    buffer: memoryview | None = None


class _GatheredWrites:
    """The target :meth:`FileSink.gather` gives one worker for one shard's pieces (used by that worker alone).

    Runs are made of pieces that follow one another in the order given and end to end in one
    file, each run at most :data:`GATHER_BYTES` (a larger piece stands alone). A run's buffer is
    taken when its first piece is decoded and written and dropped after its last, so a worker
    holds one run at a time. A piece that fails to decode leaves its run unwritten (the pull fails).
    """

    def __init__(self, spots: Mapping[str, FileSpot], pieces: Sequence[tuple[Placement, PieceRef]],
                 alone: PieceTarget) -> None:
        self._alone = alone  # where a piece not given here goes
        self._runs: dict[tuple[str, int], tuple[_Run, int]] = {}  # (tensor, start) -> its run, offset in it
        run: _Run | None = None
        for placement, piece in pieces:
            spot = spots[placement.name]
            start, stop = placement.span(piece)
            if (placement.name, start) in self._runs:
                continue  # given twice (no pull does): planned once; entered again, it goes alone
            at = spot.offset + start
            joins = (run is not None and run.spot.writer is spot.writer and run.at + run.size == at
                     and run.size + (stop - start) <= GATHER_BYTES)
            if not joins:
                run = _Run(spot, at)
            assert run is not None
            self._runs[(placement.name, start)] = (run, run.size)
            run.size += stop - start
            run.left += 1

    @contextmanager
    def target(self, placement: Placement, start: int, stop: int) -> Iterator[memoryview]:
        # Taken out of the plan as it is entered, so a piece entered again is written alone and
        # cannot count twice toward its run (which would write the run with a piece still missing).
        # A piece given twice is planned once, so every run still counts each of its pieces once.
        planned = self._runs.pop((placement.name, start), None)
        if planned is None:  # not among the pieces gathered, or entered before: written alone
            with self._alone.target(placement, start, stop) as view:
                yield view
            return
        run, offset = planned
        if run.buffer is None:
            run.buffer = _scratch(run.spot.writer, run.at, run.size)
        try:
            yield run.buffer[offset : offset + stop - start]
        except BaseException:
            run.buffer = None  # never written: the file is removed with the failed pull
            raise
        run.left -= 1
        if run.left == 0:
            with naming(run.spot.path):
                run.spot.writer.write_at(run.buffer, run.at)
            run.buffer = None


def write_piece(sink: PieceTarget, placement: Placement, piece: PieceRef, shard: Shard, lookup: ShardLookup) -> int:
    """Put the wanted part of one piece in place; returns the bytes written."""
    lo, hi = placement.wanted_rows(piece)
    start, stop = placement.span(piece)
    cut = placement.cut
    with sink.target(placement, start, stop) as target:
        if (lo, hi) == piece.rows and (cut is None or cut.dim == 0):
            # The whole piece is wanted: decode in place.
            decode_piece(shard, piece, placement.record, target, lookup=lookup)
            return stop - start
        decoded = np.frombuffer(decode_piece(shard, piece, placement.record, lookup=lookup), dtype=np.uint8)
        record = placement.record
        if cut is not None and cut.dim == 1:
            # rows x columns x bytes of everything after dim 1, then the rank's columns.
            inner = nbytes(record.dtype, record.shape[2:])
            block = decoded.reshape(piece.rows[1] - piece.rows[0], record.shape[1], inner)
            wanted = block[lo - piece.rows[0] : hi - piece.rows[0], cut.start : cut.stop, :]
            np.copyto(np.frombuffer(target, dtype=np.uint8).reshape(wanted.shape), wanted)
        else:
            skip = (lo - piece.rows[0]) * record.row_bytes
            target[:] = decoded.data[skip : skip + (stop - start)]
    return stop - start


def by_device(items: Sequence[tuple[Placement, PieceRef]]) -> dict[str, list[tuple[Placement, PieceRef]]]:
    """A shard's pieces grouped by the sink they go to, each group in the order given."""
    groups: dict[str, list[tuple[Placement, PieceRef]]] = {}
    for placement, piece in items:
        groups.setdefault(placement.device, []).append((placement, piece))
    return groups


def read_pieces(source: ShardSource, placements: Sequence[Placement], sinks: Mapping[str, Sink], *,
                lookup: ShardLookup, threads: int, stats: PipelineStats,
                progress: Callable[[int], None] | None = None) -> None:
    """Fetch the shards holding ``placements``' pieces and write every piece through its device's sink.

    ``meta`` placements are skipped (nothing to fetch). The sinks' buffers must already exist.
    """
    work: dict[str, list[tuple[Placement, PieceRef]]] = {}
    for placement in placements:
        if placement.device != "meta":
            for piece in placement.pieces():
                work.setdefault(piece.shard, []).append((placement, piece))

    def place_shard(item: tuple[str, ShardData]) -> int:
        shard_id, data = item
        shard = parse_shard(data, shard_id, verify_id=False)  # the source checked the id
        written = 0
        for device, items in by_device(work[shard_id]).items():
            target = sinks[device].gather(items)
            written += sum(write_piece(target, p, piece, shard, lookup) for p, piece in items)
        return written

    for written in ordered_map(place_shard, source.fetch_shards(work), threads):
        stats.shards += 1
        if progress is not None:
            progress(written)
    stats.pieces += sum(len(items) for items in work.values())
