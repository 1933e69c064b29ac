"""Faults and protocol details: corrupt shards, broken streams, deadlines, cancellation, errors, CAS, cache."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import shardstore
from rpc.access_helpers import cli, serve_process
from rpc.grpc_helpers import push_small_model
from shardstore.cli import main
from shardstore.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError, StoreError
from shardstore.format.digest import digest
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository, shard_key
from shardstore.rpc import split_grpc_url
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.client import GrpcClient
from shardstore.rpc.server import SERVICE_NAME, RegistryServicer
from shardstore.store import LocalStore
from shardstore.store.cache import ShardCache


@pytest.fixture
def small_store(tmp_path: Path) -> tuple[LocalStore, Path]:
    """A store holding a small model ``small:v1`` in several shards (pushed locally), and the model's folder."""
    return push_small_model(tmp_path)


@pytest.fixture
def served_small(small_store: tuple[LocalStore, Path]) -> Iterator[BackgroundServer]:
    with BackgroundServer(small_store[0]) as server:
        yield server


def _shard_ids(store: LocalStore) -> list[str]:
    repo = Repository(store)
    manifest = repo.get_manifest(repo.resolve(parse_ref("small:v1")))
    return list(manifest.shards)


def test_corrupt_shard_on_the_server_is_refused_naming_it(
    small_store: tuple[LocalStore, Path], served_small: BackgroundServer, tmp_path: Path, shard_cache_dir: Path
) -> None:
    store, _model = small_store
    victim = _shard_ids(store)[1]
    path = store.root / shard_key(victim)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=victim):
        shardstore.pull(f"grpc://{served_small.address}/small:v1", tmp_path / "out")
    assert victim not in ShardCache(shard_cache_dir)
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no partial model left behind


class CorruptInFlight(RegistryServicer):
    """Flips a bit of every shard after the server's own check: only the client can catch it."""

    async def _load_shard(self, shard_id: str) -> bytes:
        data = bytearray(await super()._load_shard(shard_id))
        data[-1] ^= 1
        return bytes(data)


def test_client_refuses_bytes_corrupted_in_flight(small_store: tuple[LocalStore, Path], shard_cache_dir: Path) -> None:
    store, _model = small_store
    with BackgroundServer(store, servicer=CorruptInFlight(store)) as server, \
            shardstore.open(f"grpc://{server.address}/small:v1") as view:
        first = view.manifest.tensors["layers.0.weight"].pieces[0].shard
        with pytest.raises(IntegrityError, match=f"shard {first}: received bytes do not match"):
            view.get_tensor("layers.0.weight")
    assert not (shard_cache_dir / "shards").exists() or not any((shard_cache_dir / "shards").rglob("*"))


class BreaksOnce(RegistryServicer):
    """Ends the first StreamShards call with UNAVAILABLE after a few chunks, like a dropped connection."""

    def __init__(self, store: LocalStore, after_chunks: int) -> None:
        super().__init__(store)
        self.after_chunks = after_chunks
        self.requests: list[list[str]] = []

    async def StreamShards(self, request: pb.StreamShardsRequest, context: Any) -> AsyncIterator[pb.ObjectChunk]:
        self.requests.append(list(request.shard_ids))
        sent = 0
        async for chunk in super().StreamShards(request, context):
            if len(self.requests) == 1 and sent == self.after_chunks:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: connection dropped")
            sent += 1
            yield chunk


def test_broken_stream_resumes_from_the_next_unverified_shard(
    small_store: tuple[LocalStore, Path], tmp_path: Path
) -> None:
    store, model = small_store
    shard_ids = _shard_ids(store)
    servicer = BreaksOnce(store, after_chunks=2)  # shards are < 1 MiB here: one chunk each
    with BackgroundServer(store, servicer=servicer) as server, GrpcClient(server.address, backoff=0.01) as client:
        report = shardstore.repo.pull.pull(client, "small:v1", tmp_path / "out")
        assert client.retried == 1
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    first, second = servicer.requests
    assert sorted(first) == sorted(shard_ids)
    assert second == first[2:]  # two shards were verified before the break: not asked for again
    assert report.shards_fetched == len(shard_ids)


def test_unavailable_server_fails_after_bounded_retries(tmp_path: Path) -> None:
    with BackgroundServer(LocalStore(tmp_path / "s")) as server:
        address = server.address
    started = time.monotonic()
    with GrpcClient(address, retries=2, backoff=0.01, timeout=5) as client, \
            pytest.raises(StoreError, match="unavailable"):
        client.resolve(parse_ref("gone:v1"))
    assert client.retried == 2 and time.monotonic() - started < 10


class Slow(RegistryServicer):
    """Paces sends to 256 KiB/s so a stream of the small model takes seconds."""

    def __init__(self, store: LocalStore) -> None:
        super().__init__(store, pace_bytes_per_s=256 << 10)


def _wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    # Polls a server-side counter the test cannot be notified about; bounded, not a fixed sleep.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()  # type: ignore[no-any-return]


def test_deadline_is_honoured_and_frees_the_stream(small_store: tuple[LocalStore, Path]) -> None:
    store, _model = small_store
    servicer = Slow(store)
    with BackgroundServer(store, servicer=servicer) as server:
        with GrpcClient(server.address, use_cache=False, stream_timeout=0.3) as client, \
                pytest.raises(StoreError, match="deadline_exceeded"):
            list(client.fetch_shards(_shard_ids(store)))
        assert _wait_until(lambda: servicer.active_streams == 0)


