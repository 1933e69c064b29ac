"""``ObjectChunk`` messages of ``StreamShards`` encoded and parsed by hand: shard bytes copied once per side.

Why not the generated protobuf class. Building a ``pb.ObjectChunk`` copies its 1 MiB of data
(a ``bytes`` slice, then the message's own field), serializing copies it again, and on the
client parsing copies it once more before the bytes reach the shard's buffer. On this 2-core VM
each such copy runs at about 1.5 GB/s, and with the server in the same process they were the
largest single cost of a loopback pull (docs/benchmarks.md). Here the server joins a few header
bytes and a memoryview of the shard into the message (one copy) and the client takes a
memoryview of the message's data field (no copy).

The bytes on the wire are the same protobuf message (proto/shardstore/v1/registry.proto), so
either side may still be the generated code: the parser accepts fields in any order, repeated
fields (the last wins, as protobuf says) and fields it does not know. It never raises: a message
it cannot read comes back ``malformed``, and the client refuses the shard by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardstore.rpc._generated import registry_pb2 as pb

_ID, _OFFSET, _TOTAL, _DATA = 1, 2, 3, 4
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Chunk:
    """One received ``ObjectChunk``; ``data`` is a view into the message, ``wire_bytes`` its size on the wire."""

    id: str
    offset: int
    total_size: int
    data: memoryview
    wire_bytes: int
    malformed: bool = False


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(object_id: str, offset: int, total_size: int, data: memoryview | bytes) -> bytes:
    """The serialized ``ObjectChunk``, as ``pb.ObjectChunk(...).SerializeToString()`` gives it; copies data once."""
    name = object_id.encode()
    head: list[bytes] = []
    # proto3 leaves empty strings, zeros and empty bytes out, as the generated code does.
    if name:
        head += [_varint(_ID << 3 | _LENGTH), _varint(len(name)), name]
    if offset:
        head += [_varint(_OFFSET << 3 | _VARINT), _varint(offset)]
    if total_size:
        head += [_varint(_TOTAL << 3 | _VARINT), _varint(total_size)]
    if len(data):
        head += [_varint(_DATA << 3 | _LENGTH), _varint(len(data))]
    return b"".join((*head, data))


def serialize_chunk(message: bytes | pb.ObjectChunk) -> bytes:
    """The response serializer: chunks come pre-encoded (``encode_chunk``) or as generated messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[at]  # IndexError past the end: the caller's "malformed"
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, at  # protobuf keeps the low 64 bits of a longer varint
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def decode_chunk(raw: bytes) -> Chunk:
    """Parse a serialized ``ObjectChunk`` without copying its data; never raises (see ``malformed``)."""
    view = memoryview(raw)
    object_id, offset, total = "", 0, 0
    data = view[0:0]
    at = 0
    try:
        while at < len(raw):
            key, at = _read_varint(raw, at)
            field, kind = key >> 3, key & 7
            if field == 0 or field >= 1 << 29:
                raise ValueError(f"field number {field}")
            if kind == _VARINT:
                value, at = _read_varint(raw, at)
                if field == _OFFSET:
                    offset = value
                elif field == _TOTAL:
                    total = value
            elif kind == _LENGTH:
                size, at = _read_varint(raw, at)
                if at + size > len(raw):
                    raise ValueError("field runs past the message")
                if field == _ID:
                    object_id = str(raw[at : at + size], "utf-8")
                elif field == _DATA:
                    data = view[at : at + size]
                at += size
            elif kind in (_FIXED64, _FIXED32):
                at += 8 if kind == _FIXED64 else 4
                if at > len(raw):
                    raise ValueError("field runs past the message")
            else:
                raise ValueError(f"wire type {kind}")
    except (ValueError, IndexError, UnicodeDecodeError):
        return Chunk("", 0, 0, view[0:0], len(raw), malformed=True)
    return Chunk(object_id, offset, total, data, len(raw))
