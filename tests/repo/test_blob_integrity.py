"""A tampered blob (config.json) is refused by every reader, naming it: local pull, gRPC pull, the server, verify."""

from __future__ import annotations

from pathlib import Path

import pytest
from repo.test_verify_gc import manifest_of
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model

import shardstore
from shardstore.errors import IntegrityError
from shardstore.format.digest import digest
from shardstore.repo.repository import Repository, blob_key
from shardstore.repo.verify import verify
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore


def test_a_tampered_config_blob_is_refused_everywhere_and_named(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    model = write_small_model(tmp_path / "m")
    shardstore.push(model, "m:v1", store=store, chunk_bytes=SMALL_CHUNK)
    _manifest_id, manifest = manifest_of(store, "m:v1")
    config_id = digest((model / "config.json").read_bytes())
    assert config_id in {b.id for b in manifest.blobs.values()}
    path = store.root / blob_key(config_id)
    path.write_bytes(b'{"layers": 5}\n')  # same size, other content: a size check alone would pass it

    with pytest.raises(IntegrityError, match=f"blob {config_id}"):
        shardstore.pull("m:v1", tmp_path / "local", store=store)
    assert not (tmp_path / "local" / "config.json").exists()
    with BackgroundServer(store) as server, pytest.raises(IntegrityError, match=config_id):
        shardstore.pull(f"grpc://{server.address}/m:v1", tmp_path / "remote", cache=tmp_path / "cache")
    assert not (tmp_path / "remote" / "config.json").exists()
    report = verify(Repository(store), read_data=True)
    assert [p for p in report.problems if config_id in p and "does not match its id" in p]
