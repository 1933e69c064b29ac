"""The content index: which stored shard already holds the encoding of a shard's pieces, so push need not encode them.

A shard's id is the digest of its *encoded* bytes, so without help a push can
only ask whether the store has a shard after encoding it. The index maps what
decides a shard's bytes before any encoding -- each piece's dtype, shape,
raw-bytes digest and codec pipeline, in the order the plan packs them -- to
the shard built from exactly those pieces, and each piece's stream in it::

    index/<key[:2]>/<key>    key = BLAKE3 of canonical JSON of those inputs

Why whole plans and not single pieces: shard bytes depend on every piece they
pack (DESIGN invariant 5), and chunking is deterministic, so a re-push skips a
shard only when *all* its pieces are indexed under that same plan; the
manifest it writes is then byte-identical to one from a full encode.

An entry is a cache, never a source of truth. Its bytes hold the inputs it
was keyed on (parsing recomputes the key, so an entry cannot answer for
another plan), and push uses it only after the store confirms, in one batched
query, that the shard exists with the entry's size. A missing, truncated or
unparsable object makes push encode the plan again and rewrite the entry.
Entries are the one mutable kind besides refs: written with a plain put,
rewritten whenever the plan is encoded again. gc leaves them alone; a stale
one costs one failed check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shardstore.codecs.base import Buffer
from shardstore.errors import FormatError
from shardstore.format import canonical_json
from shardstore.format.digest import HASH_NAME, digest, is_object_id, is_stream_checksum, stream_checksum
from shardstore.format.shard import SHARD_FORMAT, StreamHeader
from shardstore.repo.quality import ErrorStats

INDEX_FORMAT = "shardstore.index.v2"  # v2: each piece also records its stream checksum ("check")
INDEX_PREFIX = "index"


def index_key(key: str) -> str:
    return f"{INDEX_PREFIX}/{key[:2]}/{key}"


@dataclass(frozen=True)
class PieceInput:
    """What decides one stream's bytes: the piece's dtype and shape, its raw bytes' digest, its pipeline."""

    dtype: str
    shape: tuple[int, ...]
    raw: str  # BLAKE3 of the raw (unencoded) piece: what identifies it (collision resistant)
    codec: tuple[dict[str, Any], ...]
    # Its stream checksum (XXH3-128, shard format v2): what a lossless stream of it declares.
    check: str = ""

    @classmethod
    def of(cls, dtype: str, shape: tuple[int, ...], raw: Buffer, codec: Sequence[dict[str, Any]]) -> PieceInput:
        view = memoryview(raw).cast("B")
        return cls(dtype, tuple(shape), digest(view), tuple(codec), stream_checksum(view))

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "raw": self.raw, "check": self.check,
                "codec": list(self.codec)}


def plan_key(pieces: Sequence[PieceInput]) -> str:
    """The index key of a shard plan: the same pieces, in the same order, under the same pipelines."""
    doc = {"format": INDEX_FORMAT, "shard_format": SHARD_FORMAT, "hash": HASH_NAME,
           "pieces": [p.to_json() for p in pieces]}
    return digest(canonical_json.dumps(doc))


@dataclass(frozen=True)
class IndexedPiece:
    """One piece of an indexed plan: its inputs, its stream's size, and (lossy pipelines) its error."""

    input: PieceInput
    stored_bytes: int
    error: ErrorStats | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {**self.input.to_json(), "stored_bytes": self.stored_bytes}
        if self.error is not None:  # the exact sums, so a reused lossy piece reports the same quality
            doc["error"] = {"elements": self.error.elements, "squared_error": self.error.squared_error,
                            "energy": self.error.energy, "max_abs_error": self.error.max_abs_error}
        return doc


@dataclass(frozen=True)
class IndexEntry:
    """Stream ``i`` of shard ``shard`` (``size`` bytes) is the encoding of ``pieces[i]``."""

    shard: str
    size: int
    pieces: tuple[IndexedPiece, ...]

    @property
    def key(self) -> str:
        return plan_key([p.input for p in self.pieces])

    def to_bytes(self) -> bytes:
        return canonical_json.dumps({"format": INDEX_FORMAT, "shard": self.shard, "size": self.size,
                                     "pieces": [p.to_json() for p in self.pieces]})

    @classmethod
    def parse(cls, data: bytes, key: str | None) -> IndexEntry:
        """Strictly, and only as the entry of ``key`` (when given): its inputs must hash to it."""
        what = f"index entry {key or ''}".rstrip()
        doc = canonical_json.loads(data, what)
        if not isinstance(doc, dict) or set(doc) != {"format", "shard", "size", "pieces"} \
                or doc["format"] != INDEX_FORMAT:
            raise FormatError(f"{what}: not a {INDEX_FORMAT} entry")
        shard, size, raw_pieces = doc["shard"], doc["size"], doc["pieces"]
        if not is_object_id(shard) or not _count(size) or not isinstance(raw_pieces, list) or not raw_pieces:
            raise FormatError(f"{what}: bad shard, size or pieces")
        entry = cls(shard, size, tuple(_piece(p, what) for p in raw_pieces))
        if key is not None and entry.key != key:
            raise FormatError(f"{what}: its pieces hash to another key")
        return entry

    def matches(self, streams: Sequence[tuple[StreamHeader, int]]) -> bool:
        """Whether a shard whose streams are ``(header, stored bytes)`` can be what this entry says.

        Every stream's dtype, shape, pipeline and size must agree; for a lossless
        pipeline the stream's checksum (of its decoded bytes) must be the piece's
        own (``check``), so a lossless entry cannot point at other data. A lossy
        stream's checksum covers its dequantized bytes, which only an encode
        could recompute: there the writer is trusted.
        """
        if len(streams) != len(self.pieces):
            return False
        for piece, (header, stored) in zip(self.pieces, streams, strict=True):
            if (header.dtype, tuple(header.shape), tuple(header.codec), stored) != (
                    piece.input.dtype, piece.input.shape, piece.input.codec, piece.stored_bytes):
                return False
            if piece.error is None and header.checksum != piece.input.check:
                return False
        return True


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _piece(raw: object, what: str) -> IndexedPiece:
    keys = {"dtype", "shape", "raw", "check", "codec", "stored_bytes"}
    if not isinstance(raw, dict) or not keys <= set(raw) <= keys | {"error"}:
        raise FormatError(f"{what}: a piece must have exactly {', '.join(sorted(keys))} (and error when lossy)")
    dtype, shape, raw_id, check, codec, stored = (raw[k] for k in ("dtype", "shape", "raw", "check", "codec",
                                                                    "stored_bytes"))
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_count(d) for d in shape) \
            or not is_object_id(raw_id) or not is_stream_checksum(check) or not isinstance(codec, list) or not codec \
            or not all(isinstance(c, dict) for c in codec) or not _count(stored):
        raise FormatError(f"{what}: bad piece {raw!r}")
    error = None
    if "error" in raw:
        e = raw["error"]
        fields = ("elements", "squared_error", "energy", "max_abs_error")
        if not isinstance(e, dict) or set(e) != set(fields) or not _count(e["elements"]) \
                or not all(_number(e[f]) for f in fields[1:]):
            raise FormatError(f"{what}: bad error figures {e!r}")
        error = ErrorStats(e["elements"], float(e["squared_error"]), float(e["energy"]), float(e["max_abs_error"]))
    return IndexedPiece(PieceInput(dtype, tuple(shape), raw_id, tuple(codec), check), stored, error)
