"""Manifests: the canonical JSON document of one model version, named by its digest.

Layout (``docs/design.md`` has the prose)::

    {"format": "shardstore.manifest.v1", "hash": "blake3", "base": null,
     "tensors": {NAME: {"dtype", "shape", "codec": [configs], "raw_bytes", "stored_bytes",
                        "pieces": [{"shard", "stream", "rows": [r0, r1], "stored_bytes"}]}},
     "files":   [{"path", "header", "metadata", "tensors": [NAME, ...]}],
     "blobs":   {PATH: {"id", "size"}},
     "shards":  {SHARD_ID: size},
     "totals":  {"raw_bytes", "stored_bytes", "tensors", "shards", "files", "blob_bytes"}}

A manifest pushed with ``--base`` also has, only then: ``"base_shards": [SHARD_ID...]``
(shards it shares with the base, not counted in ``stored_bytes``; ``totals.base_bytes``
sums them) and, on a piece stored as an XOR against the base's same piece,
``"base": {"shard", "stream"[, "base": ...]}`` (``docs/sparse-delta.md``).

A manifest may carry ``"created": "YYYY-MM-DDTHH:MM:SSZ"`` (UTC, RFC 3339, whole seconds): when
its push made it. Absent, not null, in manifests made before it existed, which keep their ids.

``files`` lists the safetensors files of the model in the order they were
pushed, each with the blob id of its original header bytes, so a pull writes
byte-identical files. ``blobs`` are the other files (config.json, tokenizer...).

Versioning (``docs/formats.md``): ``format`` names the major version, and a
reader refuses one it does not know. Within v1 the format grows only by
optional keys, absent when unused (so every existing manifest keeps its bytes
and id), each with a changelog entry in ``docs/formats.md`` and a place in the
key sets below. A reader refuses a key it does not know, naming it: a key can
change what the bytes mean (``base`` did), and a manifest is what every decode
trusts, so "parsed" must mean "understood".
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shardstore.errors import FormatError, IntegrityError, UnsupportedFormatError
from shardstore.format import canonical_json
from shardstore.format.digest import HASH_NAME, digest, is_object_id
from shardstore.format.dtypes import ITEMSIZE, nbytes
from shardstore.format.safetensors_io import checked_nbytes

MANIFEST_FORMAT = "shardstore.manifest.v1"
# The optional "created" time: UTC, whole seconds (strftime format and the pattern parsing accepts).
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_CREATED = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
FORMAT_FAMILY = "shardstore.manifest."
# Every key a v1 manifest may hold, per object. A new optional key goes here *and* into the
# changelog of docs/formats.md; anything else is refused by name (see the module doc).
MANIFEST_KEYS = frozenset({"format", "hash", "base", "tensors", "files", "blobs", "shards", "totals", "base_shards",
                           "created"})
TENSOR_KEYS = frozenset({"dtype", "shape", "codec", "raw_bytes", "stored_bytes", "pieces", "quality"})
PIECE_KEYS = frozenset({"shard", "stream", "rows", "stored_bytes", "base"})
FILE_KEYS = frozenset({"path", "header", "metadata", "tensors"})
BLOB_KEYS = frozenset({"id", "size"})
TOTALS_KEYS = frozenset({"raw_bytes", "stored_bytes", "blob_bytes", "tensors", "shards", "files", "base_bytes"})
MAX_MANIFEST_BYTES = 256 << 20
# The optional per-tensor "quality" of a lossy tensor (``shardstore.repo.quality``); null = infinite.
QUALITY_KEYS = ("max_abs_error", "rel_rmse", "snr_db")
# A delta's base piece may itself be a delta (a fine-tune of a fine-tune); decoding one piece
# touches at most this many further shards, so a chain cannot grow without bound.
MAX_DELTA_DEPTH = 8


@dataclass(frozen=True)
class PieceBase:
    """The base model's piece a delta piece is XORed with: its stream, and that piece's own base if any."""

    shard: str
    stream: str
    base: PieceBase | None = None

    @property
    def depth(self) -> int:
        return 1 + (self.base.depth if self.base is not None else 0)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"shard": self.shard, "stream": self.stream}
        if self.base is not None:
            doc["base"] = self.base.to_json()
        return doc


@dataclass(frozen=True)
class PieceRef:
    shard: str
    stream: str
    rows: tuple[int, int]
    stored_bytes: int
    # Set when the stream holds the XOR with a base model's piece (``push --base``).
    base: PieceBase | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"shard": self.shard, "stream": self.stream, "rows": list(self.rows),
                               "stored_bytes": self.stored_bytes}
        if self.base is not None:  # absent, not null, so manifests without deltas keep their bytes and ids
            doc["base"] = self.base.to_json()
        return doc


@dataclass(frozen=True)
class TensorRecord:
    dtype: str
    shape: tuple[int, ...]
    codec: tuple[dict[str, Any], ...]
    pieces: tuple[PieceRef, ...]
    # A lossy pipeline's error against the original: rel_rmse, snr_db, max_abs_error (absent when lossless).
    quality: dict[str, float | None] | None = None

    @property
    def raw_bytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    @property
    def stored_bytes(self) -> int:
        return sum(p.stored_bytes for p in self.pieces)

    @property
    def rows(self) -> int:
        """Rows along dim 0; a 0-d tensor counts as one row."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return nbytes(self.dtype, self.shape[1:]) if self.shape else ITEMSIZE[self.dtype]

    def pieces_for_rows(self, start: int, stop: int) -> list[PieceRef]:
        return [p for p in self.pieces if p.rows[0] < stop and p.rows[1] > start] if stop > start else []


