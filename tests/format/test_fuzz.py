"""Property-based fuzzing of everything that parses outside input.

The property, for every parser and decoder: it returns a valid object or raises
the project's own error (FormatError / IntegrityError / CodecError / InvalidInputError),
never another exception, never a hang (hypothesis' deadline), and never allocates
much more than the input or the declared output (tracemalloc peak). Inputs are
mutations of valid objects, so the fuzzer spends its time past the first check.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardstore.codecs import Pipeline, get_codec
from shardstore.codecs.base import PieceInfo
from shardstore.errors import CodecError, FormatError, IntegrityError, InvalidInputError, ShardstoreError
from shardstore.format import canonical_json
from shardstore.format.digest import digest, stream_checksum
from shardstore.format.dtypes import ITEMSIZE, nbytes
from shardstore.format.manifest import Manifest, parse_manifest
from shardstore.format.safetensors_io import SafetensorsHeader, build_header, parse_bytes
from shardstore.format.shard import StreamHeader, build_shard, parse_shard
from shardstore.format.store_config import new_store_config
from shardstore.repo.pieces import decode_stream, stream_info
from shardstore.repo.refs import parse_ref
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc
from shardstore.rpc.background import BackgroundServer
from shardstore.store import MemoryStore

T = TypeVar("T")
EXPECTED = (FormatError, IntegrityError, CodecError, InvalidInputError)
# SHARDSTORE_FUZZ_EXAMPLES=20000 for a long hunt; the default keeps the suite quick.
FUZZ = settings(max_examples=int(os.environ.get("SHARDSTORE_FUZZ_EXAMPLES", "300")), deadline=2000,
                suppress_health_check=[HealthCheck.too_slow])
# Well above what the small inputs here need (a few KiB), far below what a bomb would take.
ALLOC_LIMIT = 16 << 20

DTYPES = sorted(ITEMSIZE)
CODECS = [{"id": "raw.v1"}, {"id": "byteplanes-zstd.v1", "level": 3}, {"id": "float-entropy.v1", "block_elems": 64}]


def bounded(call: Callable[[], T], limit: int = ALLOC_LIMIT) -> T | None:
    """Run a parser: its result, or None for one of our errors; any other exception, or a big allocation, fails."""
    tracemalloc.start()
    try:
        return call()
    except EXPECTED:
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < limit, f"parser allocated {peak} bytes"


# -- mutations ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from paths(value, (*prefix, index))


def replaced(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(doc))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copy


@st.composite
def json_mutation(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with one to three values replaced by arbitrary JSON, or deleted."""
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(doc))))
        doc = replaced(doc, path, draw(json_values), delete=bool(path) and draw(st.booleans()))
    return doc


