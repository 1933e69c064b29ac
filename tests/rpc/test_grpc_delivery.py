"""The issue's "must show" points, on the real MiniLM model over a real server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import shardstore
from rpc.grpc_helpers import Served
from shardstore.cli import main
from shardstore.format.manifest import Manifest
from shardstore.rpc.client import GrpcClient
from shardstore.store.cache import ShardCache

LAYER = "encoder.layer.3."


def _layer_shards(manifest: Manifest) -> tuple[list[str], int]:
    names = [n for n in manifest.tensors if n.startswith(LAYER)]
    shards = manifest.shards_for(names)
    return shards, sum(manifest.shards[s] for s in shards)


def test_full_pull_over_grpc_is_bit_identical(minilm_served: Served, minilm_dir: Path, tmp_path: Path) -> None:
    report = shardstore.pull(minilm_served.url("minilm:v1"), tmp_path / "out")
    originals = {p.relative_to(minilm_dir) for p in minilm_dir.rglob("*") if p.is_file()}
    pulled = {p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert pulled == originals
    for rel in originals:
        assert (tmp_path / "out" / rel).read_bytes() == (minilm_dir / rel).read_bytes(), rel
    assert report.shards_fetched == minilm_served.push.shards_total and report.shards_cached == 0
    # Everything received is the stored model plus small change (manifest, blobs, framing).
    assert minilm_served.push.stored_bytes < report.transferred_bytes < 1.05 * minilm_served.push.uploaded_bytes


def test_one_layer_lazily_moves_only_its_shards_then_nothing(minilm_served: Served, minilm_dir: Path) -> None:
    originals = load_file(str(minilm_dir / "model.safetensors"))
    with shardstore.open(minilm_served.url("minilm:v1")) as view:
        assert isinstance(view.source, GrpcClient)
        manifest_bytes = len(view.manifest.to_bytes())
        shards, stored = _layer_shards(view.manifest)
        layer = {k: view.get_tensor(k) for k in view.manifest.tensors if k.startswith(LAYER)}
        moved = view.source.transferred_bytes
    assert layer and all(torch.equal(v, originals[k]) for k, v in layer.items())
    assert stored + manifest_bytes < moved <= 1.05 * stored + manifest_bytes
    assert stored < 0.2 * view.manifest.stored_bytes  # one layer, not the model

    with shardstore.open(minilm_served.url("minilm:v1")) as again:
        assert all(torch.equal(again.get_tensor(k), v) for k, v in layer.items())
        client = again.source
        assert isinstance(client, GrpcClient)
        assert client.fetched_shards == 0 and client.cached_shards == len(shards)
        assert client.transferred_bytes < manifest_bytes + 1024  # the ref and the manifest, no shard


def test_cli_pull_only_one_layer_then_again_from_cache(
    minilm_served: Served, tmp_path: Path, shard_cache_dir: Path, capsys: object
) -> None:
    url = minilm_served.url("minilm:v1")
    argv = ["pull", url, str(tmp_path / "layer"), "--only", f"{LAYER}*", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    with GrpcClient(minilm_served.server.address, use_cache=False) as client:
        manifest = client.get_manifest(client.resolve(shardstore.repo.refs.parse_ref("minilm:v1")))
    shards, stored = _layer_shards(manifest)
    manifest_bytes = len(manifest.to_bytes())
    blob_bytes = sum(b.size for b in manifest.blobs.values())  # config, tokenizer... a pull writes them too
    assert first["shards_fetched"] == len(shards) and first["shards_cached"] == 0
    assert stored < first["transferred_bytes"] <= 1.05 * stored + manifest_bytes + blob_bytes
    assert set(load_file(str(tmp_path / "layer" / "model.safetensors"))) == {
        n for n in manifest.tensors if n.startswith(LAYER)
    }
    assert sum(1 for _ in (shard_cache_dir / "shards").rglob("*") if _.is_file()) == len(shards)

    assert main([*argv[:2], str(tmp_path / "layer2"), *argv[3:]]) == 0
    second = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert second["shards_fetched"] == 0 and second["shards_cached"] == len(shards)
    assert second["transferred_bytes"] <= manifest_bytes + blob_bytes + 4096  # no shard moved


def _modified_copy(minilm_dir: Path, dest: Path, name: str) -> Path:
    shutil.copytree(minilm_dir, dest)
    tensors = load_file(str(minilm_dir / "model.safetensors"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_push_over_grpc_uploads_only_new_shards_and_pull_fetches_only_those(
    minilm_served: Served, minilm_dir: Path, tmp_path: Path
) -> None:
    name = "encoder.layer.5.output.dense.weight"
    changed = _modified_copy(minilm_dir, tmp_path / "v2", name)
    servicer = minilm_served.server.servicer
    received_before = servicer.received_bytes
    report = shardstore.push(changed, minilm_served.url("minilm:v2"))

    with shardstore.open(minilm_served.url("minilm:v2")) as v2, shardstore.open(minilm_served.url("minilm:v1")) as v1:
        new_shards = set(v2.manifest.shards) - set(v1.manifest.shards)
        holding = {p.shard for p in v2.manifest.tensors[name].pieces}
    assert new_shards == holding
    assert report.shards_uploaded == len(holding) < report.shards_total
    new_bytes = sum(v2.manifest.shards[s] for s in new_shards)
    # On the wire: exactly the new shards' bytes (blobs and the header are shared with v1).
    assert servicer.received_bytes - received_before == new_bytes
    assert report.uploaded_bytes == new_bytes + len(v2.manifest.to_bytes())

    cache = ShardCache()  # this test's own cache (SHARDSTORE_CACHE)
    shardstore.pull(minilm_served.url("minilm:v1"), tmp_path / "out1")
    second = shardstore.pull(minilm_served.url("minilm:v2"), tmp_path / "out2")
    assert second.shards_fetched == len(new_shards)
    assert second.shards_cached == report.shards_total - len(new_shards)
    assert all(s in cache for s in v2.manifest.shards)
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == (changed / "model.safetensors").read_bytes()


def test_state_dict_over_grpc_matches_local(minilm_served: Served, minilm_dir: Path) -> None:
    originals = load_file(str(minilm_dir / "model.safetensors"))
    with shardstore.open(minilm_served.url("minilm:v1")) as view:
        state = view.state_dict()
        assert isinstance(view.source, GrpcClient)
        assert view.source.fetched_shards == minilm_served.push.shards_total
    assert state.keys() == originals.keys()
    assert all(torch.equal(state[k], originals[k]) and state[k].dtype == originals[k].dtype for k in originals)
