"""Push against a base model (``push --base NAME:TAG``): each piece the cheapest of base, XOR delta or plain.

A piece of the new model has a counterpart when the base has a tensor of the
same name, dtype and shape with a piece of the same rows (chunking is
deterministic, so same shape and chunk size give the same rows; otherwise the
piece is simply coded on its own). Then, in this order:

* identical bits: the new manifest points at the base's stream itself, so an
  unchanged tensor costs nothing, even when it shares a shard with changed ones;
* otherwise the XOR of the two is coded with the tensor's own lossless pipeline
  (``xor-delta.v1`` first in the stream's pipeline) and kept when smaller than
  the plain encoding: a fine-tune keeps each float's sign, exponent and top
  mantissa bits, which XOR to zeros.

Lossy pipelines are never delta-coded: the XOR would have to be taken between
their codes, not the weights. Chains (a delta of a delta) are allowed up to
``MAX_DELTA_DEPTH`` reads per piece; past that the piece is coded on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from shardstore.codecs.base import Buffer, PieceInfo
from shardstore.codecs.bits import xor_into
from shardstore.codecs.delta import XorDeltaCodec
from shardstore.codecs.pipeline import Pipeline
from shardstore.format.digest import stream_checksum
from shardstore.format.manifest import MAX_DELTA_DEPTH, Manifest, PieceBase, PieceRef
from shardstore.format.shard import StreamHeader
from shardstore.repo.pieces import RecentShards, decode_piece
from shardstore.repo.refs import Ref
from shardstore.repo.registry import ModelSource

# Base shards kept parsed while pushing: the base was packed by the same plan, so the pieces
# of one new shard mostly come from one base shard; a few cover the threads in flight.
BASE_SHARD_CACHE = 8


@dataclass(frozen=True)
class EncodedPiece:
    """A stream to write for one piece; ``base`` is set when it holds the XOR with that base piece."""

    header: StreamHeader
    payload: bytes
    base: PieceBase | None = None


def encode_piece(
    raw: Buffer, info: PieceInfo, pipeline: Pipeline, base: DeltaBase | None = None, *,
    name: str = "", shape: tuple[int, ...] = (), rows: tuple[int, int] = (0, 0), raw_checksum: str | None = None,
) -> EncodedPiece | PieceRef:
    """How push stores one piece (rows ``rows`` of tensor ``name`` of ``shape``): a stream, or the base's piece.

    ``raw_checksum``: the stream checksum of ``raw`` when the caller already has it (push hashes every piece first).
    """
    counterpart = base.counterpart(name, info.dtype, shape, rows) if base is not None else None
    base_bytes = base.piece_bytes(name, counterpart) if base is not None and counterpart is not None else None
    if counterpart is not None and base_bytes is not None and _same_bytes(raw, base_bytes):
        return counterpart
    checksum = raw_checksum if raw_checksum is not None else stream_checksum(raw)
    plain = EncodedPiece(StreamHeader(info.dtype, info.shape, tuple(pipeline.configs()), checksum),
                         pipeline.encode(raw, info))
    if counterpart is None or base_bytes is None:
        return plain
    delta = xor_piece(counterpart, base_bytes, raw, info, pipeline)
    return delta if delta is not None and len(delta.payload) < len(plain.payload) else plain


def _same_bytes(a: Buffer, b: Buffer) -> bool:
    # numpy compares at memory speed; memoryview == goes item by item (20x slower).
    return bool(np.array_equal(np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)))


def xor_piece(base_piece: PieceRef, base_bytes: Buffer, raw: Buffer, info: PieceInfo,
              pipeline: Pipeline) -> EncodedPiece | None:
    """``raw`` XOR the base piece's bytes, coded with ``pipeline``; None where a delta is not allowed."""
    depth = 1 + (base_piece.base.depth if base_piece.base is not None else 0)
    if not pipeline.lossless or depth > MAX_DELTA_DEPTH:
        return None
    delta = bytearray(raw)
    xor_into(memoryview(delta), base_bytes)
    configs = (XorDeltaCodec().get_config(), *pipeline.configs())
    header = StreamHeader(info.dtype, info.shape, configs, stream_checksum(delta))
    return EncodedPiece(header, pipeline.encode(delta, info), PieceBase(base_piece.shard, base_piece.stream,
                                                                         base_piece.base))


class DeltaBase:
    """The base model of a push: its manifest, and its pieces' bytes, fetched and decoded on demand."""

    def __init__(self, source: ModelSource, ref: Ref) -> None:
        self.ref = ref
        self.manifest_id = source.resolve(ref)
        self.manifest: Manifest = source.get_manifest(self.manifest_id)
        self._shard = RecentShards(source, BASE_SHARD_CACHE)

    def counterpart(self, name: str, dtype: str, shape: tuple[int, ...], rows: tuple[int, int]) -> PieceRef | None:
        """The base's piece holding exactly these rows of the same tensor, if it has one to code against."""
        record = self.manifest.tensors.get(name)
        if record is None or record.dtype != dtype or record.shape != shape or rows[0] == rows[1]:
            return None
        for piece in record.pieces_for_rows(*rows):
            if piece.rows == rows:
                return piece
        return None

    def piece_bytes(self, name: str, piece: PieceRef) -> Buffer:
        """The base piece's raw bytes (the last few base shards stay parsed: pieces come in shard order)."""
        return decode_piece(self._shard(piece.shard), piece, self.manifest.tensors[name], lookup=self._shard)

    def shards_needed(self, own: dict[str, int], pieces: Iterable[PieceRef]) -> tuple[dict[str, int], frozenset[str]]:
        """Every shard the new manifest needs (its own and the base's it reads) and which of them the base has."""
        shards = dict(own)
        base_sizes = self.manifest.shards
        for piece in pieces:
            link: PieceRef | PieceBase | None = piece
            while link is not None:
                if link.shard in base_sizes:
                    shards.setdefault(link.shard, base_sizes[link.shard])
                link = link.base
        return shards, frozenset(s for s in shards if s in base_sizes)
