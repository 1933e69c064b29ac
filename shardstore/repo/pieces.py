"""Decoding one piece of a tensor: the single place every reader (pull, the lazy view, the loader) goes through.

Today a piece is one stream of one shard. A piece may come to depend on
other shards (a delta against a base model's piece), so readers never call
``Shard.decode`` for a piece themselves: they call :func:`decode_piece` and
hand it a ``lookup`` that fetches any further shard it needs.
"""

from __future__ import annotations

from collections.abc import Callable

from shardstore.codecs.base import Buffer
from shardstore.format.manifest import PieceRef
from shardstore.format.shard import Shard

# Fetches (and verifies) a shard by id; readers pass their cached fetch.
ShardLookup = Callable[[str], Shard]


def decode_piece(shard: Shard, piece: PieceRef, out: memoryview | None = None, *,
                 lookup: ShardLookup | None = None) -> Buffer:
    """The piece's raw bytes (written into ``out`` when given), checked against the stream's checksum."""
    return shard.decode(piece.stream, out)
