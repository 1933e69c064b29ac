"""Codec checks, numcodecs-style: config round trip, lossless round trip, golden fixtures that only grow.

A codec id names one byte format forever (``docs/formats.md``). The way to hold a codec to
that is a folder of *golden fixtures*: streams encoded once, checked into the repository, and
decoded on every test run. :class:`FixtureWriter` adds fixtures and never rewrites one (it
refuses to overwrite a file, and it only ever appends to ``index.json``), so running it again
cannot quietly replace the evidence with whatever today's encoder writes.

``index.json`` is a JSON list, one object per fixture::

    {"file": "float-entropy.v1-262144-F64.bin",     # the encoded stream, beside index.json
     "config": {"id": "float-entropy.v1", "block_elems": 262144},
     "dtype": "F64", "shape": [25, 21],
     "sha256": "<SHA-256 of the input that was encoded>",
     "decoded_sha256": "<SHA-256 of what decoding gives>"}   # only for lossy codecs

For a lossless codec decoding gives the input back, so ``sha256`` checks it; a lossy codec's
decode gives something else, which ``decoded_sha256`` pins down bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardstore.codecs import get_codec
from shardstore.codecs.base import Buffer, Codec, PieceInfo
from shardstore.errors import CodecError

INDEX_NAME = "index.json"


class FixtureExistsError(FileExistsError):
    """A golden fixture of that name exists already: fixtures are written once and never replaced."""


def check_config_round_trip(codec: Codec) -> dict[str, Any]:
    """``get_codec(codec.get_config())`` rebuilds an equal codec, through JSON and back; returns the config."""
    config = codec.get_config()
    assert config.get("id") == codec.codec_id, f"config {config} must carry the id {codec.codec_id!r}"
    text = json.dumps(config, sort_keys=True)  # JSON-able, with nothing lost on the way
    rebuilt = get_codec(json.loads(text))
    assert rebuilt == codec, f"{codec.codec_id}: {rebuilt!r} rebuilt from {text} differs from {codec!r}"
    assert type(rebuilt) is type(codec)
    assert rebuilt.get_config() == config
    return config


def check_decode(codec: Codec, encoded: Buffer, info: PieceInfo) -> bytes:
    """Decode twice, to a new buffer and into a caller's buffer, check both agree and are the right size."""
    plain = bytes(codec.decode(encoded, info))
    assert len(plain) == info.nbytes, f"{codec.codec_id}: decoded {len(plain)} bytes, expected {info.nbytes}"
    out = bytearray(info.nbytes)
    result = codec.decode(encoded, info, memoryview(out))
    assert bytes(out) == plain, f"{codec.codec_id}: decoding into a buffer gave other bytes"
    assert bytes(result) == plain
    return plain


def check_lossless_round_trip(codec: Codec, data: Buffer, info: PieceInfo) -> bytes:
    """Encode ``data`` and decode it back bit for bit (both decode paths); the same input encodes the same."""
    encoded = codec.encode(data, info)
    assert check_decode(codec, encoded, info) == bytes(data), f"{codec.codec_id}: round trip lost bits"
    assert codec.encode(data, info) == encoded, f"{codec.codec_id}: equal input must give equal bytes"
    return encoded