@st.composite
def byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, inserted, deleted, or cut short."""
    blob = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(blob) - 1)))
        if op == "flip" and blob:
            blob[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and blob:
            del blob[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del blob[at:]
    return bytes(blob)


# -- safetensors headers -------------------------------------------------------------------------

tensor_specs = st.lists(
    st.tuples(st.text(min_size=1, max_size=8), st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
    max_size=5, unique_by=lambda spec: spec[0],
)


def safetensors_file(specs: list[tuple[str, str, list[int]]]) -> tuple[bytes, dict[str, Any]]:
    entries = [(name, dtype, tuple(shape), nbytes(dtype, shape)) for name, dtype, shape in specs]
    head = build_header(entries, {"format": "pt"})
    body = bytes(sum(e[3] for e in entries))
    (length,) = struct.unpack_from("<Q", head)
    return head + body, json.loads(head[8 : 8 + length])


def check_header(header: SafetensorsHeader, data_size: int) -> None:
    position = 0
    for entry in header.tensors:  # what the parser promises when it accepts
        assert entry.begin == position and entry.nbytes == nbytes(entry.dtype, entry.shape)
        position = entry.end
    assert position == data_size


@FUZZ
@given(specs=tensor_specs, data=st.data())
def test_safetensors_header_json_mutations(specs: list[tuple[str, str, list[int]]], data: st.DataObject) -> None:
    blob, doc = safetensors_file(specs)
    body = blob[8 + struct.unpack_from("<Q", blob)[0] :]
    mutated = data.draw(json_mutation(doc))
    header_bytes = json.dumps(mutated).encode()
    result = bounded(lambda: parse_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + body, "fuzz"))
    if result is not None:
        check_header(result[0], len(body))


@FUZZ
@given(specs=tensor_specs, data=st.data())
def test_safetensors_file_byte_mutations(specs: list[tuple[str, str, list[int]]], data: st.DataObject) -> None:
    blob, _doc = safetensors_file(specs)
    mutated = data.draw(byte_mutation(blob))
    result = bounded(lambda: parse_bytes(mutated, "fuzz"))
    if result is not None:
        check_header(result[0], len(result[1]))


@FUZZ
@given(length=st.integers(0, 2**64 - 1), tail=st.binary(max_size=64))
def test_safetensors_length_prefix_is_never_trusted(length: int, tail: bytes) -> None:
    bounded(lambda: parse_bytes(struct.pack("<Q", length) + tail, "fuzz"))


# -- shards and codecs -----------------------------------------------------------------------------

pieces = st.tuples(st.sampled_from(["F32", "BF16", "F16", "U8", "I64"]), st.integers(1, 40), st.sampled_from(CODECS),
                   st.integers(0, 2**32))


def encoded_stream(dtype: str, rows: int, config: dict[str, Any], seed: int) -> tuple[StreamHeader, bytes]:
    import numpy as np

    raw = np.random.default_rng(seed).integers(0, 256, size=rows * 4 * ITEMSIZE[dtype], dtype=np.uint8).tobytes()
    info = PieceInfo(dtype, (rows, 4))
    pipeline = Pipeline.from_configs([config])
    return StreamHeader(dtype, info.shape, tuple(pipeline.configs()), stream_checksum(raw)), pipeline.encode(raw, info)


def decode_all(data: bytes) -> None:
    shard = parse_shard(data, digest(data))
    for key, (header, _payload) in shard.streams.items():
        assert len(decode_stream(shard, key)) == header.nbytes


@FUZZ
@given(specs=st.lists(pieces, min_size=1, max_size=3), data=st.data())
def test_shard_byte_mutations(specs: list[tuple[str, int, dict[str, Any], int]], data: st.DataObject) -> None:
    shard = build_shard([encoded_stream(*spec) for spec in specs])
    decode_all(shard)  # the unmutated shard decodes
    bounded(lambda: decode_all(data.draw(byte_mutation(shard))))


@FUZZ
@given(specs=st.lists(pieces, min_size=1, max_size=2), data=st.data())
def test_shard_metadata_mutations(specs: list[tuple[str, int, dict[str, Any], int]], data: st.DataObject) -> None:
    streams = [encoded_stream(*spec) for spec in specs]
    shard = build_shard(streams)
    header, _area = parse_bytes(shard, "shard")
    assert header.metadata is not None
    meta = json.loads(header.metadata["shardstore"])
    mutated = data.draw(json_mutation(meta))
    entries = [(str(i), "U8", (len(p),), len(p)) for i, (_h, p) in enumerate(streams)]
    rebuilt = build_header(entries, {"shardstore": json.dumps(mutated)}) + b"".join(p for _h, p in streams)
    bounded(lambda: decode_all(rebuilt))


@FUZZ
@given(spec=pieces, data=st.data(),
       declared=st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 2**40), max_size=3)))
def test_codecs_decode_only_what_is_declared(spec: tuple[str, int, dict[str, Any], int], data: st.DataObject,
                                              declared: tuple[str, list[int]]) -> None:
    header, stream = encoded_stream(*spec)
    codec = get_codec(dict(header.codec[0]))
    mutated = data.draw(byte_mutation(stream) | st.just(stream))
    info = data.draw(st.sampled_from([stream_info(header), PieceInfo(declared[0], tuple(declared[1]))]))
    assume(info.nbytes < ALLOC_LIMIT // 4)  # a declaration that big is refused earlier (checked_nbytes)
    out = bounded(lambda: codec.decode(mutated, info))
    if out is not None:
        assert len(out) == info.nbytes


def test_zstd_bomb_is_refused_before_it_is_inflated() -> None:
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(256 << 20))  # 256 MiB of zeros in a few KiB
    stream = bytes([1]) + struct.pack("<BQ", 1, len(bomb)) + bomb
    codec = get_codec({"id": "byteplanes-zstd.v1"})
    with pytest.raises(CodecError, match="declares 268435456 bytes, expected 1000"):
        codec.decode(stream, PieceInfo("U8", (1000,)))
    assert bounded(lambda: codec.decode(stream, PieceInfo("U8", (1000,))), limit=1 << 20) is None


def test_shard_declaring_an_absurd_decoded_size_is_refused() -> None:
    header, payload = encoded_stream("F32", 2, CODECS[0], 0)
    huge = StreamHeader("F32", (0, 2**70), header.codec, header.checksum)
    data = build_shard([(huge, payload)])
    with pytest.raises(FormatError, match="overflows"):
        parse_shard(data, digest(data))


# -- manifests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The manifest of a small real push (two files, several shards), as JSON."""
    from rpc.grpc_helpers import SMALL_CHUNK, write_small_model

    import shardstore
    from shardstore.repo.repository import Repository

    store = MemoryStore()
    model = write_small_model(tmp_path_factory.mktemp("fuzz") / "small")
    report = shardstore.push(model, "fuzz:v1", store=store, chunk_bytes=SMALL_CHUNK)
    doc: dict[str, Any] = json.loads(Repository(store).get_manifest(report.manifest_id).to_bytes())
    return doc


