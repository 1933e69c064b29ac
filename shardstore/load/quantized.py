"""The quantized form of a stored tensor (codes, scales, zero points) for runtimes that compute on it.

Readers normally get a quantized tensor dequantized, in its original dtype.
A runtime with int8 or int4 kernels wants the codes instead: this undoes the
lossless stage of each piece and stops there, joining the pieces' rows.
Integrity: the shards were checked against their ids when fetched; the
stream checksums cover the dequantized bytes, so they are not checked here.
"""

from __future__ import annotations

from collections.abc import Mapping

from shardstore.codecs.quantize import QuantizedPiece, concat_pieces, quantized_piece
from shardstore.errors import CodecError, InvalidInputError
from shardstore.format.manifest import TensorRecord
from shardstore.format.shard import Shard
from shardstore.repo.pieces import stream_info


def quantized_tensor(name: str, record: TensorRecord, shards: Mapping[str, Shard]) -> QuantizedPiece:
    """``name``'s codes and scales, rows in order (``codes`` is (rows, columns) of the tensor seen as a matrix)."""
    if len(record.shape) < 2 and len(record.pieces) > 1:
        raise InvalidInputError(f"{name}: a 1-D tensor cut into pieces has no single quantized form")
    pieces = []
    for piece in record.pieces:
        if piece.base is not None:
            raise InvalidInputError(f"{name}: stored as a delta against a base model, not quantized")
        header, payload = shards[piece.shard].streams[piece.stream]
        try:
            pieces.append(quantized_piece(header.codec, payload, stream_info(header)))
        except CodecError as exc:
            raise InvalidInputError(f"{name}: {exc}") from None
    if not pieces:
        raise InvalidInputError(f"{name}: has no rows")
    return concat_pieces(pieces)
