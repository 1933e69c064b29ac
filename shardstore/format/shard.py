"""Shards: safetensors files holding encoded streams, self-describing enough to decode.

A shard holds one or more *streams*, each the encoding of one piece (a row
range of a tensor). Inside the safetensors container each stream is a 1-D
``U8`` tensor named by its index (``"0"``, ``"1"``...), and ``__metadata__``
carries one key, ``"shardstore"``, whose value is canonical JSON::

    {"format": "shardstore.shard.v2", "checksum": "blake3", "stream_checksum": "xxh3-128",
     "streams": {"0": {"dtype": "F32", "shape": [512, 384],
                       "codec": [{"id": "byteplanes-zstd.v1", "level": 3}],
                       "checksum": "<xxh3-128 of the decoded bytes>"}}}

``checksum`` names the hash of shard ids; ``stream_checksum`` the check of decoded
bytes. Format v1 (still read, no longer written) had no ``stream_checksum`` key and
checked decoded bytes with BLAKE3 (64 hex digits).

Decoding a stream is not this module's business (``format`` is a leaf and
imports no codec): :func:`shardstore.repo.pieces.decode_stream` does it.

Tensor names and row offsets are deliberately *not* in the shard: they live in
the manifest, so identical data under another name, in another model or at
another row offset produces the same shard bytes and the same shard id
(DESIGN invariant 5), and is stored and sent once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardstore.errors import FormatError, IntegrityError
from shardstore.format import canonical_json
from shardstore.format.digest import (
    HASH_NAME,
    STREAM_CHECKSUM,
    STREAM_CHECKSUM_V1,
    is_stream_checksum,
    matches,
)
from shardstore.format.dtypes import nbytes
from shardstore.format.safetensors_io import (
    SafetensorsHeader,
    build_header,
    checked_nbytes,
    header_length,
    parse_bytes,
    parse_header,
    quote,
)

SHARD_FORMAT = "shardstore.shard.v2"  # written; v2 checks decoded bytes with XXH3-128
SHARD_FORMAT_V1 = "shardstore.shard.v1"  # still read: decoded bytes checked with BLAKE3
_STREAM_CHECKSUMS = {SHARD_FORMAT: STREAM_CHECKSUM, SHARD_FORMAT_V1: STREAM_CHECKSUM_V1}
METADATA_KEY = "shardstore"
HEADER_LENGTH_BYTES = 8  # the little-endian u64 in front of every safetensors header


@dataclass(frozen=True)
class StreamHeader:
    dtype: str
    shape: tuple[int, ...]  # of the piece, not of the whole tensor
    codec: tuple[dict[str, Any], ...]
    checksum: str  # of the decoded bytes, under the shard's stream checksum algorithm

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded piece."""
        return nbytes(self.dtype, self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "codec": list(self.codec), "checksum": self.checksum}


@dataclass(frozen=True)
class Shard:
    shard_id: str
    streams: dict[str, tuple[StreamHeader, memoryview]]
    # How each stream's decoded bytes are checked: "xxh3-128" (format v2) or "blake3" (v1).
    stream_checksum: str = STREAM_CHECKSUM

    def stream(self, key: str) -> tuple[StreamHeader, memoryview]:
        """One stream's header and encoded bytes; a :class:`FormatError` naming the shard when it has none."""
        try:
            return self.streams[key]
        except KeyError:
            raise FormatError(f"shard {self.shard_id}: has no stream {key!r}") from None


def build_shard(streams: list[tuple[StreamHeader, bytes]]) -> bytes:
    """Serialise streams into shard bytes; deterministic for equal input (canonical JSON)."""
    metadata = {
        "format": SHARD_FORMAT,
        "checksum": HASH_NAME,
        "stream_checksum": STREAM_CHECKSUM,
        "streams": {str(i): header.to_json() for i, (header, _payload) in enumerate(streams)},
    }
    entries = [(str(i), "U8", (len(payload),), len(payload)) for i, (_h, payload) in enumerate(streams)]
    head = build_header(entries, {METADATA_KEY: canonical_json.dumps(metadata).decode()})
    return head + b"".join(payload for _h, payload in streams)


def _stream_header(key: str, raw: Any, what: str, algorithm: str) -> StreamHeader:
    where = f"{what}: stream {quote(key)}"
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "codec", "checksum"}:
        raise FormatError(f"{where}: header must have exactly dtype, shape, codec, checksum")
    dtype, shape, codec, checksum = raw["dtype"], raw["shape"], raw["codec"], raw["checksum"]
    # The decoded size is what decoding allocates: it must be a sane number before anyone trusts it.
    checked_nbytes(dtype, shape, where)
    if not isinstance(codec, list) or not codec or not all(isinstance(c, dict) for c in codec):
        raise FormatError(f"{where}: codec must be a non-empty list of configs")
    if not is_stream_checksum(checksum, algorithm):
        raise FormatError(f"{where}: bad {algorithm} checksum {quote(checksum)}")
    return StreamHeader(dtype, tuple(shape), tuple(codec), checksum)