def check_manifest(manifest: Manifest) -> None:
    for record in manifest.tensors.values():
        rows = 0
        for piece in record.pieces:  # what the parser promises when it accepts
            assert piece.rows[0] == rows and piece.shard in manifest.shards
            rows = piece.rows[1]
        assert rows == record.rows
    assert sorted(n for f in manifest.files for n in f.tensors) == sorted(manifest.tensors)


@FUZZ
@given(data=st.data())
def test_manifest_json_mutations(manifest_doc: dict[str, Any], data: st.DataObject) -> None:
    mutated = data.draw(json_mutation(manifest_doc))
    try:
        encoded = canonical_json.dumps(mutated)
    except ValueError:
        return  # not JSON at all (a float too big): nothing could send it
    result = bounded(lambda: parse_manifest(encoded))
    if result is not None:
        check_manifest(result)


@FUZZ
@given(data=st.data())
def test_manifest_byte_mutations(manifest_doc: dict[str, Any], data: st.DataObject) -> None:
    encoded = canonical_json.dumps(manifest_doc)
    mutated = data.draw(byte_mutation(encoded))
    result = bounded(lambda: parse_manifest(mutated))
    if result is not None:
        check_manifest(result)
    assert bounded(lambda: parse_manifest(mutated, digest(encoded))) is None or mutated == encoded


def test_deeply_nested_json_is_a_format_error() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_manifest(deep)
    with pytest.raises(FormatError):
        parse_bytes(struct.pack("<Q", len(deep)) + deep, "deep")


# -- gRPC requests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registry() -> Iterator[tuple[Any, MemoryStore]]:
    store = MemoryStore()
    with BackgroundServer(store) as server, grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RegistryStub(channel), store  # type: ignore[no-untyped-call]


