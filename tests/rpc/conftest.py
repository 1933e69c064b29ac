"""Real gRPC servers on 127.0.0.1 (port 0) over temporary stores, each stopped by its fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import shardstore
from rpc.grpc_helpers import Served
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore


@pytest.fixture(scope="session")
def minilm_served(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the session, holding the real MiniLM pushed over gRPC once as ``minilm:v1``."""
    store = LocalStore(tmp_path_factory.mktemp("served") / "store")
    with BackgroundServer(store) as server:
        report = shardstore.push(minilm_dir, f"grpc://{server.address}/minilm:v1")
        yield Served(server, store, report)