def _stream_headers(header: SafetensorsHeader, what: str) -> tuple[str, dict[str, StreamHeader]]:
    """The shardstore metadata of a parsed safetensors header: the stream checksum algorithm, and each
    stream's dtype, shape, codec, checksum."""
    metadata = header.metadata or {}
    if set(metadata) != {METADATA_KEY}:
        raise FormatError(f"{what}: __metadata__ must hold exactly the {METADATA_KEY!r} key")
    doc = canonical_json.loads(metadata[METADATA_KEY], f"{what}: metadata")
    if not isinstance(doc, dict) or not isinstance(doc.get("format"), str) or doc["format"] not in _STREAM_CHECKSUMS \
            or doc.get("checksum") != HASH_NAME:
        raise FormatError(f"{what}: not a {SHARD_FORMAT} (or v1) shard with {HASH_NAME} checksums")
    algorithm = _STREAM_CHECKSUMS[doc["format"]]
    expected_keys = {"format", "checksum", "streams"}
    if doc["format"] == SHARD_FORMAT:
        expected_keys.add("stream_checksum")
    if set(doc) != expected_keys or doc.get("stream_checksum", algorithm) != algorithm:
        raise FormatError(f"{what}: {doc['format']} metadata must hold exactly {sorted(expected_keys)} "
                          f"with {algorithm} stream checksums")
    raw_streams = doc.get("streams")
    entries = header.by_name()
    if not isinstance(raw_streams, dict) or set(raw_streams) != set(entries):
        raise FormatError(f"{what}: stream headers do not match the stored streams")
    streams: dict[str, StreamHeader] = {}
    for key, entry in entries.items():
        if entry.dtype != "U8" or len(entry.shape) != 1:
            raise FormatError(f"{what}: stream {quote(key)} must be a 1-D U8 tensor")
        streams[key] = _stream_header(key, raw_streams[key], what, algorithm)
    return algorithm, streams


def parse_shard(data: bytes | bytearray | memoryview, shard_id: str, *, verify_id: bool = True) -> Shard:
    """Check the bytes against their id (DESIGN invariant 3), then parse strictly."""
    what = f"shard {shard_id}"
    if verify_id and not matches(data, shard_id):
        raise IntegrityError(f"{what}: content does not match its id (corrupt or truncated)")
    header, area = parse_bytes(data, what)
    entries = header.by_name()
    algorithm, streams = _stream_headers(header, what)
    return Shard(shard_id, {key: (stream, area[entries[key].begin : entries[key].end])
                            for key, stream in streams.items()}, algorithm)


def shard_head_length(prefix: bytes, shard_id: str, shard_size: int) -> int:
    """How many leading bytes of a shard of ``shard_size`` bytes hold its header (from its first 8 bytes)."""
    return HEADER_LENGTH_BYTES + header_length(prefix, f"shard {shard_id}", shard_size)


def parse_shard_head(head: bytes, shard_id: str, shard_size: int) -> dict[str, StreamHeader]:
    """The stream headers of a shard from its first :func:`shard_head_length` bytes, as strictly as a whole shard.

    For readers that only describe a shard (``shardstore diff`` compares stream checksums): the
    bytes cannot be checked against the shard id without the whole shard, so nothing decoded or
    returned as data may come from here; a reader of data calls :func:`parse_shard`.
    """
    what = f"shard {shard_id}"
    length = header_length(head, what, shard_size)
    if len(head) < HEADER_LENGTH_BYTES + length:
        raise FormatError(f"{what}: header cut short ({len(head)} of {HEADER_LENGTH_BYTES + length} bytes)")
    header = parse_header(head[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + length], what,
                          shard_size - HEADER_LENGTH_BYTES - length)
    return _stream_headers(header, what)[1]


def read_stream_headers(read_range: Callable[[int, int], bytes], shard_id: str,
                        size: int) -> list[tuple[StreamHeader, int]]:
    """Each stream's header and stored size, in stream order, reading only the shard's header.

    ``read_range(start, end)`` returns those bytes of the ``size``-byte shard. As with
    :func:`parse_shard_head`, nothing is checked against the shard's id: this answers what a
    shard claims to hold (the content index's check), not whether its bytes are intact.
    """
    what = f"shard {shard_id}"
    length = header_length(read_range(0, HEADER_LENGTH_BYTES), what, size)
    header = parse_header(read_range(HEADER_LENGTH_BYTES, HEADER_LENGTH_BYTES + length), what,
                          size - HEADER_LENGTH_BYTES - length)
    streams, entries = _stream_headers(header, what)[1], header.by_name()
    ordered = [str(i) for i in range(len(streams))]
    if sorted(streams) != sorted(ordered):
        raise FormatError(f"{what}: streams are not named 0..{len(streams) - 1}")
    return [(streams[key], entries[key].nbytes) for key in ordered]