def check_rejects_truncated(codec: Codec, encoded: bytes, info: PieceInfo) -> None:
    """A stream cut short is a :class:`CodecError` (or decodes to exactly ``info.nbytes``), never a crash."""
    for cut in sorted({0, 1, len(encoded) // 2, max(0, len(encoded) - 1)}):
        if cut >= len(encoded):
            continue
        try:
            decoded = codec.decode(encoded[:cut], info)
        except CodecError:
            continue
        assert len(decoded) == info.nbytes, f"{codec.codec_id}: a truncated stream decoded to the wrong size"


@dataclass(frozen=True)
class GoldenCase:
    """One entry of a fixture folder's ``index.json``."""

    file: str
    config: dict[str, Any]
    dtype: str
    shape: tuple[int, ...]
    sha256: str  # of the input that was encoded
    decoded_sha256: str | None = None  # of the decoded bytes, when they differ from the input (lossy)

    @property
    def info(self) -> PieceInfo:
        return PieceInfo(self.dtype, self.shape)

    @property
    def expected_decoded_sha256(self) -> str:
        return self.decoded_sha256 or self.sha256

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"file": self.file, "config": self.config, "dtype": self.dtype,
                               "shape": list(self.shape), "sha256": self.sha256}
        if self.decoded_sha256 is not None:
            doc["decoded_sha256"] = self.decoded_sha256
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> GoldenCase:
        return cls(doc["file"], dict(doc["config"]), doc["dtype"], tuple(doc["shape"]), doc["sha256"],
                   doc.get("decoded_sha256"))


def read_index(folder: str | os.PathLike[str]) -> list[GoldenCase]:
    """The fixtures of a folder, in the order they were added (empty when there is no index yet)."""
    index = Path(folder) / INDEX_NAME
    if not index.exists():
        return []
    return [GoldenCase.from_json(doc) for doc in json.loads(index.read_text())]


def check_golden(folder: str | os.PathLike[str], case: GoldenCase) -> bytes:
    """Decode one fixture and check it bit for bit against its index entry; returns the decoded bytes."""
    codec = get_codec(dict(case.config))
    blob = (Path(folder) / case.file).read_bytes()
    decoded = check_decode(codec, blob, case.info)
    found = hashlib.sha256(decoded).hexdigest()
    assert found == case.expected_decoded_sha256, (
        f"{case.file}: decodes to other bytes than when it was written: the format of "
        f"{case.config['id']} changed; give the new format a new codec id instead")
    return decoded


def codec_ids_covered(cases: Iterable[GoldenCase]) -> set[str]:
    return {case.config["id"] for case in cases}


class FixtureWriter:
    """Adds golden fixtures to a folder; never overwrites a fixture, never drops an index entry.

    ``add`` refuses (:class:`FixtureExistsError`) a name that exists as a file or in the index.
    The file is created exclusively (``O_EXCL``); the index is rewritten through a temporary file
    and a rename, with every earlier entry first, unchanged.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def exists(self, name: str) -> bool:
        return (self.folder / name).exists() or name in self._indexed_files()

    def _indexed_files(self) -> set[str]:
        # Raw entries, not GoldenCase: older indexes with fewer fields are appended to all the same.
        index = self.folder / INDEX_NAME
        return {entry["file"] for entry in json.loads(index.read_text())} if index.exists() else set()

    def add(self, codec: Codec, data: Buffer, info: PieceInfo, name: str | None = None) -> GoldenCase:
        """Encode ``data`` with ``codec``, check it decodes, store it as a new fixture and index it."""
        name = name or default_name(codec, info)
        if self.exists(name):
            raise FixtureExistsError(f"{self.folder / name}: golden fixture exists; fixtures are never rewritten "
                                     "(a changed format needs a new codec id)")
        encoded = codec.encode(data, info)
        decoded = check_decode(codec, encoded, info)
        source = hashlib.sha256(data).hexdigest()
        result = hashlib.sha256(decoded).hexdigest()
        case = GoldenCase(name, codec.get_config(), info.dtype, info.shape, source,
                          None if result == source else result)
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / name).open("xb") as handle:  # "x": fails if the file appeared meanwhile
            handle.write(encoded)
        self._append(case)
        return case

    def _append(self, case: GoldenCase) -> None:
        index = self.folder / INDEX_NAME
        entries = json.loads(index.read_text()) if index.exists() else []
        entries.append(case.to_json())
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".index-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(entries, indent=1) + "\n")
            os.replace(tmp, index)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def default_name(codec: Codec, info: PieceInfo) -> str:
    """``<codec id>-<config values>-<dtype>.bin``, e.g. ``float-entropy.v1-262144-F64.bin``."""
    values = [str(v) for k, v in sorted(codec.get_config().items()) if k != "id"]
    return "-".join([codec.codec_id, *values, info.dtype]) + ".bin"
