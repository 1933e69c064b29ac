"""The load pipeline: fetch shards → decode pieces in threads → place them on their devices.

Three stages overlap, each bounded:

* **fetch**: the source streams shards in first-use order (a store keeps a few
  requests in flight; the gRPC client has a receiver thread and a small queue);
* **decode**: :func:`~shardstore.repo.pool.ordered_map` decodes up to
  ``2 * threads`` shards at once, every piece through
  :func:`~shardstore.repo.pieces.decode_piece`;
* **place**: on the host (``cpu``) a piece is decoded straight into its final
  tensor, so nothing is held twice; on a CUDA device it is decoded into one of a
  few pinned staging buffers and copied with ``non_blocking=True`` on a side
  stream, so the device receives each piece as soon as it is decoded while the
  threads go on decoding the next ones. A staging buffer is reused only once the
  copy out of it has finished (its CUDA event). ``meta`` tensors are only
  shaped: nothing is fetched for them.

A piece that is only partly wanted (a tensor-parallel slice) is decoded into a
temporary buffer of that one piece and the wanted rows or columns copied out,
so a column slice never holds more than one piece of the full tensor.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from shardstore.format.dtypes import nbytes
from shardstore.format.manifest import PieceRef, TensorRecord
from shardstore.format.shard import Shard, parse_shard
from shardstore.load.tensor_parallel import Cut
from shardstore.load.tensors import as_tensor, torch_dtype
from shardstore.repo.pieces import ShardLookup, decode_piece
from shardstore.repo.pool import ordered_map
from shardstore.repo.registry import ShardData, ShardSource


@dataclass(frozen=True)
class Placement:
    """One tensor to load: all of it or a tensor-parallel cut of it, onto one device."""

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


@dataclass
class PipelineStats:
    seconds: float = 0.0
    bytes_by_device: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    pieces: int = 0
    # CUDA only: device copies already finished when the last piece was decoded (> 0: copy overlapped decode).
    copies: int = 0
    copies_done_before_decode_end: int = 0


class _Sink(Protocol):
    def allocate(self, placement: Placement) -> None: ...

    def target(self, placement: Placement, start: int, stop: int) -> Any: ...

    def finish(self, stats: PipelineStats) -> None: ...

    def tensor(self, placement: Placement) -> torch.Tensor | None: ...


class FileSink:
    """Pieces written into files at their final offsets (pull): no tensor is ever held whole.

    Each piece is decoded into a scratch buffer of the worker thread's own, reused
    from piece to piece, then written with ``pwrite``; memory holds one piece per
    thread whatever the model's size.
    """

    def __init__(self, offsets: Mapping[str, tuple[int, int]]) -> None:
        self._offsets = offsets  # tensor name -> (file descriptor, offset of its data)
        self._scratch = threading.local()

    def allocate(self, placement: Placement) -> None:
        pass

    @contextmanager
    def target(self, placement: Placement, start: int, stop: int) -> Iterator[memoryview]:
        size = stop - start
        scratch: bytearray | None = getattr(self._scratch, "buffer", None)
        if scratch is None or len(scratch) < size:
            scratch = self._scratch.buffer = bytearray(size)
        view = memoryview(scratch)[:size]
        yield view
        fd, offset = self._offsets[placement.name]
        written = 0
        while written < size:
            written += os.pwrite(fd, view[written:], offset + start + written)

    def finish(self, stats: PipelineStats) -> None:
        pass

    def tensor(self, placement: Placement) -> torch.Tensor | None:
        return None


class _HostSink:
    """Final tensors in host memory; pieces decode straight into them."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray[Any, Any]] = {}

    def allocate(self, placement: Placement) -> None:
        self._buffers[placement.name] = np.empty(placement.nbytes, dtype=np.uint8)

    @contextmanager
    def target(self, placement: Placement, start: int, stop: int) -> Iterator[memoryview]:
        yield memoryview(self._buffers[placement.name].data)[start:stop]

    def finish(self, stats: PipelineStats) -> None:
        pass

    def tensor(self, placement: Placement) -> torch.Tensor:
        return as_tensor(self._buffers[placement.name], placement.record.dtype).reshape(placement.shape)


class _MetaSink:
    """Shapes and dtypes only, for planning: nothing is fetched."""

    def allocate(self, placement: Placement) -> None:
        pass

    def target(self, placement: Placement, start: int, stop: int) -> Any:
        raise AssertionError("meta tensors have no pieces to write")

    def finish(self, stats: PipelineStats) -> None:
        pass

    def tensor(self, placement: Placement) -> torch.Tensor:
        return torch.empty(placement.shape, dtype=torch_dtype(placement.record.dtype), device="meta")