ids = st.one_of(st.text(max_size=70), st.text("0123456789abcdefABCDEF", min_size=63, max_size=65),
                st.just("0" * 64))
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DATA_LOSS,
                 grpc.StatusCode.FAILED_PRECONDITION}


def rpc_outcome(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        assert code in CLIENT_ERRORS, f"{code}: {exc.details()}"  # never INTERNAL / UNKNOWN (a server bug)
        return code
    return grpc.StatusCode.OK


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=40), tag=st.text(max_size=20), object_id=ids,
       shard_ids=st.lists(ids, max_size=4), manifest=st.binary(max_size=200))
def test_grpc_requests_with_hostile_fields(registry: tuple[Any, MemoryStore], name: str, tag: str, object_id: str,
                                           shard_ids: list[str], manifest: bytes) -> None:
    stub, store = registry
    before = sorted(k for k in store.list() if not k.startswith("leases/"))
    rpc_outcome(lambda: stub.ResolveRef(pb.ResolveRefRequest(name=name, tag=tag), timeout=10))
    rpc_outcome(lambda: stub.GetManifest(pb.GetManifestRequest(manifest_id=object_id), timeout=10))
    rpc_outcome(lambda: list(stub.GetBlob(pb.GetBlobRequest(blob_id=object_id), timeout=10)))
    rpc_outcome(lambda: list(stub.StreamShards(pb.StreamShardsRequest(shard_ids=shard_ids), timeout=10)))
    rpc_outcome(lambda: stub.FindMissing(pb.FindMissingRequest(shard_ids=shard_ids, blob_ids=[object_id]),
                                         timeout=10))
    rpc_outcome(lambda: stub.PutManifest(pb.PutManifestRequest(manifest=manifest), timeout=10))
    rpc_outcome(lambda: stub.SetRef(pb.SetRefRequest(name=name, tag=tag, manifest_id=object_id), timeout=10))
    chunk = pb.UploadChunk(kind=pb.OBJECT_KIND_SHARD, id=object_id, offset=0, total_size=len(manifest),
                           data=manifest)
    rpc_outcome(lambda: stub.UploadObjects(iter([chunk]), timeout=10))
    # Whatever was asked, nothing but a correctly named, verified object can have been stored
    # (besides leases, and the store's config that the first write call writes: ours, unchanged).
    if store.exists("config"):
        assert store.get("config") == new_store_config().to_bytes()
    for key in sorted(k for k in store.list() if not k.startswith("leases/") and k != "config"):
        if key not in before:
            assert key.endswith(digest(store.get(key)))


def test_grpc_oversized_requests_are_refused(registry: tuple[Any, MemoryStore]) -> None:
    stub, _store = registry
    with pytest.raises(grpc.RpcError) as info:
        stub.FindMissing(pb.FindMissingRequest(shard_ids=["0" * 64] * 100_001), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    lying = pb.UploadChunk(kind=pb.OBJECT_KIND_SHARD, id="0" * 64, offset=0, total_size=1 << 40, data=b"x")
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadObjects(iter([lying]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit" in (info.value.details() or "")
    with pytest.raises(InvalidInputError):
        parse_ref("Bad Name:v1")


def test_every_fuzzed_error_is_a_shardstore_error() -> None:
    # The property above catches exactly these; they all share the root the CLI prints in one line.
    assert all(issubclass(cls, ShardstoreError) for cls in EXPECTED)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    import torch

    import shardstore

    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(InvalidInputError, match="refusing a pickle checkpoint"):
        shardstore.push(folder, "pickled:v1", store=MemoryStore())


def test_manifest_dimensions_past_2_62_are_refused(manifest_doc: dict[str, Any]) -> None:
    name = next(iter(manifest_doc["tensors"]))
    huge = replaced(manifest_doc, ("tensors", name, "shape"), [0, 2**70], delete=False)
    with pytest.raises(FormatError, match="overflows"):
        parse_manifest(canonical_json.dumps(huge))
