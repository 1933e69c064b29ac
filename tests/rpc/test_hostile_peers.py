"""Hostile peers against the server: calls that never send their request, uploads that stall, one greedy client.

The attacker is a real grpc.aio client on its own event loop thread: each of its calls sends its
headers (so the server sees the call) and never a message, exactly what a raw HTTP/2 client that
wants to pin the server's capacity does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file

import shardstore
from rpc.access_helpers import READ_TOKEN, TOKENS, WRITE_TOKEN
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model
from shardstore.format.digest import digest
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc.auth import AUTHORIZATION_KEY, BEARER, load_token_table
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.guard import CallLimits, peer_address
from shardstore.rpc.server import SERVICE_NAME
from shardstore.store import LocalStore

# Every method whose request is one message: the ones grpc would read before a handler runs.
_UNARY_REQUEST_METHODS = ("ResolveRef", "GetManifest", "GetBlob", "StreamShards", "ListRefs", "FindMissing",
                          "PutManifest", "SetRef")
STALLED_CALLS = 300


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_model(tmp_path_factory.mktemp("hostile") / "small")


@pytest.fixture
def store(small_model: Path, tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    shardstore.push(small_model, "small:v1", store=store, chunk_bytes=SMALL_CHUNK)
    return store


class Staller:
    """``count`` calls over a few connections that send their headers and then nothing, until closed."""

    def __init__(self, address: str, count: int, metadata: tuple[tuple[str, str], ...] = (),
                 connections: int = 3) -> None:
        self.address, self.count, self.metadata, self.connections = address, count, metadata, connections
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.calls: list[Any] = []
        self._channels: list[grpc.aio.Channel] = []
        self._never: asyncio.Event | None = None

    async def _open(self) -> None:
        self._never = asyncio.Event()
        never = self._never

        async def nothing() -> AsyncIterator[bytes]:
            await never.wait()
            return
            yield b""  # an async generator that never yields

        self._channels = [grpc.aio.insecure_channel(self.address) for _ in range(self.connections)]
        for index in range(self.count):
            channel = self._channels[index % self.connections]
            method = f"/{SERVICE_NAME}/{_UNARY_REQUEST_METHODS[index % len(_UNARY_REQUEST_METHODS)]}"
            self.calls.append(channel.stream_unary(method)(nothing(), metadata=self.metadata))

    def outcomes(self) -> list[grpc.StatusCode | None]:
        """The status of each call that has ended (None while it is still open)."""
        async def codes() -> list[grpc.StatusCode | None]:
            return [await call.code() if call.done() else None for call in self.calls]

        return asyncio.run_coroutine_threadsafe(codes(), self._loop).result(timeout=30)

    def __enter__(self) -> Staller:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=60)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            for call in self.calls:
                call.cancel()
            for channel in self._channels:
                await channel.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


def _wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def _health_and_one_layer(address: str, token: str | None, expected: torch.Tensor) -> tuple[float, float]:
    """Seconds for a health check and for reading one layer through a fresh connection (best of 3 each)."""
    health_s, layer_s = [], []
    for _ in range(3):
        with grpc.insecure_channel(address) as channel:
            started = time.monotonic()
            answer = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[no-untyped-call]
                health_pb2.HealthCheckRequest(service=""), timeout=30)
            health_s.append(time.monotonic() - started)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        with shardstore.open(f"grpc://{address}/small:v1", token=token, timeout=30, cache=None) as view:
            layer = view.get_tensor("layers.0.weight")
        layer_s.append(time.monotonic() - started)
        assert torch.equal(layer, expected)
    return min(health_s), min(layer_s)


@pytest.mark.parametrize("require_token", [True, False], ids=["require-token", "open-server"])
def test_stalled_calls_do_not_delay_health_or_a_one_layer_pull(store: LocalStore, small_model: Path,
                                                               require_token: bool) -> None:
    expected = load_file(str(small_model / "model.safetensors"))["layers.0.weight"]
    tokens = load_token_table(environ={"SHARDSTORE_TOKENS": TOKENS}) if require_token else None
    token = READ_TOKEN if require_token else None
    with BackgroundServer(store, tokens=tokens) as server:
        guard = server.registry.guard  # type: ignore[union-attr]
        assert guard is not None
        before = _health_and_one_layer(server.address, token, expected)
        with Staller(server.address, STALLED_CALLS) as attack:
            if require_token:
                # No token: each is refused from its headers alone, before the server waits for a message.
                assert _wait_until(lambda: all(code is not None for code in attack.outcomes()), 30)
                assert set(attack.outcomes()) == {grpc.StatusCode.UNAUTHENTICATED}
            else:
                # Open server: the calls are admitted to wait for their message, and hold no slot meanwhile.
                assert _wait_until(lambda: guard.waiting == STALLED_CALLS, 30), guard.waiting
                assert guard.running == 0
            during = _health_and_one_layer(server.address, token, expected)
            if not require_token:
                assert guard.waiting == STALLED_CALLS, "the stalled calls must still be there while we measure"
        assert during[0] - before[0] < 1.0 and during[1] - before[1] < 1.0, (before, during)
        assert _wait_until(lambda: guard.in_flight == 0, 15)


def test_a_flood_of_stalled_calls_drops_the_oldest_not_the_newcomer(store: LocalStore, small_model: Path) -> None:
    expected = load_file(str(small_model / "model.safetensors"))["layers.0.weight"]
    limits = CallLimits(max_waiting=50)
    with BackgroundServer(store, limits=limits) as server:
        guard = server.registry.guard  # type: ignore[union-attr]
        assert guard is not None
        with Staller(server.address, STALLED_CALLS) as attack:
            assert _wait_until(lambda: guard.dropped_waiting >= STALLED_CALLS - limits.max_waiting, 30)
            assert guard.waiting <= limits.max_waiting
            health_s, layer_s = _health_and_one_layer(server.address, None, expected)
            assert health_s < 1.0 and layer_s < 2.0
            refused = [code for code in attack.outcomes() if code is not None]
            assert refused.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= STALLED_CALLS - limits.max_waiting - 10


def test_a_call_that_never_sends_its_request_is_dropped_after_the_first_message_timeout(store: LocalStore) -> None:
    with BackgroundServer(store, limits=CallLimits(first_message_timeout=0.5)) as server, \
            Staller(server.address, 4) as attack:
        assert _wait_until(lambda: all(code is not None for code in attack.outcomes()), 10)
        assert set(attack.outcomes()) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert _wait_until(lambda: server.registry.guard.in_flight == 0, 10)  # type: ignore[union-attr]


@contextmanager
def _stalled_uploads(address: str, count: int, token: str | None) -> Iterator[list[grpc.Future]]:
    """``count`` uploads that send one chunk and then stall."""
    release = threading.Event()

    def one_chunk_then_wait() -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(kind=pb.OBJECT_KIND_BLOB, id="0" * 64, offset=0, total_size=10, data=b"12345")
        release.wait(60)

    metadata = ((AUTHORIZATION_KEY, f"{BEARER}{token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        upload = channel.stream_unary(f"/{SERVICE_NAME}/UploadObjects",
                                      request_serializer=pb.UploadChunk.SerializeToString,
                                      response_deserializer=pb.UploadObjectsResponse.FromString)
        futures = [upload.future(one_chunk_then_wait(), metadata=metadata, timeout=60) for _ in range(count)]
        try:
            yield futures
        finally:
            release.set()
            for future in futures:
                future.cancel()


def test_one_client_cannot_take_more_than_its_share_of_calls(store: LocalStore) -> None:
    limits = CallLimits(max_calls=16, max_calls_per_peer=3)
    with BackgroundServer(store, limits=limits) as server, grpc.insecure_channel(server.address) as channel:
        guard = server.registry.guard  # type: ignore[union-attr]
        assert guard is not None
        with _stalled_uploads(server.address, 3, None):
            assert _wait_until(lambda: guard.running == 3, 10)
            stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as refused:
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many calls at once from ipv4:127.0.0.1" in (refused.value.details() or "")
        assert _wait_until(lambda: guard.running == 0, 10)
        assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_an_upload_that_stops_sending_is_dropped_after_the_receive_timeout(store: LocalStore) -> None:
    tokens = load_token_table(environ={"SHARDSTORE_TOKENS": TOKENS})
    with BackgroundServer(store, tokens=tokens, limits=CallLimits(receive_timeout=0.5)) as server, \
            _stalled_uploads(server.address, 2, WRITE_TOKEN) as uploads:
        for upload in uploads:
            with pytest.raises(grpc.RpcError) as dropped:
                upload.result(timeout=10)
            assert dropped.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_until(lambda: server.registry.guard.running == 0, 10)  # type: ignore[union-attr]


@pytest.mark.parametrize(("peer", "address"), [
    ("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"),
    ("ipv6:[::1]:8080", "ipv6:[::1]"),
    ("unix:/run/s.sock", "unix:/run/s.sock"),
    ("", "unknown"),
])
def test_calls_are_counted_per_client_host_not_per_connection(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_an_upload_declaring_more_than_the_size_cap_is_refused_and_nothing_is_stored(store: LocalStore) -> None:
    data = b"y" * 5000
    with BackgroundServer(store, max_object_bytes=4096) as server, grpc.insecure_channel(server.address) as channel:
        upload = channel.stream_unary(f"/{SERVICE_NAME}/UploadObjects",
                                      request_serializer=pb.UploadChunk.SerializeToString,
                                      response_deserializer=pb.UploadObjectsResponse.FromString)
        chunk = pb.UploadChunk(kind=pb.OBJECT_KIND_BLOB, id=digest(data), offset=0, total_size=len(data), data=data)
        with pytest.raises(grpc.RpcError) as refused:
            upload(iter([chunk]), timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "over the limit of 4096" in (refused.value.details() or "")
    assert not store.exists(f"blobs/{digest(data)[:2]}/{digest(data)}")
    assert not [p for p in (store.root / "blobs").rglob("*") if p.is_file() and digest(data) in p.name]
