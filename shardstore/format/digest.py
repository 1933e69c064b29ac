"""Object ids: the BLAKE3 digest of an object's bytes, as 64 lowercase hex digits.

BLAKE3 because it hashes at several GB/s on one core (SHA-256 manages about 1.7
here), and every shard is hashed on push, on the server, in the client and in
verify. The choice is written into every manifest (``"hash": "blake3"``).
"""

from __future__ import annotations

import re

import blake3

from shardstore.errors import InvalidInputError

HASH_NAME = "blake3"
ID_LENGTH = 64
_ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def digest(data: bytes | bytearray | memoryview) -> str:
    # max_threads: large inputs are hashed in parallel by the Rust implementation.
    return str(blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) > 1 << 22 else 1).hexdigest())


def is_object_id(text: object) -> bool:
    return isinstance(text, str) and bool(_ID_PATTERN.match(text))


def check_object_id(text: object, what: str = "object id") -> str:
    if not is_object_id(text):
        raise InvalidInputError(f"invalid {what} {text!r}: expected 64 lowercase hex digits")
    assert isinstance(text, str)
    return text
