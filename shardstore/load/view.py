"""The lazy model view that :func:`shardstore.open` returns, shaped like ``safetensors.safe_open``.

Names, dtypes and shapes come from the manifest at once; a tensor's shards are
fetched the first time it (or a slice of it) is asked for, decoded straight
into the tensor's own buffer, and kept in a small in-memory cache so tensors
packed into the same shard cost one fetch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from shardstore.codecs.quantize import QuantizedPiece
from shardstore.errors import InvalidInputError, NotFoundError
from shardstore.format.manifest import Manifest, TensorRecord
from shardstore.format.shard import Shard, parse_shard
from shardstore.load.device_map import DeviceLike, DeviceMap
from shardstore.load.loader import LoadOptions, LoadResult, load_model
from shardstore.load.module import load_module
from shardstore.load.pipeline import Placement, run_pipeline
from shardstore.load.quantized import quantized_tensor
from shardstore.load.tensor_parallel import Cut, TPPlan
from shardstore.load.tensors import torch_dtype
from shardstore.repo.pool import default_threads
from shardstore.repo.registry import Registry, ShardData

__all__ = ["DEFAULT_SHARD_CACHE_BYTES", "ModelView", "TensorSlice", "torch_dtype"]

DEFAULT_SHARD_CACHE_BYTES = 64 << 20


class ModelView:
    """A model in a store or on a server, read lazily. Use as a context manager or call close()."""

    def __init__(self, source: Registry, ref: str, manifest_id: str, manifest: Manifest,
                 shard_cache_bytes: int = DEFAULT_SHARD_CACHE_BYTES) -> None:
        # The view owns its registry (and a server connection with it): closing the view closes it.
        self.source = source
        self.ref = ref
        self.manifest_id = manifest_id
        self.manifest = manifest
        # shard id -> its bytes as the source handed them (already checked against the id).
        self._cache: OrderedDict[str, ShardData] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = shard_cache_bytes
        self._lock = threading.Lock()

    # -- the safetensors-like surface -------------------------------------------

    def keys(self) -> list[str]:
        return self.manifest.select(None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.manifest.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.manifest.tensors

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for record in self.manifest.files:
            merged.update(record.metadata or {})
        return merged

    def record(self, name: str) -> TensorRecord:
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise NotFoundError(f"{self.ref}: no tensor named {name!r}") from None

    def get_tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        record = self.record(name)
        return self._read_rows(name, record, 0, record.rows).reshape(record.shape).to(device)

    def get_quantized(self, name: str) -> QuantizedPiece:
        """A quantized tensor's codes and scales, not dequantized (``shardstore.codecs.quantize``)."""
        record = self.record(name)
        return quantized_tensor(name, record, self._shards(list(dict.fromkeys(p.shard for p in record.pieces))))

    def get_slice(self, name: str) -> TensorSlice:
        return TensorSlice(self, name, self.record(name))

    def state_dict(self, device: DeviceLike | None = None, threads: int | None = None, *,
                   device_map: DeviceMap | str | None = None, max_memory: Mapping[DeviceLike, int] | None = None,
                   tp_rank: int | None = None, tp_size: int | None = None,
                   tp_plan: TPPlan | None = None, group: Any = None) -> dict[str, torch.Tensor]:
        """Every tensor (or this tensor-parallel rank's part of it), each decoded once onto its device.

        ``device_map``: module prefix → device (accelerate's format), or ``"auto"`` /
        ``"balanced"`` over ``max_memory`` (device → bytes). ``tp_plan``: name
        pattern → split dim (0, 1) or None, first match wins (default ``{"*": 0}``).
        Shards stream in while earlier ones decode in threads; memory holds
        each tensor once plus the shards in flight (docs/loading.md).
        ``group``: a ``torch.distributed`` process group whose ranks all call this together; each
        shard is then fetched and decoded by one rank and the pieces exchanged (docs/loading.md).
        """
        options = LoadOptions(device, device_map, max_memory, tp_rank, tp_size, tp_plan, group)
        tensors = self.load(options, threads=threads).tensors
        return {name: tensors[name] for name in self.keys()}

    def load(self, options: LoadOptions, *, names: Sequence[str] | None = None, threads: int | None = None,
             progress: Callable[[int], None] | None = None) -> LoadResult:
        """:meth:`state_dict` with its figures (bytes per device, seconds, bytes fetched, the device map)."""
        return load_model(self.source, self.manifest, self._shard, options, names=names, threads=threads,
                          progress=progress)

    def load_into(self, module: torch.nn.Module, *, device: DeviceLike | None = None,
                  device_map: DeviceMap | str | None = None, max_memory: Mapping[DeviceLike, int] | None = None,
                  tp_rank: int | None = None, tp_size: int | None = None, tp_plan: TPPlan | None = None,
                  strict: bool = True, threads: int | None = None,
                  progress: Callable[[int], None] | None = None, cast: bool = False,
                  group: Any = None) -> LoadResult:
        """Make the model's tensors the module's, as ``module.load_state_dict(sd, assign=True)`` would.

        Works on a module built on the meta device (a transformers model gets
        what the checkpoint lacks from its own initialisation). Without ``device``
        or ``device_map`` each tensor goes where the module's tensor is now.
        ``cast``: floating tensors take the dtype of the module's tensor they replace. ``group``: as
        for :meth:`state_dict`, a process group loading cooperatively.
        """
        options = LoadOptions(device, device_map, max_memory, tp_rank, tp_size, tp_plan, group)
        return load_module(self.source, self.manifest, self._shard, self.ref, module, options, strict=strict,
                           threads=threads, progress=progress, cast=cast)

    # -- internals ---------------------------------------------------------------

    def fetch_shards(self, shard_ids: Iterable[str]) -> Iterator[tuple[str, ShardData]]:
        """The registry's shards through the view's small cache: tensors packed into one shard cost one fetch."""
        wanted = list(dict.fromkeys(shard_ids))
        hits: dict[str, ShardData] = {}
        with self._lock:
            for shard_id in wanted:
                if shard_id in self._cache:
                    self._cache.move_to_end(shard_id)
                    hits[shard_id] = self._cache[shard_id]
        yield from hits.items()
        for shard_id, data in self.source.fetch_shards([s for s in wanted if s not in hits]):
            self._remember(shard_id, data)
            yield shard_id, data

    def _shards(self, shard_ids: list[str]) -> dict[str, Shard]:
        # The source checked each shard against its id; parsing the header again is cheap.
        return {i: parse_shard(data, i, verify_id=False) for i, data in self.fetch_shards(shard_ids)}

    def _shard(self, shard_id: str) -> Shard:
        return self._shards([shard_id])[shard_id]

    def _remember(self, shard_id: str, data: ShardData) -> None:
        size = len(data)
        with self._lock:
            if size > self._cache_limit or shard_id in self._cache:
                return
            self._cache[shard_id] = data
            self._cache_bytes += size
            while self._cache_bytes > self._cache_limit:
                _old_id, old = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)

    def _read_rows(self, name: str, record: TensorRecord, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a flat tensor, through the load pipeline: only the pieces holding them are read."""
        whole = (start, stop) == (0, record.rows)
        cut = None if whole or not record.shape else Cut(0, start, max(start, stop))
        placement = Placement(name, record, "cpu", cut)
        tensors, _stats = run_pipeline(self, [placement], lookup=self._shard, threads=default_threads())
        return tensors[name].reshape(-1)

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0
        self.source.close()

    def __enter__(self) -> ModelView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelView({self.ref!r}, tensors={len(self.manifest.tensors)})"


class TensorSlice:
    """``view.get_slice(name)[a:b]``: rows of a tensor, fetching only the pieces that hold them."""

    def __init__(self, view: ModelView, name: str, record: TensorRecord) -> None:
        self._view = view
        self._name = name
        self._record = record

    def get_shape(self) -> list[int]:
        return list(self._record.shape)

    def get_dtype(self) -> str:
        return self._record.dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        record = self._record
        if not record.shape:
            raise InvalidInputError(f"{self._name}: a 0-d tensor cannot be sliced")
        first = index[0] if isinstance(index, tuple) else index
        rest = index[1:] if isinstance(index, tuple) else ()
        if isinstance(first, int):
            row = first + record.rows if first < 0 else first
            if not 0 <= row < record.rows:
                raise IndexError(f"{self._name}: row {first} out of range for {record.rows} rows")
            first = slice(row, row + 1)
            squeeze = True
        else:
            squeeze = False
        if not isinstance(first, slice):
            raise InvalidInputError(f"{self._name}: get_slice takes ints and slices")
        wanted = range(*first.indices(record.rows))
        lo = min(wanted, default=0)
        hi = max(wanted, default=-1) + 1
        block = self._view._read_rows(self._name, record, lo, max(lo, hi)).reshape(-1, *record.shape[1:])
        if wanted.step != 1 and len(wanted):
            block = block[torch.tensor([r - lo for r in wanted])]
        if squeeze:
            return block[0][rest] if rest else block[0]
        return block[(slice(None), *rest)] if rest else block