def test_cancelling_a_stream_frees_it_on_the_server(small_store: tuple[LocalStore, Path]) -> None:
    store, _model = small_store
    servicer = Slow(store)
    with BackgroundServer(store, servicer=servicer) as server, GrpcClient(server.address, use_cache=False) as client:
        shards = client.fetch_shards(_shard_ids(store))
        shard_id, data = next(shards)
        assert digest(data) == shard_id
        assert servicer.active_streams == 1
        shards.close()  # the consumer gives up: the call is cancelled
        assert _wait_until(lambda: servicer.active_streams == 0)


def test_errors_come_back_as_the_same_types(served_small: BackgroundServer, tmp_path: Path) -> None:
    url = f"grpc://{served_small.address}"
    with pytest.raises(NotFoundError, match=r"nope:v1: no such model"):
        shardstore.pull(f"{url}/nope:v1", tmp_path / "x")
    with pytest.raises(InvalidInputError, match="bad grpc URL"):
        shardstore.pull("grpc://no-port/small:v1", tmp_path / "x")
    with GrpcClient(served_small.address) as client:
        with pytest.raises(NotFoundError, match="not in store"):
            client.get_blob("0" * 64)
        with pytest.raises(InvalidInputError, match="invalid shard id"):
            list(client._receive(["xyz"], __import__("threading").Event(), []))
    assert split_grpc_url("grpc://h:1/org/model:v2") == ("h:1", "org/model:v2")


def test_cli_prints_one_line_for_a_missing_model(served_small: BackgroundServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", f"grpc://{served_small.address}/nope:v1", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("shardstore pull: error: nope:v1: no such model") and "\n" not in err


def test_manifest_refused_until_its_shards_exist(small_store: tuple[LocalStore, Path], tmp_path: Path) -> None:
    store, _model = small_store
    repo = Repository(store)
    manifest = repo.get_manifest(repo.resolve(parse_ref("small:v1")))
    with BackgroundServer(LocalStore(tmp_path / "empty")) as server, GrpcClient(server.address) as client:
        with pytest.raises(NotFoundError, match="manifest refused: shard"):
            client.put_manifest(manifest)
        assert client.list_refs() == []


def test_set_ref_compare_and_set(served_small: BackgroundServer, small_store: tuple[LocalStore, Path]) -> None:
    store, _model = small_store
    ref = parse_ref("small:v1")
    current = Repository(store).resolve(ref)
    other = parse_ref("small:copy")
    with GrpcClient(served_small.address) as client:
        assert client.compare_and_set_ref(other, current, "") == ""  # create only if absent
        with pytest.raises(ConflictError, match="changed meanwhile"):
            client.compare_and_set_ref(other, current, "")
        with pytest.raises(ConflictError):
            client.compare_and_set_ref(ref, current, "f" * 64)
        assert client.compare_and_set_ref(ref, current, current) == current
        assert [str(r) for r, _id in client.list_refs()] == ["small:copy", "small:v1"]
        assert [str(r) for r, _id in client.list_refs("small")] == ["small:copy", "small:v1"]
        with pytest.raises(NotFoundError, match="not in the store"):
            client.set_ref(other, "e" * 64)


def test_upload_with_a_wrong_digest_is_not_committed(served_small: BackgroundServer,
                                                     small_store: tuple[LocalStore, Path]) -> None:
    store, _model = small_store
    claimed = "a" * 64
    with GrpcClient(served_small.address) as client, pytest.raises(IntegrityError, match=f"shard {claimed}"):
        client.put_shard(claimed, b"not what the id says")
    assert not store.exists(shard_key(claimed))


def test_health_and_reflection(served_small: BackgroundServer) -> None:
    with grpc.insecure_channel(served_small.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=5)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_shard_cache_is_lru_bounded_and_drops_corrupt_entries(tmp_path: Path) -> None:
    blobs = [bytes([i]) * 1000 for i in range(4)]
    ids = [digest(b) for b in blobs]
    cache = ShardCache(tmp_path / "c", max_bytes=3000)
    for i in range(3):
        cache.put(ids[i], blobs[i])
        os.utime(cache._path(ids[i]), (i, i))  # distinct recency without sleeping
    assert cache.get(ids[0]) == blobs[0]  # touched: now the most recent
    cache.put(ids[3], blobs[3])  # over the bound: evict down to 90 %
    assert ids[1] not in cache and ids[2] not in cache and ids[0] in cache and ids[3] in cache
    assert cache.size <= 3000
    path = cache._path(ids[0])
    path.write_bytes(b"x" + path.read_bytes()[1:])
    assert cache.get(ids[0]) is None and not path.exists() and cache.corrupt == 1


def test_serve_command_runs_and_stops_gracefully(small_store: tuple[LocalStore, Path], tmp_path: Path) -> None:
    store, model = small_store
    env = {**os.environ, "SHARDSTORE_CACHE": str(tmp_path / "cli-cache")}
    with serve_process(store.root, env=env) as served:  # asserts the SIGTERM exit is 0
        pulled = cli("pull", f"grpc://{served.address}/small:v1", str(tmp_path / "o"), "--json", env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert json.loads(pulled.stdout)["shards_cached"] == 0
        assert (tmp_path / "o" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
