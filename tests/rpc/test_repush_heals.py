"""A re-push over a truncated object heals it: "already stored" means "stored with its size", locally and over gRPC."""

from __future__ import annotations

from pathlib import Path

import pytest

import shardstore
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository, shard_key
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore


@pytest.mark.parametrize("over", ["local", "grpc"])
def test_a_repush_heals_a_truncated_shard(tmp_path: Path, over: str) -> None:
    model = write_small_model(tmp_path / "m")
    store = LocalStore(tmp_path / "store")
    shardstore.push(model, "m:v1", store=store, chunk_bytes=SMALL_CHUNK)
    repo = Repository(store)
    victim = next(iter(repo.get_manifest(repo.resolve(parse_ref("m:v1"))).shards))
    path = store.root / shard_key(victim)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a torn copy, a disk that lied
    with pytest.raises(shardstore.errors.ShardstoreError):
        shardstore.pull("m:v1", tmp_path / "broken", store=store)
    if over == "local":
        report = shardstore.push(model, "m:v1", store=store, chunk_bytes=SMALL_CHUNK)
    else:
        with BackgroundServer(store) as server:
            report = shardstore.push(model, f"grpc://{server.address}/m:v1", chunk_bytes=SMALL_CHUNK)
    assert report.shards_uploaded == 1  # exactly the truncated one, nothing else
    assert path.read_bytes() == whole
    shardstore.pull("m:v1", tmp_path / "out", store=store)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
