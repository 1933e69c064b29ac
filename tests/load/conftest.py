"""The real MiniLM pushed with small pieces (so tensor-parallel slices need only some of them), and a server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

import shardstore
from load.load_helpers import FINE_CHUNK, REF, Pushed
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore


@pytest.fixture(scope="session")
def minilm_fine(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    path = tmp_path_factory.mktemp("load") / "store"
    store = LocalStore(path)
    shardstore.push(minilm_dir, REF, store=store, chunk_bytes=FINE_CHUNK)
    return Pushed(store, path, load_file(str(minilm_dir / "model.safetensors")))


@pytest.fixture(scope="session")
def fine_server(minilm_fine: Pushed) -> Iterator[BackgroundServer]:
    """A real gRPC server on 127.0.0.1 (port 0) over the fine-grained store."""
    with BackgroundServer(minilm_fine.store) as server:
        yield server
