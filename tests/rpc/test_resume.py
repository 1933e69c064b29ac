"""A client waits for a server that is restarting, with backoff, up to its resume timeout (default 30 s)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from rpc.grpc_helpers import push_small_model
from shardstore.errors import StoreError
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.client import DEFAULT_RESUME_TIMEOUT_S, RESUME_TIMEOUT_ENV, GrpcClient


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_default_resume_timeout_is_30_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RESUME_TIMEOUT_ENV, raising=False)
    assert DEFAULT_RESUME_TIMEOUT_S == 30.0
    with GrpcClient("127.0.0.1:1") as client:
        assert client.resume_timeout == 30.0
    monkeypatch.setenv(RESUME_TIMEOUT_ENV, "4.5")
    with GrpcClient("127.0.0.1:1") as client:
        assert client.resume_timeout == 4.5


def test_a_server_back_after_4_s_is_waited_for(tmp_path: Path) -> None:
    """The old client gave up after about 2 s of retries; a restart takes longer than that."""
    store, _model = push_small_model(tmp_path)
    expected = Repository(store).resolve(parse_ref("small:v1"))
    port = _free_port()
    down_s = 4.0
    servers: list[BackgroundServer] = []
    starter = threading.Timer(down_s, lambda: servers.append(BackgroundServer(store, port=port).start()))
    with GrpcClient(f"127.0.0.1:{port}", timeout=5) as client:
        started = time.monotonic()
        starter.start()
        try:
            assert client.resolve(parse_ref("small:v1")) == expected
            waited = time.monotonic() - started
        finally:
            starter.join()
            for server in servers:
                server.stop()
    assert down_s <= waited < down_s + 6, waited  # backoff is capped, so it notices the server soon after
    assert client.retried >= 3


def test_the_client_gives_up_at_its_resume_timeout_in_one_line(tmp_path: Path) -> None:
    with GrpcClient(f"127.0.0.1:{_free_port()}", resume_timeout=1.5, timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(StoreError) as failed:
            client.resolve(parse_ref("small:v1"))
        took = time.monotonic() - started
    assert 1.4 <= took < 4, took  # it waited its resume timeout, and no longer
    assert client.retried >= 3  # backoff from 0.1 s: 0.1 + 0.2 + 0.4 + 0.8 s of retries fit in 1.5 s
    assert "\n" not in str(failed.value) and "resolve small:v1" in str(failed.value)
