"""Cutting tensors into pieces and packing pieces into shards.

Pieces are row ranges (dim 0) of about ``chunk_bytes`` raw bytes, so a
tensor-parallel slice or a vocabulary extension touches only the pieces it
must, and unchanged rows keep their shard ids. A tensor larger than a chunk
gives one shard per piece; smaller tensors of the same layer are packed
together (in layer order) up to ``chunk_bytes``, so pulling a layer costs few
requests and its shards hold nothing of other layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from shardstore.format.dtypes import itemsize, nbytes

DEFAULT_CHUNK_BYTES = 4 << 20
_LAYER_INDEX = re.compile(r"^\d+$")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return nbytes(self.dtype, self.shape[1:]) if self.shape else itemsize(self.dtype)


@dataclass(frozen=True)
class PiecePlan:
    tensor: TensorSpec
    rows: tuple[int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        if not self.tensor.shape:
            return ()
        return (self.rows[1] - self.rows[0], *self.tensor.shape[1:])

    @property
    def nbytes(self) -> int:
        return (self.rows[1] - self.rows[0]) * self.tensor.row_bytes


def layer_of(name: str) -> str:
    """``encoder.layer.3.attention.q.weight`` → ``encoder.layer.3``; otherwise the module path."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if _LAYER_INDEX.match(part):
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1])


def split_rows(tensor: TensorSpec, chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk_bytes``; at least one row per piece, one piece for empty tensors."""
    if tensor.rows == 0 or tensor.row_bytes == 0:
        return [(0, tensor.rows)]
    per_piece = max(1, chunk_bytes // tensor.row_bytes)
    return [(start, min(start + per_piece, tensor.rows)) for start in range(0, tensor.rows, per_piece)]


def plan_shards(tensors: Sequence[TensorSpec], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[list[PiecePlan]]:
    """Group pieces into shards. Deterministic: the same tensors give the same plan."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    by_layer: dict[str, list[TensorSpec]] = {}
    for tensor in tensors:
        by_layer.setdefault(layer_of(tensor.name), []).append(tensor)
    shards: list[list[PiecePlan]] = []
    for layer_tensors in by_layer.values():
        packed: list[PiecePlan] = []
        packed_bytes = 0
        for tensor in layer_tensors:
            size = nbytes(tensor.dtype, tensor.shape)
            if size > chunk_bytes:
                shards.extend([PiecePlan(tensor, rows)] for rows in split_rows(tensor, chunk_bytes))
                continue
            if packed and packed_bytes + size > chunk_bytes:
                shards.append(packed)
                packed, packed_bytes = [], 0
            packed.append(PiecePlan(tensor, (0, tensor.rows)))
            packed_bytes += size
        if packed:
            shards.append(packed)
    return shards
