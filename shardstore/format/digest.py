"""Object ids: the BLAKE3 digest of an object's bytes, as 64 lowercase hex digits.

BLAKE3 because it hashes at several GB/s on one core (SHA-256 manages about 1.7
here), and every shard is hashed on push, on the server, in the client and in
verify. The choice is written into every manifest (``"hash": "blake3"``).
"""

from __future__ import annotations

import re

import blake3
import xxhash

from shardstore.errors import InvalidInputError

HASH_NAME = "blake3"
ID_LENGTH = 64
_ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def digest(data: bytes | bytearray | memoryview) -> str:
    # max_threads: large inputs are hashed in parallel by the Rust implementation.
    return str(blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) > 1 << 22 else 1).hexdigest())


# Checksums of decoded stream bytes (shard format v2). Not an id: the shard's BLAKE3 id already
# authenticates the stored bytes, this checksum included, so it only has to catch a decoder that
# returns wrong bytes (a bug, a bit flip), which a 128-bit XXH3 does at ~30 GB/s a core,
# against ~4.5 GB/s for a second BLAKE3 pass (docs/design.md, "How decoded bytes are checked").
STREAM_CHECKSUM = "xxh3-128"
# Format v1 shards checked decoded bytes with BLAKE3; they still read.
STREAM_CHECKSUM_V1 = HASH_NAME
_CHECKSUM_PATTERNS = {STREAM_CHECKSUM: re.compile(r"^[0-9a-f]{32}$"), STREAM_CHECKSUM_V1: _ID_PATTERN}

# Benchmarks only (bench_datapath.py measures what the checks cost): when False, decoded
# bytes are not checksummed and shards are not hashed against their ids. Nothing else sets it.
_bench_checks = True


def stream_checksum(data: bytes | bytearray | memoryview, algorithm: str = STREAM_CHECKSUM) -> str:
    """The checksum of a stream's decoded bytes under ``algorithm`` (``xxh3-128`` or, for v1 shards, ``blake3``)."""
    if algorithm == STREAM_CHECKSUM:
        return str(xxhash.xxh3_128_hexdigest(data))
    return digest(data)


def is_stream_checksum(text: object, algorithm: str = STREAM_CHECKSUM) -> bool:
    pattern = _CHECKSUM_PATTERNS.get(algorithm)
    return isinstance(text, str) and pattern is not None and bool(pattern.match(text))


def matches(data: bytes | bytearray | memoryview, object_id: str) -> bool:
    """Whether ``data`` is the object named ``object_id`` (always True only in a bench that turned checks off)."""
    return not _bench_checks or digest(data) == object_id


class IdHasher:
    """The id of bytes fed in parts (:meth:`update`), for a reader that hashes as it reads."""

    def __init__(self) -> None:
        self._hasher = blake3.blake3(max_threads=1)  # parts are small; the readers run in parallel already

    def update(self, part: bytes | bytearray | memoryview) -> None:
        if _bench_checks:
            self._hasher.update(part)

    def matches(self, object_id: str) -> bool:
        """Whether the bytes fed are the object named ``object_id``."""
        return not _bench_checks or str(self._hasher.hexdigest()) == object_id


def stream_matches(data: bytes | bytearray | memoryview, checksum: str, algorithm: str) -> bool:
    return not _bench_checks or stream_checksum(data, algorithm) == checksum


def is_object_id(text: object) -> bool:
    return isinstance(text, str) and bool(_ID_PATTERN.match(text))


def check_object_id(text: object, what: str = "object id") -> str:
    if not is_object_id(text):
        raise InvalidInputError(f"invalid {what} {text!r}: expected 64 lowercase hex digits")
    assert isinstance(text, str)
    return text
