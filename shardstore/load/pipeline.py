"""The load pipeline: :mod:`shardstore.repo.read_path` with sinks that hold tensors.

The stages (fetch → decode → place) and their bounds are the read path's; this module adds
where a piece goes when it becomes a tensor:

* on the host (``cpu``) a piece is decoded straight into its final tensor, so nothing is held twice;
* on a CUDA device it is decoded into one of a few pinned staging buffers and copied with
  ``non_blocking=True`` on a side stream, so the device receives each piece as soon as it is
  decoded while the threads go on decoding the next ones. A staging buffer is reused only once
  the copy out of it has finished (its CUDA event);
* ``meta`` tensors are only shaped: nothing is fetched for them.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch

from shardstore.load.tensors import as_tensor, torch_dtype
from shardstore.repo.pieces import ShardLookup
from shardstore.repo.read_path import PipelineStats, Placement, Sink, read_pieces
from shardstore.repo.registry import ShardSource

# Re-exported: what loader, view and the cooperative loader build their plans from.
__all__ = ["PipelineStats", "Placement", "TensorSink", "run_pipeline"]


class TensorSink(Sink, Protocol):
    """A sink whose placements become tensors (None: a sink, such as a file, that returns none)."""

    def tensor(self, placement: Placement) -> torch.Tensor | None: ...


class _HostSink(TensorSink):
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


class _MetaSink(TensorSink):
    """Shapes and dtypes only, for planning: nothing is fetched."""

    def allocate(self, placement: Placement) -> None:
        pass

    def target(self, placement: Placement, start: int, stop: int) -> Any:
        raise AssertionError("meta tensors have no pieces to write")

    def finish(self, stats: PipelineStats) -> None:
        pass

    def tensor(self, placement: Placement) -> torch.Tensor:
        return torch.empty(placement.shape, dtype=torch_dtype(placement.record.dtype), device="meta")


class _CudaSink(TensorSink):
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


def _staging_bytes(placements: Sequence[Placement], device: str) -> int:
    """The largest single write to ``device``: what one staging buffer must hold."""
    largest = 0
    for placement in placements:
        if placement.device == device:
            for piece in placement.pieces():
                start, stop = placement.span(piece)
                largest = max(largest, stop - start)
    return largest


def _sink_for(device: str, placements: Sequence[Placement], threads: int) -> TensorSink:
    if device == "cpu":
        return _HostSink()
    if device == "meta":
        return _MetaSink()
    # Enough staging buffers that every decoding thread has one while earlier copies are in flight.
    return _CudaSink(device, slots=2 * threads, slot_bytes=_staging_bytes(placements, device))


def run_pipeline(source: ShardSource, placements: Sequence[Placement], *, lookup: ShardLookup, threads: int,
                 progress: Callable[[int], None] | None = None,
                 sinks: Mapping[str, TensorSink] | None = None) -> tuple[dict[str, torch.Tensor], PipelineStats]:
    """Load ``placements`` (in the order the devices should receive them); tensors come back by name.

    ``sinks``: device name -> where its pieces go, for devices other than cpu, meta and
    cuda:N; tensors of a sink that makes none are not returned.
    """
    started = time.perf_counter()
    stats = PipelineStats()
    chosen = _allocate(placements, threads, stats, sinks)
    read_pieces(source, placements, chosen, lookup=lookup, threads=threads, stats=stats, progress=progress)
    return _finish(placements, chosen, stats, started), stats


def _allocate(placements: Sequence[Placement], threads: int, stats: PipelineStats,
              sinks: Mapping[str, TensorSink] | None = None) -> dict[str, TensorSink]:
    """Every placement's buffer, in its device's sink (``sinks`` first, else the device's own), counted in ``stats``."""
    chosen = dict(sinks or {})
    for placement in placements:
        if placement.device not in chosen:
            chosen[placement.device] = _sink_for(placement.device, placements, threads)
        chosen[placement.device].allocate(placement)
        stats.bytes_by_device[placement.device] = stats.bytes_by_device.get(placement.device, 0) + placement.nbytes
    return chosen


def _finish(placements: Sequence[Placement], sinks: Mapping[str, TensorSink], stats: PipelineStats,
            started: float) -> dict[str, torch.Tensor]:
    """Let every sink finish (copies to devices, files closed); the tensors by name, and the time in ``stats``."""
    for sink in sinks.values():
        sink.finish(stats)
    tensors = {p.name: t for p in placements if (t := sinks[p.device].tensor(p)) is not None}
    stats.seconds = time.perf_counter() - started
    return tensors
