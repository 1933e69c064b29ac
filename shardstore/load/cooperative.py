"""Cooperative loading: the ranks of a ``torch.distributed`` group fetch each shard once and exchange pieces.

``state_dict(..., group=g)`` and ``load_into(..., group=g)`` come here instead of the plain
pipeline when every rank of ``g`` loads the same model (each with its own device map and
tensor-parallel cut). Without it N ranks fetch and decode every shard N times; with it:

1. every rank says what it needs (tensor names and tensor-parallel cuts, ``all_gather_object``);
   from that every rank computes the same plan, so no further coordination is needed;
2. each shard that any rank needs gets one **owner**: shards are dealt out in order, to the
   least-loaded rank (by stored bytes), preferring a rank that needs the shard itself;
3. each rank fetches only the shards it owns (through its own source: the server, a mirror,
   signed URLs, its disk cache, all verified as usual), decodes each piece once, and cuts
   from it exactly the rows or columns each rank needs (the same cut code the plain pipeline
   runs, so a rank's tensor-parallel slice is what it would have loaded alone);
4. the cut pieces travel in one ``all_to_all_single`` per round of at most
   :data:`ROUND_BYTES` (bounded memory on every rank), over whatever backend the group has:
   NCCL between GPUs (the buffers then live on the rank's current CUDA device), gloo on CPU.

What moves between ranks is decoded bytes, not shards: every piece is decoded once in the whole
group, and a rank receives only its own rows of a row-split tensor. The registry sends each shard
once per group instead of once per rank.

A delta piece's base shard (``push --base``) is read through the owner's own lookup, so a group
may fetch such a base shard more than once; plain models are fetched exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shardstore.errors import InvalidInputError
from shardstore.format.digest import digest
from shardstore.format.manifest import Manifest, PieceRef
from shardstore.format.shard import parse_shard
from shardstore.load.pipeline import TensorSink, _allocate, _finish
from shardstore.repo.pieces import ShardLookup
from shardstore.repo.pool import ordered_map
from shardstore.repo.read_path import Cut, PipelineStats, Placement, write_piece
from shardstore.repo.registry import ModelSource, ShardData

# Bytes one rank sends or receives per exchange round: big enough that a round's latency is noise,
# small enough that the send and receive buffers stay a small fraction of any real model.
ROUND_BYTES = 256 << 20

# A rank's need: (tensor name, (dim, start, stop) of its tensor-parallel cut or None for all of it).
_Need = tuple[str, tuple[int, int, int] | None]


@dataclass(frozen=True)
class _Item:
    """One rank's wanted part of one piece: where it goes and how many bytes it is."""

    rank: int
    placement: Placement
    piece: PieceRef

    @property
    def span(self) -> tuple[int, int]:
        """[start, stop) of the part within the rank's output tensor (where write_piece puts it)."""
        return self.placement.span(self.piece)

    @property
    def nbytes(self) -> int:
        start, stop = self.span
        return stop - start


@dataclass
class CooperativeStats:
    """What one rank did in a cooperative load (``LoadResult.cooperative``)."""

    rank: int
    world_size: int
    shards_owned: int = 0  # shards this rank fetched and decoded for the group
    shards_needed: int = 0  # shards holding something this rank loads
    sent_bytes: int = 0  # decoded bytes sent to other ranks
    received_bytes: int = 0  # decoded bytes received from other ranks
    rounds: int = 0


class _Into:
    """A sink that is one preallocated slice of a send buffer (for read_path.write_piece)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view

    @contextmanager
    def target(self, placement: Placement, start: int, stop: int) -> Iterator[memoryview]:
        assert stop - start == len(self.view), "send slot and piece disagree"
        yield self.view


def _placement_for(manifest: Manifest, need: _Need) -> Placement:
    name, cut = need
    return Placement(name, manifest.tensors[name], "cpu", Cut(*cut) if cut is not None else None)


def _owners(shards: Sequence[str], sizes: dict[str, int], needers: dict[str, set[int]], world: int) -> dict[str, int]:
    """Each shard's owner: the least-loaded rank, or a rank needing it when that costs at most one shard more."""
    load = [0] * world
    owner: dict[str, int] = {}
    for shard_id in shards:
        size = sizes.get(shard_id, 1)
        least = min(range(world), key=lambda r: (load[r], r))
        near = [r for r in sorted(needers[shard_id]) if load[r] <= load[least] + size]
        chosen = min(near, key=lambda r: (load[r], r)) if near else least
        owner[shard_id] = chosen
        load[chosen] += size
    return owner


def _rounds(shards: Sequence[str], items: dict[str, list[_Item]], owner: dict[str, int]) -> list[list[str]]:
    """Consecutive runs of shards whose exchanged bytes stay near :data:`ROUND_BYTES` per round."""
    rounds: list[list[str]] = [[]]
    moved = 0
    for shard_id in shards:
        size = sum(i.nbytes for i in items[shard_id] if i.rank != owner[shard_id])
        if rounds[-1] and moved + size > ROUND_BYTES:
            rounds.append([])
            moved = 0
        rounds[-1].append(shard_id)
        moved += size
    return rounds


