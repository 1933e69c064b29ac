"""Loading a model: decide what each tensor becomes (device, tensor-parallel cut), then run the pipeline.

``ModelView.state_dict``, ``ModelView.load_into`` and ``shardstore load`` all
come here, so the three agree on device maps, plans and figures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from shardstore.errors import InvalidInputError
from shardstore.format.manifest import Manifest
from shardstore.load.cooperative import CooperativeStats, run_cooperative
from shardstore.load.device_map import DeviceLike, DeviceMap, natural_key, place
from shardstore.load.pipeline import PipelineStats, Placement, run_pipeline
from shardstore.load.tensor_parallel import TPPlan, check_plan, cut_for
from shardstore.repo.pieces import ShardLookup
from shardstore.repo.pool import default_threads
from shardstore.repo.registry import ModelSource


@dataclass(frozen=True)
class LoadOptions:
    """Where tensors go and which part of each: the keyword arguments of ``state_dict`` / ``load_into``."""

    device: DeviceLike | None = None  # None: cpu for a state dict, the module's own devices for load_into
    device_map: DeviceMap | str | None = None
    max_memory: Mapping[DeviceLike, int] | None = None
    tp_rank: int | None = None
    tp_size: int | None = None
    tp_plan: TPPlan | None = None
    # A torch.distributed process group whose ranks load together, each shard fetched once (cooperative.py).
    group: Any = None


@dataclass
class LoadResult:
    tensors: dict[str, torch.Tensor]
    device_map: dict[str, str]
    stats: PipelineStats
    fetched_bytes: int
    missing: list[str] = field(default_factory=list)  # load_into: the module's tensors the model lacks
    unexpected: list[str] = field(default_factory=list)  # load_into: the model's tensors the module lacks
    still_meta: list[str] = field(default_factory=list)  # load_into: module tensors left on meta (strict=False)
    cooperative: CooperativeStats | None = None  # group=: what this rank fetched and exchanged

    @property
    def raw_bytes(self) -> int:
        return sum(self.stats.bytes_by_device.values())

    def to_json(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "tensors": len(self.tensors),
            "bytes": self.raw_bytes,
            "bytes_by_device": dict(stats.bytes_by_device),
            "fetched_bytes": self.fetched_bytes,
            "shards": stats.shards,
            "pieces": stats.pieces,
            "seconds": round(stats.seconds, 6),
            "device_copies": stats.copies,
            "device_copies_done_before_decode_end": stats.copies_done_before_decode_end,
            "device_map": dict(self.device_map),
            **({"cooperative": asdict(self.cooperative)} if self.cooperative is not None else {}),
        }


def plan_placements(manifest: Manifest, names: Sequence[str], options: LoadOptions) -> tuple[list[Placement],
                                                                                             dict[str, str]]:
    """The placements of ``names`` (layer order), and the device map they follow."""
    plan = check_plan(options.tp_rank, options.tp_size, options.tp_plan)
    cuts = {}
    for name in names:
        record = manifest.tensors[name]
        cuts[name] = None if plan is None else cut_for(name, record.shape, plan, options.tp_rank or 0,
                                                       options.tp_size or 1)
    placements = [Placement(name, manifest.tensors[name], "", cuts[name]) for name in names]
    sizes = {p.name: p.nbytes for p in placements}
    devices, device_map = place(names, sizes, device=options.device, device_map=options.device_map,
                                max_memory=options.max_memory)
    return [Placement(p.name, p.record, devices[p.name], p.cut) for p in placements], device_map


def load_model(source: ModelSource, manifest: Manifest, lookup: ShardLookup, options: LoadOptions, *,
               names: Sequence[str] | None = None, threads: int | None = None,
               progress: Callable[[int], None] | None = None) -> LoadResult:
    """Load ``names`` (default: every tensor) as ``options`` say; ``names`` in the order devices fill."""
    if names is None:
        names = sorted(manifest.tensors, key=natural_key)
    unknown = [n for n in names if n not in manifest.tensors]
    if unknown:
        raise InvalidInputError(f"no tensor named {unknown[0]!r} in the model")
    placements, device_map = plan_placements(manifest, names, options)
    before = source.transferred_bytes
    if options.group is not None:
        tensors, stats, coop = run_cooperative(source, manifest, placements, lookup=lookup,
                                               threads=threads or default_threads(), group=options.group,
                                               progress=progress)
        return LoadResult(tensors, device_map, stats, source.transferred_bytes - before, cooperative=coop)
    tensors, stats = run_pipeline(source, placements, lookup=lookup, threads=threads or default_threads(),
                                  progress=progress)
    return LoadResult(tensors, device_map, stats, source.transferred_bytes - before)
