"""Availability: silent and slow peers meet deadlines, stalled readers are dropped, cancellations free everything."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from safetensors import safe_open

import shardstore
from rpc.access_helpers import cli, env_with, one_line_error, serve_process
from rpc.grpc_helpers import Served, push_small_model
from shardstore.errors import StoreError
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.client import GrpcClient
from shardstore.rpc.server import RegistryServicer
from shardstore.store import LocalStore


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _idle(server: BackgroundServer) -> bool:
    """No call in flight and no shard stream open on the server."""
    assert server.registry is not None and server.registry.guard is not None
    return server.registry.guard.in_flight == 0 and server.servicer.active_streams == 0


@pytest.fixture
def silent_peer() -> Iterator[str]:
    """A TCP listener on 127.0.0.1 that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, Path]:
    return push_small_model(tmp_path_factory.mktemp("deadlines"))


def _shard_ids(store: LocalStore, ref: str = "small:v1") -> list[str]:
    repo = Repository(store)
    return list(repo.get_manifest(repo.resolve(parse_ref(ref))).shards)


# -- silent peer ---------------------------------------------------------------------------------------------


def test_unary_call_to_a_silent_peer_fails_within_its_deadline(silent_peer: str) -> None:
    started = time.monotonic()
    with GrpcClient(silent_peer, timeout=1.0, retries=0) as client, \
            pytest.raises(StoreError, match="deadline_exceeded: no answer within the deadline") as caught:
        client.resolve(parse_ref("small:v1"))
    assert time.monotonic() - started < 5
    assert "\n" not in str(caught.value)


def test_stream_from_a_silent_peer_gives_up_after_the_idle_timeout(silent_peer: str) -> None:
    started = time.monotonic()
    idle_timeout, tries = 1.0, 2  # retries=1: the first try and one more
    client = GrpcClient(silent_peer, idle_timeout=idle_timeout, retries=tries - 1, backoff=0.01, use_cache=False)
    with client, pytest.raises(StoreError, match=r"stream shards at .*: no data for 1 s"):
        list(client.fetch_shards(["0" * 64]))
    elapsed = time.monotonic() - started
    # Each try waited out its idle timeout (so the timeout is what ended it), and nothing hung.
    assert tries * idle_timeout * 0.95 < elapsed < tries * idle_timeout + 6


def test_cli_against_a_silent_peer_is_one_line_within_its_timeout(silent_peer: str, tmp_path: Path) -> None:
    started = time.monotonic()
    result = cli("pull", f"grpc://{silent_peer}/small:v1", str(tmp_path / "out"), "--timeout", "1", "-q",
                 env=env_with(), timeout=60)
    assert "no answer within the deadline" in one_line_error(result, "pull")
    assert time.monotonic() - started < 30  # process start-up included


# -- slow server ---------------------------------------------------------------------------------------------


class SlowShards(RegistryServicer):
    """Waits ``delay`` seconds before each shard, as an overloaded backend would."""

    delay = 0.0

    async def _load_shard(self, shard_id: str) -> bytes:
        await asyncio.sleep(self.delay)
        return await super()._load_shard(shard_id)


def _slow_server(store: LocalStore, delay: float) -> BackgroundServer:
    servicer = SlowShards(store)
    servicer.delay = delay
    return BackgroundServer(store, servicer=servicer)


def test_a_stream_that_stops_moving_is_abandoned_and_freed(small: tuple[LocalStore, Path]) -> None:
    store, _model = small
    with _slow_server(store, delay=3.0) as server, \
            GrpcClient(server.address, idle_timeout=0.5, retries=1, backoff=0.01, use_cache=False) as client:
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"no data for 0\.5 s"):
            list(client.fetch_shards(_shard_ids(store)))
        assert time.monotonic() - started < 3.0  # well before the server would have answered
        assert wait_until(lambda: _idle(server)), "the abandoned streams still hold the server"


def test_a_slow_but_steady_stream_may_outlast_the_idle_timeout(small: tuple[LocalStore, Path]) -> None:
    """The idle timeout bounds the wait for each message, not the pull: a long pull that keeps moving finishes."""
    store, _model = small
    ids = _shard_ids(store)
    assert len(ids) >= 6
    with _slow_server(store, delay=0.25) as server, \
            GrpcClient(server.address, idle_timeout=1.0, retries=0, use_cache=False) as client:
        started = time.monotonic()
        received = dict(client.fetch_shards(ids))
        assert time.monotonic() - started > 1.0  # longer than the idle timeout in total
    assert list(received) == ids