def check_group(group: Any) -> None:
    """Refuse, with one line, a group that torch.distributed cannot use."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InvalidInputError("group=: torch.distributed is not initialized (call init_process_group first)")
    if dist.get_rank(group) < 0:
        raise InvalidInputError("group=: this process is not a member of the group")


def run_cooperative(source: ModelSource, manifest: Manifest, placements: Sequence[Placement], *,
                    lookup: ShardLookup, threads: int, group: Any,
                    progress: Callable[[int], None] | None = None
                    ) -> tuple[dict[str, torch.Tensor], PipelineStats, CooperativeStats]:
    """Load ``placements`` with the other ranks of ``group`` (a collective: every rank must call it)."""
    import torch.distributed as dist

    check_group(group)
    started = time.perf_counter()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    coop = CooperativeStats(rank, world)
    mine = [p for p in placements if p.device != "meta"]
    needs: list[_Need] = [(p.name, (p.cut.dim, p.cut.start, p.cut.stop) if p.cut else None) for p in mine]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (digest(manifest.to_bytes()), needs), group=group)
    if len({model for model, _needs in gathered}) != 1:
        raise InvalidInputError(f"group=: the ranks of the group are loading different models (rank {rank})")

    # Every rank builds the same plan from the same gathered needs.
    own_placement = {p.name: p for p in mine}
    items: dict[str, list[_Item]] = {}
    for other, (_model, other_needs) in enumerate(gathered):
        for need in other_needs:
            placement = own_placement[need[0]] if other == rank else _placement_for(manifest, need)
            if placement.nbytes:
                for piece in placement.pieces():
                    items.setdefault(piece.shard, []).append(_Item(other, placement, piece))
    shards = list(items)
    needers = {s: {i.rank for i in group_items} for s, group_items in items.items()}
    owner = _owners(shards, dict(manifest.shards), needers, world)
    coop.shards_owned = sum(1 for s in shards if owner[s] == rank)
    coop.shards_needed = sum(1 for s in shards if rank in needers[s])

    stats = PipelineStats()
    sinks = _allocate(placements, threads, stats)

    device = _exchange_device(group)
    for shard_round in _rounds(shards, items, owner):
        coop.rounds += 1
        _exchange_round(source, shard_round, items, owner, rank, world, sinks, lookup, threads, group, device, coop,
                        stats, progress)
    stats.pieces = sum(1 for group_items in items.values() for i in group_items if i.rank == rank)
    return _finish(placements, sinks, stats, started), stats, coop


def _exchange_device(group: Any) -> torch.device:
    """Where the exchange buffers live: the current CUDA device for NCCL, host memory otherwise."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_round(source: ModelSource, shard_round: list[str], items: dict[str, list[_Item]],
                    owner: dict[str, int], rank: int, world: int, sinks: dict[str, TensorSink], lookup: ShardLookup,
                    threads: int, group: Any, device: torch.device, coop: CooperativeStats, stats: PipelineStats,
                    progress: Callable[[int], None] | None) -> None:
    import torch.distributed as dist

    # The layout of every (source rank -> destination rank) segment: shards in round order, items in plan order.
    def segment(src: int, dst: int) -> list[_Item]:
        return [i for s in shard_round if owner[s] == src for i in items[s] if i.rank == dst]

    outgoing = [segment(rank, dst) if dst != rank else [] for dst in range(world)]
    incoming = [segment(src, rank) if src != rank else [] for src in range(world)]
    send_sizes = [sum(i.nbytes for i in seg) for seg in outgoing]
    recv_sizes = [sum(i.nbytes for i in seg) for seg in incoming]
    send = np.empty(sum(send_sizes), dtype=np.uint8)
    slots: dict[tuple[int, str, int, int], memoryview] = {}  # (dst, name, piece rows) -> its slice of send
    offset = 0
    for dst, seg in enumerate(outgoing):
        for item in seg:
            slots[(dst, item.placement.name, *item.piece.rows)] = memoryview(send.data)[offset : offset + item.nbytes]
            offset += item.nbytes

    def place_shard(entry: tuple[str, ShardData]) -> int:
        shard_id, data = entry
        shard = parse_shard(data, shard_id, verify_id=False)  # the source checked the id
        written = 0
        for item in items[shard_id]:
            if item.rank == rank:
                written += write_piece(sinks[item.placement.device], item.placement, item.piece, shard, lookup)
            else:
                slot = _Into(slots[(item.rank, item.placement.name, *item.piece.rows)])
                write_piece(slot, item.placement, item.piece, shard, lookup)
        return written

    owned = [s for s in shard_round if owner[s] == rank]
    for written in ordered_map(place_shard, source.fetch_shards(owned), threads):
        stats.shards += 1
        if progress is not None:
            progress(written)

    # Every rank knows every segment's size, so a round nobody sends anything in is skipped by all.
    if any(segment(src, dst) for src in range(world) for dst in range(world) if src != dst):
        received = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
        dist.all_to_all_single(received, torch.from_numpy(send).to(device), output_split_sizes=recv_sizes,
                               input_split_sizes=send_sizes, group=group)
        host = received.cpu().numpy() if device.type != "cpu" else received.numpy()
        offset = 0
        for seg in incoming:
            for item in seg:
                start, stop = item.span
                with sinks[item.placement.device].target(item.placement, start, stop) as target:
                    target[:] = host.data[offset : offset + item.nbytes]
                offset += item.nbytes
                if progress is not None:
                    progress(item.nbytes)
        coop.sent_bytes += sum(send_sizes)
        coop.received_bytes += sum(recv_sizes)