class _CudaSink:
    """Final tensors on one CUDA device, filled from pinned staging buffers by copies on a side stream."""

    def __init__(self, device: str, slots: int, slot_bytes: int) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        # The allocator may hand us memory that work queued on the default stream still uses.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._flat: dict[str, torch.Tensor] = {}
        self._events: list[torch.cuda.Event] = []
        self._free: queue.Queue[tuple[torch.Tensor, torch.cuda.Event | None]] = queue.Queue()
        for _ in range(slots):
            self._free.put((torch.empty(max(1, slot_bytes), dtype=torch.uint8, pin_memory=True), None))

    def allocate(self, placement: Placement) -> None:
        self._flat[placement.name] = torch.empty(placement.nbytes, dtype=torch.uint8, device=self.device)

    @contextmanager
    def target(self, placement: Placement, start: int, stop: int) -> Iterator[memoryview]:
        slot, event = self._free.get()
        try:
            if event is not None:
                event.synchronize()  # the previous copy out of this slot is done
            staging = slot[: stop - start]
            yield memoryview(staging.numpy().data)
            with torch.cuda.stream(self.stream):
                self._flat[placement.name][start:stop].copy_(staging, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self.stream)
            self._events.append(event)
        finally:
            self._free.put((slot, event))

    def finish(self, stats: PipelineStats) -> None:
        stats.copies += len(self._events)
        stats.copies_done_before_decode_end += sum(bool(e.query()) for e in self._events)  # type: ignore[no-untyped-call]
        self.stream.synchronize()

    def tensor(self, placement: Placement) -> torch.Tensor:
        flat = self._flat[placement.name]
        return flat.view(torch_dtype(placement.record.dtype)).reshape(placement.shape)


def _write(sink: _Sink, placement: Placement, piece: PieceRef, shard: Shard, lookup: ShardLookup) -> int:
    """Put the wanted part of one piece in place; returns the bytes written."""
    first, last = placement.rows
    lo, hi = max(first, piece.rows[0]), min(last, piece.rows[1])
    out_row = placement.out_row_bytes
    start, stop = (lo - first) * out_row, (hi - first) * out_row
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


def _staging_bytes(placements: Sequence[Placement], device: str) -> int:
    """The largest single write to ``device``: what one staging buffer must hold."""
    largest = 0
    for placement in placements:
        if placement.device == device:
            for piece in placement.pieces():
                rows = min(placement.rows[1], piece.rows[1]) - max(placement.rows[0], piece.rows[0])
                largest = max(largest, rows * placement.out_row_bytes)
    return largest


def _sink_for(device: str, placements: Sequence[Placement], threads: int) -> _Sink:
    if device == "cpu":
        return _HostSink()
    if device == "meta":
        return _MetaSink()
    # Enough staging buffers that every decoding thread has one while earlier copies are in flight.
    return _CudaSink(device, slots=2 * threads, slot_bytes=_staging_bytes(placements, device))


def run_pipeline(source: ShardSource, placements: Sequence[Placement], *, lookup: ShardLookup, threads: int,
                 progress: Callable[[int], None] | None = None,
                 sinks: Mapping[str, _Sink] | None = None) -> tuple[dict[str, torch.Tensor], PipelineStats]:
    """Load ``placements`` (in the order the devices should receive them); tensors come back by name.

    ``sinks``: device name -> where its pieces go, for devices other than cpu, meta and
    cuda:N (pull passes a :class:`FileSink`); their tensors are not returned.
    """
    started = time.perf_counter()
    stats = PipelineStats()
    sinks = _allocate(placements, threads, stats, sinks)

    work: dict[str, list[tuple[Placement, PieceRef]]] = {}
    for placement in placements:
        if placement.device != "meta":
            for piece in placement.pieces():
                work.setdefault(piece.shard, []).append((placement, piece))

    def place_shard(item: tuple[str, ShardData]) -> int:
        shard_id, data = item
        shard = parse_shard(data, shard_id, verify_id=False)  # the source checked the id
        return sum(_write(sinks[p.device], p, piece, shard, lookup) for p, piece in work[shard_id])

    for written in ordered_map(place_shard, source.fetch_shards(work), threads):
        stats.shards += 1
        if progress is not None:
            progress(written)
    stats.pieces = sum(len(items) for items in work.values())
    return _finish(placements, sinks, stats, started), stats


def _allocate(placements: Sequence[Placement], threads: int, stats: PipelineStats,
              sinks: Mapping[str, _Sink] | None = None) -> dict[str, _Sink]:
    """Every placement's buffer, in its device's sink (``sinks`` first, else the device's own), counted in ``stats``."""
    chosen = dict(sinks or {})
    for placement in placements:
        if placement.device not in chosen:
            chosen[placement.device] = _sink_for(placement.device, placements, threads)
        chosen[placement.device].allocate(placement)
        stats.bytes_by_device[placement.device] = stats.bytes_by_device.get(placement.device, 0) + placement.nbytes
    return chosen


def _finish(placements: Sequence[Placement], sinks: Mapping[str, _Sink], stats: PipelineStats,
            started: float) -> dict[str, torch.Tensor]:
    """Let every sink finish (copies to devices, files closed); the tensors by name, and the time in ``stats``."""
    for sink in sinks.values():
        sink.finish(stats)
    tensors = {p.name: t for p in placements if (t := sinks[p.device].tensor(p)) is not None}
    stats.seconds = time.perf_counter() - started
    return tensors