# -- stalled readers and cancellations --------------------------------------------------------------------------


def test_a_client_that_stops_reading_is_dropped_by_the_server(minilm_served: Served) -> None:
    store = minilm_served.store
    ids = _shard_ids(store, "minilm:v1")
    with BackgroundServer(store, send_timeout=1.0) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RegistryStub(channel)  # type: ignore[no-untyped-call]
        stream = stub.StreamShards(pb.StreamShardsRequest(shard_ids=ids), timeout=60)
        next(stream)  # then read nothing: the windows fill and the server's writes wait
        started = time.monotonic()
        assert wait_until(lambda: server.servicer.active_streams == 1, timeout=10)
        assert wait_until(lambda: _idle(server), timeout=20), "a stalled reader pins the server's handler"
        assert time.monotonic() - started < 10
        stream.cancel()


def _server_tasks(server: BackgroundServer) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), server._loop).result(timeout=10)


def test_many_cancelled_streams_do_not_exhaust_the_server(minilm_served: Served, minilm_dir: Path) -> None:
    """4x more cancelled streams than the server admits at once: if one leaked, later calls would be refused."""
    store = minilm_served.store
    ids = _shard_ids(store, "minilm:v1")
    with BackgroundServer(store, max_concurrent_rpcs=8, pace_bytes_per_s=50e6) as server:
        baseline = _server_tasks(server)

        def cancel_streams(count: int) -> None:
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.RegistryStub(channel)  # type: ignore[no-untyped-call]
                for _ in range(count):
                    stream = stub.StreamShards(pb.StreamShardsRequest(shard_ids=ids), timeout=30)
                    next(stream)  # the server is mid-stream, prefetching the next shard
                    stream.cancel()

        workers = [threading.Thread(target=cancel_streams, args=(8,)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert wait_until(lambda: _idle(server)), "cancelled streams still counted as open"
        assert wait_until(lambda: _server_tasks(server) <= baseline), "cancelled streams left tasks behind"
        # ... and it still serves, correctly.
        with shardstore.open(f"grpc://{server.address}/minilm:v1") as view:
            name = "encoder.layer.0.attention.self.query.weight"
            got = view.get_tensor(name)
        with safe_open(str(minilm_dir / "model.safetensors"), "pt") as original:
            assert got.equal(original.get_tensor(name))


def _active_streams(metrics_address: str) -> int:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(r"^shardstore_active_streams (\S+)$", text, re.MULTILINE)
    assert match, "no shardstore_active_streams gauge"
    return int(float(match.group(1)))


def test_killed_and_interrupted_pulls_free_their_streams(minilm_served: Served, minilm_dir: Path,
                                                         tmp_path: Path) -> None:
    """Real processes: pulls from a paced ``serve`` are SIGKILLed and SIGINTed mid-stream; the server lets go."""
    env = env_with()
    with serve_process(minilm_served.store.root, "--max-rate", "8MB", "--metrics-port", "0", env=env) as served:
        metrics = str(served.ready["metrics_address"])
        pulls = [
            subprocess.Popen([sys.executable, "-m", "shardstore", "pull", f"grpc://{served.address}/minilm:v1",
                              str(tmp_path / f"out{i}"), "-q", "--cache", str(tmp_path / f"cache{i}")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            for i in range(4)
        ]
        try:
            assert wait_until(lambda: _active_streams(metrics) == len(pulls), timeout=60), "pulls never streamed"
            for i, proc in enumerate(pulls):
                proc.send_signal(signal.SIGKILL if i % 2 else signal.SIGINT)
            codes = [proc.wait(timeout=30) for proc in pulls]
        finally:
            for proc in pulls:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert codes == [130, -signal.SIGKILL, 130, -signal.SIGKILL]
        assert wait_until(lambda: _active_streams(metrics) == 0), "streams of dead clients are still open"
        pulled = cli("pull", f"grpc://{served.address}/minilm:v1", str(tmp_path / "after"), "-q", "--only",
                     "pooler.*", env=env)
        assert pulled.returncode == 0, pulled.stderr
    with safe_open(str(tmp_path / "after" / "model.safetensors"), "pt") as got, \
            safe_open(str(minilm_dir / "model.safetensors"), "pt") as original:
        assert got.get_tensor("pooler.dense.weight").equal(original.get_tensor("pooler.dense.weight"))

