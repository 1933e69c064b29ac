"""Hand-encoded object chunks are the protobuf message byte for byte, and the parser reads any valid one, or refuses.

The reference for every expectation is the generated protobuf class.
"""

from __future__ import annotations

import os
from concurrent import futures
from typing import Any

import grpc
import pytest

from shardstore.errors import IntegrityError
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc.chunks import decode_chunk, encode_chunk
from shardstore.rpc.client import GrpcClient

ID = "ab" * 32
CASES = [
    (ID, 0, 0, b""),
    (ID, 0, 5, b"hello"),
    (ID, 1 << 20, (1 << 20) + 3, b"end"),
    (ID, (1 << 40) + 1, (1 << 41) + 7, b"\x00\xff" * 10),
    ("", 0, 0, b""),
    (ID, 0, 1 << 20, os.urandom(1 << 20)),
]


@pytest.mark.parametrize(("object_id", "offset", "total", "data"), CASES)
def test_an_encoded_chunk_is_the_protobuf_message_and_parses_back(object_id: str, offset: int, total: int,
                                                                  data: bytes) -> None:
    encoded = encode_chunk(object_id, offset, total, memoryview(data))
    reference = pb.ObjectChunk(id=object_id, offset=offset, total_size=total, data=data)
    assert encoded == reference.SerializeToString()
    parsed = decode_chunk(reference.SerializeToString())
    assert (parsed.id, parsed.offset, parsed.total_size, bytes(parsed.data), parsed.malformed) == \
        (object_id, offset, total, data, False)
    assert parsed.wire_bytes == reference.ByteSize()


def test_fields_in_another_order_repeated_or_unknown_are_read_as_protobuf_reads_them() -> None:
    first = pb.ObjectChunk(id="x" * 64, offset=9, total_size=99, data=b"old").SerializeToString()
    later = pb.ObjectChunk(id=ID, offset=10, total_size=100, data=b"payload").SerializeToString()
    # Unknown fields of every wire type a newer server might add: varint, fixed64, bytes, fixed32.
    unknown = bytes([9 << 3 | 0, 0x96, 0x01, 10 << 3 | 1, *b"12345678", 11 << 3 | 2, 2, *b"hi", 12 << 3 | 5, *b"abcd"])
    data_first = (pb.ObjectChunk(data=b"payload").SerializeToString()
                  + pb.ObjectChunk(total_size=100, offset=10, id=ID).SerializeToString())
    for raw in (first + later, unknown + later + unknown, data_first):
        reference = pb.ObjectChunk.FromString(raw)
        parsed = decode_chunk(raw)
        assert not parsed.malformed
        assert (parsed.id, parsed.offset, parsed.total_size, bytes(parsed.data)) == \
            (reference.id, reference.offset, reference.total_size, reference.data) == (ID, 10, 100, b"payload")


def test_a_message_protobuf_cannot_read_comes_back_malformed_never_raising() -> None:
    good = pb.ObjectChunk(id=ID, offset=4, total_size=64, data=os.urandom(40)).SerializeToString()
    bad = [
        good[:-1],  # data runs past the end
        good[:1],  # a key with no value
        bytes([1 << 3 | 2, 2, 0xFF, 0xFE]),  # an id that is not UTF-8
        bytes([2 << 3 | 0]) + b"\xff" * 11,  # a varint longer than ten bytes
        bytes([13 << 3 | 3]),  # group start: a wire type this message never uses
        bytes([13 << 3 | 7]),  # no such wire type
        bytes([10 << 3 | 1, 1, 2]),  # fixed64 cut short
        bytes([0 << 3 | 0, 1]),  # field number 0
    ]
    for raw in bad:
        with pytest.raises(Exception):  # noqa: B017 - any error: protobuf refuses these too
            pb.ObjectChunk.FromString(raw)
        assert decode_chunk(raw).malformed, raw


class _GarbageShards:
    """A server whose shard stream is bytes that are not an ObjectChunk."""

    def stream(self, request: pb.StreamShardsRequest, context: Any) -> Any:
        yield b"\x0a\xff\xff"  # an id field claiming more bytes than follow


def test_a_server_sending_unreadable_chunks_is_refused_naming_the_shard() -> None:
    handler = grpc.method_handlers_generic_handler("shardstore.v1.Registry", {
        "StreamShards": grpc.unary_stream_rpc_method_handler(
            _GarbageShards().stream, request_deserializer=pb.StreamShardsRequest.FromString,
            response_serializer=lambda message: message)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GrpcClient(f"127.0.0.1:{port}", use_cache=False, retries=0) as client, \
                pytest.raises(IntegrityError, match=f"shard {ID}: server sent a message that is not an ObjectChunk"):
            list(client.fetch_shards([ID]))
    finally:
        server.stop(grace=None)