@dataclass(frozen=True)
class FileRecord:
    path: str
    header: str  # blob id of the original header bytes (8-byte length excluded)
    metadata: dict[str, str] | None
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class BlobRecord:
    id: str
    size: int


@dataclass(frozen=True)
class Manifest:
    tensors: dict[str, TensorRecord]
    files: tuple[FileRecord, ...]
    blobs: dict[str, BlobRecord]
    shards: dict[str, int]
    base: str | None = None
    # The shards of ``shards`` that the base model already stored: a delta manifest lists every
    # shard it needs (so verify, gc and copies see them) but costs only the others.
    base_shards: frozenset[str] = frozenset()
    # When the push made this manifest (CREATED_FORMAT, UTC); None for manifests older than the field.
    created: str | None = None
    _bytes: bytes = field(default=b"", compare=False, repr=False)

    @property
    def raw_bytes(self) -> int:
        return sum(t.raw_bytes for t in self.tensors.values())

    @property
    def stored_bytes(self) -> int:
        return sum(size for shard, size in self.shards.items() if shard not in self.base_shards)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "hash": HASH_NAME,
            "base": self.base,
            "tensors": {
                name: {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "codec": list(t.codec),
                    "raw_bytes": t.raw_bytes,
                    "stored_bytes": t.stored_bytes,
                    "pieces": [p.to_json() for p in t.pieces],
                    **({"quality": t.quality} if t.quality is not None else {}),
                }
                for name, t in self.tensors.items()
            },
            "files": [
                {"path": f.path, "header": f.header, "metadata": f.metadata, "tensors": list(f.tensors)}
                for f in self.files
            ],
            "blobs": {path: {"id": b.id, "size": b.size} for path, b in self.blobs.items()},
            "shards": dict(self.shards),
            "totals": {
                "raw_bytes": self.raw_bytes,
                "stored_bytes": self.stored_bytes,
                "blob_bytes": sum(b.size for b in self.blobs.values()),
                "tensors": len(self.tensors),
                "shards": len(self.shards),
                "files": len(self.files) + len(self.blobs),
            },
        }
        if self.created is not None:  # absent when unknown: older manifests keep their bytes and ids
            doc["created"] = self.created
        if self.base_shards:  # absent when empty: manifests without a base keep their bytes and ids
            doc["base_shards"] = sorted(self.base_shards)
            doc["totals"]["base_bytes"] = sum(self.shards[shard] for shard in self.base_shards)
        return doc

    def to_bytes(self) -> bytes:
        return self._bytes or canonical_json.dumps(self.to_json())

    @property
    def id(self) -> str:
        return digest(self.to_bytes())

    def select(self, patterns: Iterable[str] | None) -> list[str]:
        """Tensor names matching any glob (all when ``patterns`` is empty), in file order."""
        names = [n for f in self.files for n in f.tensors]
        pats = list(patterns or [])
        return [n for n in names if not pats or any(fnmatch.fnmatchcase(n, p) for p in pats)]

    def shards_for(self, names: Iterable[str]) -> list[str]:
        """The distinct shards holding these tensors, in first-use order."""
        seen: dict[str, None] = {}
        for name in names:
            for piece in self.tensors[name].pieces:
                seen.setdefault(piece.shard, None)
        return list(seen)


