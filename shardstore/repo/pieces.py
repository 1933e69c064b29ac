"""Decoding one piece of a tensor: the single place every reader (pull, the lazy view, the loader) goes through.

A piece is one stream of one shard, or, for a model pushed with ``--base``,
the XOR of its stream with the base model's same piece (which may itself be a
delta, up to ``MAX_DELTA_DEPTH`` deep). Readers never call
:func:`decode_stream` for a piece themselves: they call :func:`decode_piece` and hand it a
``lookup`` that fetches (and verifies) any further shard it needs.

Each stream is checked against its own checksum as it is decoded, so the
result is the XOR of verified bytes. The stream's pipeline must start with
``xor-delta.v1`` exactly when the manifest gives the piece a base: a manifest
that lost or gained a base by mistake is an error, never silently wrong data.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from shardstore.codecs.base import Buffer, PieceInfo, check_out
from shardstore.codecs.bits import xor_into
from shardstore.codecs.delta import XorDeltaCodec
from shardstore.codecs.pipeline import Pipeline
from shardstore.errors import CodecError, FormatError, IntegrityError
from shardstore.format.digest import stream_matches
from shardstore.format.manifest import PieceBase, PieceRef, TensorRecord
from shardstore.format.shard import Shard, StreamHeader, parse_shard
from shardstore.repo.registry import ModelSource

# Fetches (and verifies) a shard by id; readers pass their cached fetch.
ShardLookup = Callable[[str], Shard]


class RecentShards:
    """A :data:`ShardLookup` over a source that keeps the last few shards it fetched, parsed.

    The delta pieces of one shard mostly read the same base shard (the base was packed by
    the same plan), so a handful of recent shards saves fetching one per piece.
    """

    def __init__(self, source: ModelSource, keep: int = 8) -> None:
        self._source = source
        self._keep = keep
        self._shards: OrderedDict[str, Shard] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, shard_id: str) -> Shard:
        with self._lock:
            if shard_id in self._shards:
                self._shards.move_to_end(shard_id)
                return self._shards[shard_id]
        ((_, data),) = self._source.fetch_shards([shard_id])
        shard = parse_shard(data, shard_id, verify_id=False)  # the source checked the id
        with self._lock:
            self._shards[shard_id] = shard
            while len(self._shards) > self._keep:
                self._shards.popitem(last=False)
        return shard


def stream_info(header: StreamHeader) -> PieceInfo:
    """What the stream's codecs are told about the piece they decode."""
    return PieceInfo(header.dtype, header.shape)


def decode_stream(shard: Shard, key: str, out: memoryview | None = None) -> Buffer:
    """Decode one stream of a shard (into ``out`` when given) and check it against its checksum.

    Any codec failure is an :class:`IntegrityError` naming the shard: the shard
    matched its id, so a stream that will not decode was written wrong.
    """
    header, payload = shard.stream(key)
    try:
        decoded = Pipeline.from_configs(header.codec).decode(payload, stream_info(header), out)
    except CodecError as exc:
        raise IntegrityError(f"shard {shard.shard_id}: stream {key} cannot be decoded: {exc}") from None
    if len(decoded) != header.nbytes or not stream_matches(decoded, header.checksum, shard.stream_checksum):
        raise IntegrityError(f"shard {shard.shard_id}: stream {key} decodes to bytes that fail its checksum")
    return decoded


def is_delta_stream(shard: Shard, stream: str) -> bool:
    """Whether the stream holds an XOR against a base piece (its pipeline starts with ``xor-delta.v1``)."""
    header = shard.streams.get(stream)
    return header is not None and header[0].codec[0].get("id") == XorDeltaCodec.codec_id


def decode_piece(shard: Shard, piece: PieceRef, record: TensorRecord, out: memoryview | None = None, *,
                 lookup: ShardLookup | None = None) -> Buffer:
    """The piece's raw bytes (written into ``out`` when given), checked against the stream's checksum.

    The stream must declare the dtype and size the manifest gives the piece before a byte is
    decoded: the shard's checksum only proves the shard is what its writer made, and a forged
    shard declaring a bigger stream would otherwise make a reader allocate and write past the piece.
    """
    header = shard.streams.get(piece.stream)
    expected = (piece.rows[1] - piece.rows[0]) * record.row_bytes
    if header is not None and (header[0].dtype != record.dtype or header[0].nbytes != expected):
        raise IntegrityError(
            f"shard {shard.shard_id}: stream {piece.stream} declares {header[0].dtype} {list(header[0].shape)}, "
            f"the manifest expects {record.dtype} rows {piece.rows[0]}..{piece.rows[1]} ({expected} bytes)"
        )
    return _decode(shard, piece.stream, piece.base, out, lookup)


def _decode(shard: Shard, stream: str, base: PieceBase | None, out: memoryview | None,
            lookup: ShardLookup | None) -> Buffer:
    if stream in shard.streams and is_delta_stream(shard, stream) != (base is not None):
        kind = "a delta stream" if base is None else "not a delta stream"
        raise FormatError(f"shard {shard.shard_id}: stream {stream} is {kind}, unlike what the manifest says")
    if base is None or stream not in shard.streams:
        return decode_stream(shard, stream, out)  # a missing stream: the shard names itself in the error
    if lookup is None:
        raise FormatError(f"shard {shard.shard_id}: stream {stream} is a delta and no base shard can be fetched")
    mine = shard.streams[stream][0]
    # The XOR goes straight into the caller's buffer (or a new one), then the base is folded in.
    target = check_out(out, mine.nbytes, XorDeltaCodec.codec_id)
    decode_stream(shard, stream, target)
    base_shard = lookup(base.shard)
    theirs = base_shard.streams.get(base.stream)
    if theirs is None or (theirs[0].dtype, theirs[0].shape) != (mine.dtype, mine.shape):
        raise IntegrityError(
            f"shard {shard.shard_id}: stream {stream}: base stream {base.stream} of shard {base.shard} "
            "is missing or has another dtype or shape"
        )
    xor_into(target, _decode(base_shard, base.stream, base.base, None, lookup))
    return target
