"""``byteplanes-zstd.v1``: split elements into byte planes, zstd each plane, keep raw what zstd can't shrink.

The first lossless codec: grouping the k-th byte of every element together puts
the low-entropy exponent bytes of floats side by side, where zstd's literal
Huffman coder finds them. It stays decodable forever (golden fixtures).

Stream layout (little-endian)::

    u8  plane count k (the dtype's item size)
    k x (u8 mode, u64 length)     mode 0 = raw, 1 = zstd frame
    the k plane payloads, in order
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import numpy as np
import zstandard

from shardstore.codecs.base import Buffer, Codec, PieceInfo, check_out
from shardstore.errors import CodecError
from shardstore.format.dtypes import itemsize

_PLANE_ENTRY = struct.Struct("<BQ")
_MODE_RAW = 0
_MODE_ZSTD = 1

_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    # zstandard's (de)compressor objects are not thread-safe; one per thread.
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


@dataclass(frozen=True)
class BytePlanesZstdCodec(Codec):
    codec_id = "byteplanes-zstd.v1"
    level: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.level, int) or not -7 <= self.level <= 22:
            raise ValueError("level must be an integer in [-7, 22]")

    def encode(self, data: Buffer, info: PieceInfo) -> bytes:
        k = itemsize(info.dtype)
        raw = np.frombuffer(data, dtype=np.uint8)
        if raw.size % k:
            raise CodecError(f"{self.codec_id}: {raw.size} bytes is not a whole number of {k}-byte items")
        planes = raw.reshape(-1, k).T if k > 1 else raw.reshape(1, -1)
        cctx = zstandard.ZstdCompressor(level=self.level)
        header = bytearray([k])
        payloads: list[bytes] = []
        for plane in planes:
            plain = np.ascontiguousarray(plane).tobytes()
            packed = cctx.compress(plain)
            mode, payload = (_MODE_ZSTD, packed) if len(packed) < len(plain) else (_MODE_RAW, plain)
            header += _PLANE_ENTRY.pack(mode, len(payload))
            payloads.append(payload)
        return bytes(header) + b"".join(payloads)

    def decode(self, encoded: Buffer, info: PieceInfo, out: memoryview | None = None) -> Buffer:
        k = itemsize(info.dtype)
        size = info.nbytes
        count = size // k
        stream = memoryview(encoded).cast("B")
        if len(stream) < 1 or stream[0] != k:
            raise CodecError(f"{self.codec_id}: stream does not start with plane count {k}")
        pos = 1 + k * _PLANE_ENTRY.size
        if len(stream) < pos:
            raise CodecError(f"{self.codec_id}: truncated plane table")
        entries = [_PLANE_ENTRY.unpack_from(stream, 1 + i * _PLANE_ENTRY.size) for i in range(k)]
        if pos + sum(length for _, length in entries) != len(stream):
            raise CodecError(f"{self.codec_id}: plane lengths do not add up to the stream size")
        view = check_out(out, size, self.codec_id)
        target = np.frombuffer(view, dtype=np.uint8).reshape(count, k)
        dctx = _decompressor()
        for plane_index, (mode, length) in enumerate(entries):
            payload = stream[pos : pos + length]
            pos += length
            if mode == _MODE_RAW:
                plain: Buffer = payload
            elif mode == _MODE_ZSTD:
                try:
                    # A frame that declares its size is decompressed to that size whatever
                    # max_output_size says (a zstd bomb): refuse any declaration but ours first.
                    declared = zstandard.frame_content_size(payload)
                    if declared not in (count, -1):
                        raise CodecError(f"{self.codec_id}: plane {plane_index} declares {declared} bytes, "
                                         f"expected {count}")
                    plain = dctx.decompress(payload, max_output_size=count)
                except zstandard.ZstdError as exc:
                    raise CodecError(f"{self.codec_id}: corrupt zstd plane: {exc}") from None
            else:
                raise CodecError(f"{self.codec_id}: unknown plane mode {mode}")
            if len(plain) != count:
                raise CodecError(f"{self.codec_id}: plane {plane_index} has {len(plain)} bytes, expected {count}")
            target[:, plane_index] = np.frombuffer(plain, dtype=np.uint8)
        return view