def _known_keys(doc: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise UnsupportedFormatError(
            f"{where}: unknown field {unknown[0]!r} (written by a newer shardstore? docs/formats.md lists the fields "
            f"of {MANIFEST_FORMAT})")


def _req(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"{what}: field {key!r} is missing or has the wrong type")
    return value


def _tensor(name: str, raw: Any, shard_sizes: dict[str, int], what: str) -> TensorRecord:
    where = f"{what}: tensor {name!r}"
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: must be an object")
    _known_keys(raw, TENSOR_KEYS, where)
    dtype = _req(raw, "dtype", str, where)
    if dtype not in ITEMSIZE:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    shape = _req(raw, "shape", list, where)
    checked_nbytes(dtype, shape, where)  # no dimension or size past 2**62: what pull would allocate on disk
    codec = _req(raw, "codec", list, where)
    if not codec or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in codec):
        raise FormatError(f"{where}: codec must be a non-empty list of configs")
    pieces: list[PieceRef] = []
    position = 0
    rows = shape[0] if shape else 1
    for raw_piece in _req(raw, "pieces", list, where):
        if not isinstance(raw_piece, dict):
            raise FormatError(f"{where}: piece must be an object")
        _known_keys(raw_piece, PIECE_KEYS, f"{where}: piece")
        shard = _req(raw_piece, "shard", str, where)
        span = _req(raw_piece, "rows", list, where)
        stored = _req(raw_piece, "stored_bytes", int, where)
        stream = _req(raw_piece, "stream", str, where)
        if not is_object_id(shard) or shard not in shard_sizes:
            raise FormatError(f"{where}: piece names unknown shard {shard!r}")
        if len(span) != 2 or span[0] != position or not all(type(r) is int for r in span) or span[1] < span[0]:
            raise FormatError(f"{where}: pieces must tile the rows in order (at row {position})")
        if stored < 0 or stored > shard_sizes[shard]:
            raise FormatError(f"{where}: piece stored_bytes out of range")
        base = _piece_base(raw_piece.get("base"), shard_sizes, where) if "base" in raw_piece else None
        position = span[1]
        pieces.append(PieceRef(shard, stream, (span[0], span[1]), stored, base))
    if position != rows or (rows > 0 and not pieces):
        raise FormatError(f"{where}: pieces cover rows [0, {position}) of {rows}")
    quality = _quality(raw["quality"], where) if "quality" in raw else None
    record = TensorRecord(dtype, tuple(shape), tuple(codec), tuple(pieces), quality)
    if raw.get("raw_bytes") != record.raw_bytes or raw.get("stored_bytes") != record.stored_bytes:
        raise FormatError(f"{where}: raw_bytes / stored_bytes disagree with shape and pieces")
    return record


def _quality(raw: Any, where: str) -> dict[str, float | None]:
    if not isinstance(raw, dict) or set(raw) != set(QUALITY_KEYS):
        raise FormatError(f"{where}: quality must be an object with {', '.join(QUALITY_KEYS)}")
    if not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in raw.values()):
        raise FormatError(f"{where}: quality figures must be numbers or null")
    return dict(raw)


def _piece_base(raw: Any, shard_sizes: dict[str, int], where: str, depth: int = 1) -> PieceBase:
    if depth > MAX_DELTA_DEPTH:
        raise FormatError(f"{where}: delta chain deeper than {MAX_DELTA_DEPTH}")
    if not isinstance(raw, dict) or not set(raw) <= {"shard", "stream", "base"}:
        raise FormatError(f"{where}: piece base must be an object with shard, stream and optional base")
    shard = _req(raw, "shard", str, where)
    stream = _req(raw, "stream", str, where)
    if not is_object_id(shard) or shard not in shard_sizes:
        raise FormatError(f"{where}: piece base names unknown shard {shard!r}")
    inner = _piece_base(raw["base"], shard_sizes, where, depth + 1) if "base" in raw else None
    return PieceBase(shard, stream, inner)


MAX_PATH_CHARS = 4096


