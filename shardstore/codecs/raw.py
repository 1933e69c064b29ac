"""``raw.v1``: the bytes as they are. The baseline, and the fallback for data nothing shrinks."""

from __future__ import annotations

from dataclasses import dataclass

from shardstore.codecs.base import Buffer, Codec, PieceInfo, check_out
from shardstore.errors import CodecError


@dataclass(frozen=True)
class RawCodec(Codec):
    codec_id = "raw.v1"

    def encode(self, data: Buffer, info: PieceInfo) -> bytes:
        return bytes(data)

    def decode(self, encoded: Buffer, info: PieceInfo, out: memoryview | None = None) -> Buffer:
        if len(encoded) != info.nbytes:
            raise CodecError(f"raw.v1: stream has {len(encoded)} bytes, expected {info.nbytes}")
        if out is None:
            return encoded
        view = check_out(out, info.nbytes, self.codec_id)
        view[:] = encoded
        return view
