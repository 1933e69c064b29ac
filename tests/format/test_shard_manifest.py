"""Shards and manifests: deterministic bytes, strict parsing, every corruption caught."""

from __future__ import annotations

import pytest
import xxhash

from shardstore.codecs import PieceInfo, codec_from_name
from shardstore.errors import FormatError, IntegrityError, UnsupportedFormatError
from shardstore.format import canonical_json
from shardstore.format.digest import digest, stream_checksum
from shardstore.format.manifest import BlobRecord, FileRecord, Manifest, PieceRef, TensorRecord, parse_manifest
from shardstore.format.safetensors_io import build_header
from shardstore.format.shard import StreamHeader, build_shard, parse_shard
from shardstore.repo.pieces import decode_stream

RAW = bytes(range(256)) * 16  # 4096 bytes = 1024 F32


def _shard(codec_name: str = "zstd") -> tuple[str, bytes]:
    codec = codec_from_name(codec_name)
    info = PieceInfo("F32", (32, 32))
    header = StreamHeader("F32", (32, 32), (codec.get_config(),), stream_checksum(RAW))
    data = build_shard([(header, codec.encode(RAW, info))])
    return digest(data), data


@pytest.mark.parametrize("codec_name", ["raw", "zstd"])
def test_shard_round_trip_and_determinism(codec_name: str) -> None:
    shard_id, data = _shard(codec_name)
    assert _shard(codec_name) == (shard_id, data)  # invariant 5: same input, same bytes
    shard = parse_shard(data, shard_id)
    assert bytes(decode_stream(shard, "0")) == RAW
    out = bytearray(len(RAW))
    decode_stream(shard, "0", memoryview(out))
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
    header = StreamHeader("F32", (1024,), (codec.get_config(),), stream_checksum(b"something else"))
    data = build_shard([(header, RAW)])
    with pytest.raises(IntegrityError, match="checksum"):
        decode_stream(parse_shard(data, digest(data)), "0")


def _v1_shard(checksum: str) -> bytes:
    """A ``shardstore.shard.v1`` shard as version 0.1 wrote it (BLAKE3 of the decoded bytes), built by hand."""
    config = codec_from_name("raw").get_config()
    meta = {"format": "shardstore.shard.v1", "checksum": "blake3",
            "streams": {"0": {"dtype": "F32", "shape": [1024], "codec": [config], "checksum": checksum}}}
    return build_header([("0", "U8", (len(RAW),), len(RAW))], {"shardstore": canonical_json.dumps(meta).decode()}) + RAW


def test_format_v1_shards_still_decode_and_check_with_blake3() -> None:
    old = _v1_shard(digest(RAW))
    shard = parse_shard(old, digest(old))
    assert shard.stream_checksum == "blake3"
    assert bytes(decode_stream(shard, "0")) == RAW
    wrong = _v1_shard(digest(b"something else"))
    with pytest.raises(IntegrityError, match="fail its checksum"):
        decode_stream(parse_shard(wrong, digest(wrong)), "0")
    # An XXH3 checksum in a v1 shard (or a BLAKE3 one in a v2 shard) is refused when parsed.
    mixed = _v1_shard(stream_checksum(RAW))
    with pytest.raises(FormatError, match="blake3 checksum"):
        parse_shard(mixed, digest(mixed))


def test_new_shards_are_v2_with_xxh3_stream_checksums() -> None:
    shard_id, data = _shard("raw")
    shard = parse_shard(data, shard_id)
    assert shard.stream_checksum == "xxh3-128"
    header, _payload = shard.streams["0"]
    assert header.checksum == xxhash.xxh3_128_hexdigest(RAW)  # computed here with the library itself
    assert b'\\"format\\":\\"shardstore.shard.v2\\"' in data  # JSON inside the JSON header


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


# ----------------------------------------------------------------- the manifest's versioning rule (docs/formats.md)


@pytest.mark.parametrize(
    ("old", "new", "field", "where"),
    [
        ('"base":null,', '"base":null,"signed_by":"me",', "signed_by", "manifest:"),
        ('"dtype":"F32",', '"dtype":"F32","scale":2,', "scale", "tensor 'layer.0.w':"),
        ('"rows":[0,32],', '"rows":[0,32],"crc":1,', "crc", "tensor 'layer.0.w': piece:"),
        ('"path":"model.safetensors",', '"path":"model.safetensors","mode":"r",', "mode", "file:"),
        ('"size":2}', '"size":2,"mime":"json"}', "mime", "blob 'config.json':"),
        ('"totals":{', '"totals":{"params":1,', "params", "totals:"),
    ],
)
def test_manifest_refuses_a_field_it_does_not_know(old: str, new: str, field: str, where: str) -> None:
    data = _manifest().to_bytes().decode()
    assert old in data
    with pytest.raises(UnsupportedFormatError) as info:
        parse_manifest(data.replace(old, new, 1).encode())
    assert f"{where} unknown field {field!r}" in str(info.value) and "\n" not in str(info.value)


def test_manifest_of_a_newer_major_version_is_refused_as_such() -> None:
    data = _manifest().to_bytes().replace(b"shardstore.manifest.v1", b"shardstore.manifest.v2")
    with pytest.raises(UnsupportedFormatError, match=r"'shardstore\.manifest\.v2' is not one this shardstore reads"):
        parse_manifest(data)


def test_every_manifest_field_is_documented_in_formats_md() -> None:
    # The rule: a field is added with a changelog entry. Every field the parser accepts must at least appear
    # in docs/formats.md (as `name`), so the parser cannot grow a field the page does not tell readers about.
    from pathlib import Path

    from shardstore.format import manifest as m

    page = (Path(__file__).parents[2] / "docs" / "formats.md").read_text()
    fields = m.MANIFEST_KEYS | m.TENSOR_KEYS | m.PIECE_KEYS | m.FILE_KEYS | m.BLOB_KEYS | m.TOTALS_KEYS
    assert {f for f in fields if f"`{f}`" not in page} == set()