def check_file_path(path: str, what: str = "manifest") -> str:
    """A file path a pull may create: relative, normalized, ``/``-separated, printable; else FormatError.

    Refused: empty, absolute, ``.``/``..``/empty parts (``a//b``, ``a/``), backslashes, NUL and other
    control characters (a NUL made a traceback; a newline makes a log line lie).
    """
    shown = repr(path[:60])
    if not path or len(path) > MAX_PATH_CHARS:
        raise FormatError(f"{what}: file path {shown} is empty or longer than {MAX_PATH_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise FormatError(f"{what}: file path {shown} contains a control character")
    if path.startswith("/") or "\\" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise FormatError(f"{what}: file path {shown} must be relative and normalized (no /, ., .., \\ or //)")
    return path


def check_file_paths(paths: list[str], what: str = "manifest") -> None:
    """Every path valid, none twice, and none a folder of another (``a`` and ``a/b`` cannot both be files)."""
    seen: set[str] = set()
    for path in paths:
        check_file_path(path, what)
        if path in seen:
            raise FormatError(f"{what}: file path {path[:60]!r} is listed twice (a file and a blob collide)")
        seen.add(path)
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in seen:
                raise FormatError(f"{what}: file path {path[:60]!r} lies inside {folder!r}, which is a file")


def parse_manifest(data: bytes, manifest_id: str | None = None) -> Manifest:
    """Parse and validate a manifest; when ``manifest_id`` is given, check the bytes against it first."""
    what = f"manifest {manifest_id}" if manifest_id else "manifest"
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{what}: larger than {MAX_MANIFEST_BYTES} bytes")
    if manifest_id is not None and digest(data) != manifest_id:
        raise IntegrityError(f"{what}: content does not match its id")
    doc = canonical_json.loads(data, what)
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: not a {MANIFEST_FORMAT} document")
    found = doc.get("format")
    if found != MANIFEST_FORMAT and isinstance(found, str) and found.startswith(FORMAT_FAMILY):
        raise UnsupportedFormatError(f"{what}: format {found!r} is not one this shardstore reads ({MANIFEST_FORMAT}): "
                                     "upgrade shardstore")
    if found != MANIFEST_FORMAT or doc.get("hash") != HASH_NAME:
        raise FormatError(f"{what}: not a {MANIFEST_FORMAT} document with {HASH_NAME} ids")
    _known_keys(doc, MANIFEST_KEYS, what)
    totals = doc.get("totals", {})
    if not isinstance(totals, dict):
        raise FormatError(f"{what}: totals must be an object")
    _known_keys(totals, TOTALS_KEYS, f"{what}: totals")
    base = doc.get("base")
    if base is not None and not is_object_id(base):
        raise FormatError(f"{what}: bad base id {base!r}")
    shards = _req(doc, "shards", dict, what)
    if not all(is_object_id(k) and type(v) is int and v >= 0 for k, v in shards.items()):
        raise FormatError(f"{what}: shards must map ids to sizes")
    tensors = {name: _tensor(name, raw, shards, what) for name, raw in _req(doc, "tensors", dict, what).items()}
    files: list[FileRecord] = []
    listed: set[str] = set()
    for raw_file in _req(doc, "files", list, what):
        if not isinstance(raw_file, dict):
            raise FormatError(f"{what}: file entry must be an object")
        _known_keys(raw_file, FILE_KEYS, f"{what}: file")
        path = _req(raw_file, "path", str, what)
        header = _req(raw_file, "header", str, what)
        names = _req(raw_file, "tensors", list, what)
        metadata = raw_file.get("metadata")
        if not is_object_id(header) or not all(isinstance(n, str) and n in tensors for n in names):
            raise FormatError(f"{what}: file {path!r}: bad header id or unknown tensor")
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise FormatError(f"{what}: file {path!r}: metadata must map strings to strings")
        listed.update(names)
        files.append(FileRecord(path, header, metadata, tuple(names)))
    if listed != set(tensors) or sum(len(f.tensors) for f in files) != len(tensors):
        raise FormatError(f"{what}: every tensor must belong to exactly one file")
    blobs: dict[str, BlobRecord] = {}
    for path, raw_blob in _req(doc, "blobs", dict, what).items():
        if isinstance(raw_blob, dict):
            _known_keys(raw_blob, BLOB_KEYS, f"{what}: blob {path!r}")
        if not (isinstance(raw_blob, dict) and is_object_id(raw_blob.get("id")) and type(raw_blob.get("size")) is int
                and raw_blob["size"] >= 0):
            raise FormatError(f"{what}: blob {path!r}: needs an id and a size")
        blobs[path] = BlobRecord(raw_blob["id"], raw_blob["size"])
    base_shards = doc.get("base_shards", [])
    if not isinstance(base_shards, list) or not all(isinstance(s, str) and s in shards for s in base_shards):
        raise FormatError(f"{what}: base_shards must list shards of the manifest")
    if base_shards and base is None:
        raise FormatError(f"{what}: base_shards without a base")
    created = doc.get("created")
    # Present means a time: null would make a manifest whose rebuilt bytes drop the key, another id.
    if "created" in doc and not (isinstance(created, str) and _CREATED.fullmatch(created)):
        raise FormatError(f"{what}: created must be a UTC time like 2026-01-31T12:00:00Z, not {created!r}")
    check_file_paths([f.path for f in files] + list(blobs), what)
    return Manifest(tensors, tuple(files), blobs, dict(shards), base, frozenset(base_shards), created=created,
                    _bytes=bytes(data))
