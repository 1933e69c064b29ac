"""Shards and manifests: deterministic bytes, strict parsing, every corruption caught."""

from __future__ import annotations

import pytest

from shardstore.codecs import PieceInfo, codec_from_name
from shardstore.errors import FormatError, IntegrityError
from shardstore.format.digest import digest
from shardstore.format.manifest import BlobRecord, FileRecord, Manifest, PieceRef, TensorRecord, parse_manifest
from shardstore.format.shard import StreamHeader, build_shard, parse_shard

RAW = bytes(range(256)) * 16  # 4096 bytes = 1024 F32


def _shard(codec_name: str = "zstd") -> tuple[str, bytes]:
    codec = codec_from_name(codec_name)
    info = PieceInfo("F32", (32, 32))
    header = StreamHeader("F32", (32, 32), (codec.get_config(),), digest(RAW))
    data = build_shard([(header, codec.encode(RAW, info))])
    return digest(data), data


@pytest.mark.parametrize("codec_name", ["raw", "zstd"])
def test_shard_round_trip_and_determinism(codec_name: str) -> None:
    shard_id, data = _shard(codec_name)
    assert _shard(codec_name) == (shard_id, data)  # invariant 5: same input, same bytes
    shard = parse_shard(data, shard_id)
    assert bytes(shard.decode("0")) == RAW
    out = bytearray(len(RAW))
    shard.decode("0", memoryview(out))
    assert bytes(out) == RAW


def test_shard_is_a_valid_safetensors_file() -> None:
    from safetensors.numpy import load

    _id, data = _shard()
    assert list(load(data)) == ["0"]


def test_flipped_byte_is_caught_and_named() -> None:
    shard_id, data = _shard()
    corrupt = bytearray(data)
    corrupt[-5] ^= 0x01
    with pytest.raises(IntegrityError, match=shard_id):
        parse_shard(bytes(corrupt), shard_id)


def test_decoded_checksum_is_enforced() -> None:
    codec = codec_from_name("raw")
    header = StreamHeader("F32", (1024,), (codec.get_config(),), digest(b"something else"))
    data = build_shard([(header, RAW)])
    with pytest.raises(IntegrityError, match="checksum"):
        parse_shard(data, digest(data)).decode("0")


def _manifest() -> Manifest:
    shard_id, data = _shard()
    tensor = TensorRecord("F32", (32, 32), ({"id": "byteplanes-zstd.v1", "level": 3},),
                          (PieceRef(shard_id, "0", (0, 32), 100),))
    return Manifest(
        tensors={"layer.0.w": tensor},
        files=(FileRecord("model.safetensors", digest(b"h"), {"format": "pt"}, ("layer.0.w",)),),
        blobs={"config.json": BlobRecord(digest(b"{}"), 2)},
        shards={shard_id: len(data)},
    )


def test_manifest_round_trip_is_canonical() -> None:
    manifest = _manifest()
    data = manifest.to_bytes()
    parsed = parse_manifest(data, digest(data))
    assert parsed == manifest
    assert parsed.to_bytes() == data
    assert parsed.id == manifest.id == digest(data)


def test_manifest_id_mismatch_is_integrity_error() -> None:
    data = _manifest().to_bytes()
    with pytest.raises(IntegrityError):
        parse_manifest(data, digest(b"other"))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"rows":[0,32]', '"rows":[0,31]', "pieces cover rows"),
        ('"rows":[0,32]', '"rows":[1,32]', "tile the rows"),
        ('"dtype":"F32"', '"dtype":"F99"', "unknown dtype"),
        ('"format":"shardstore.manifest.v1"', '"format":"other"', "not a shardstore.manifest.v1"),
        ('"raw_bytes":4096', '"raw_bytes":4095', "disagree"),
    ],
)
def test_manifest_validation(old: str, new: str, message: str) -> None:
    data = _manifest().to_bytes().decode()
    assert old in data
    with pytest.raises(FormatError, match=message):
        parse_manifest(data.replace(old, new, 1).encode())
