"""The content index: a re-push encodes only what the store lacks, and never trusts an index entry blindly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import shardstore
from shardstore.api import connect
from shardstore.format.digest import digest
from shardstore.repo.content_index import IndexedPiece, IndexEntry, index_key
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository, shard_key
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.metrics import ServerMetrics
from shardstore.store import LocalStore, open_store
from shardstore.store.base import Store

CHUNK = 64 << 10
ROWS = 512  # a [512, 128] F32 weight is 256 KiB: its own four 64 KiB pieces, one shard each


@pytest.fixture(autouse=True)
def _fixed_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifests carry their creation time: pin it, so two pushes of the same thing compare equal."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(3):
        tensors[f"layers.{layer}.weight"] = torch.randn(ROWS, 128, generator=generator)
        tensors[f"layers.{layer}.norm.weight"] = torch.randn(128, generator=generator)  # packed with the bias
        tensors[f"layers.{layer}.bias"] = torch.randn(128, generator=generator)
    return tensors


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text('{"layers": 3}\n')
    return folder


def _push_cli(model: Path, ref: str, store: Path, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "shardstore", "push", str(model), ref, "--store", str(store),
         "--chunk-size", str(CHUNK), "--json", *extra],
        capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --json: no progress bars, nothing but the one object on stdout
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def _pieces_of(name: str, tensors: dict[str, torch.Tensor]) -> int:
    """How many pieces push cuts a tensor into, computed here from the chunk size, not by the code under test."""
    tensor = tensors[name]
    row_bytes = tensor[0].numel() * tensor.element_size()
    return math.ceil(tensor.shape[0] / max(1, CHUNK // row_bytes))


def test_repush_after_one_tensor_changed_encodes_only_its_pieces(tmp_path: Path) -> None:
    tensors = _tensors()
    model = _write(tmp_path / "model", tensors)
    store = tmp_path / "store"
    first = _push_cli(model, "m:v1", store)
    total_pieces = first["pieces_encoded"]
    assert first["pieces_reused"] == 0 and first["shards_reused"] == 0
    assert first["bytes_encoded"] == sum(t.numel() * t.element_size() for t in tensors.values())

    again = _push_cli(model, "m:v1", store)
    assert again["pieces_encoded"] == 0 and again["bytes_encoded"] == 0
    assert again["pieces_reused"] == total_pieces and again["shards_uploaded"] == 0
    assert again["manifest_id"] == first["manifest_id"]

    changed = dict(tensors)
    changed["layers.1.weight"] = changed["layers.1.weight"] + 1.0
    _write(model, changed)
    third = _push_cli(model, "m:v2", store)
    expected = _pieces_of("layers.1.weight", changed)
    assert expected == 4
    assert third["pieces_encoded"] == expected
    assert third["bytes_encoded"] == changed["layers.1.weight"].numel() * 4
    assert third["pieces_reused"] == total_pieces - expected
    # The manifest is exactly the one a push into an empty store writes: reuse changes nothing stored.
    fresh = _push_cli(model, "m:v2", tmp_path / "fresh-store")
    assert fresh["pieces_reused"] == 0
    assert third["manifest_id"] == fresh["manifest_id"]


def _shard_of(store: Store, ref: str, tensor: str) -> str:
    repo = Repository(store)
    manifest = repo.get_manifest(repo.resolve(parse_ref(ref)))
    return manifest.tensors[tensor].pieces[0].shard


@pytest.mark.parametrize("damage", ["delete", "truncate", "garble-entry"])
def test_index_never_trusts_a_damaged_store(tmp_path: Path, damage: str) -> None:
    tensors = _tensors(1)
    model = _write(tmp_path / "model", tensors)
    store = LocalStore(tmp_path / "store")
    first = shardstore.push(model, "m:v1", store=store, chunk_bytes=CHUNK)
    victim = _shard_of(store, "m:v1", "layers.0.norm.weight")  # the shard packing the norm and the bias
    victim_path = store.root / shard_key(victim)
    if damage == "delete":
        victim_path.unlink()
    elif damage == "truncate":
        victim_path.write_bytes(victim_path.read_bytes()[:-100])
    else:  # the entry that names it: garbled, so it must be ignored and rewritten
        entry_paths = [p for p in (store.root / "index").rglob("*")
                       if p.is_file() and json.loads(p.read_bytes())["shard"] == victim]
        assert len(entry_paths) == 1
        entry_paths[0].write_bytes(b'{"format": "shardstore.index.v2", "shard": "' + b"0" * 64 + b'"')

    again = shardstore.push(model, "m:v1", store=store, chunk_bytes=CHUNK)
    assert again.pieces_encoded == 2  # the norm and the bias of layer 0, which share the victim shard
    assert again.pieces_reused == first.pieces_encoded - 2
    assert again.manifest_id == first.manifest_id
    assert digest(victim_path.read_bytes()) == victim  # healed, whole
    out = tmp_path / "pulled"
    shardstore.pull("m:v1", out, store=store)
    assert (out / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    pulled = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(pulled[k], tensors[k]) for k in tensors)
    # The entry was rewritten: a third push reuses everything.
    assert shardstore.push(model, "m:v1", store=store, chunk_bytes=CHUNK).pieces_encoded == 0


def test_an_entry_hashing_to_another_key_is_refused(tmp_path: Path) -> None:
    model = _write(tmp_path / "model", _tensors(2))
    store = LocalStore(tmp_path / "store")
    shardstore.push(model, "m:v1", store=store, chunk_bytes=CHUNK)
    entries = sorted(p for p in (store.root / "index").rglob("*") if p.is_file())
    # Swap two entries' bytes: each is now stored under a key its pieces do not hash to.
    a, b = entries[0].read_bytes(), entries[1].read_bytes()
    entries[0].write_bytes(b)
    entries[1].write_bytes(a)
    with pytest.raises(ValueError, match="hash to another key"):
        IndexEntry.parse(entries[0].read_bytes(), entries[0].name)
    assert Repository(store).find_indexed([entries[0].name, entries[1].name]) == {}
    report = shardstore.push(model, "m:v1", store=store, chunk_bytes=CHUNK)
    assert report.pieces_encoded > 0 and report.shards_uploaded == 0  # re-encoded, same shards


def _metric(metrics: ServerMetrics, method: str) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "shardstore_requests_total" and sample.labels.get("method", "").endswith(method):
                total += sample.value
    return total


def test_repush_over_grpc_asks_one_batched_query(tmp_path: Path) -> None:
    tensors = _tensors(3)
    model = _write(tmp_path / "model", tensors)
    store = LocalStore(tmp_path / "store")
    metrics = ServerMetrics()
    try:
        with BackgroundServer(store, metrics=metrics) as server:
            url = f"grpc://{server.address}/m:v1"
            first = shardstore.push(model, url, chunk_bytes=CHUNK)
            assert first.pieces_encoded > 0 and first.pieces_reused == 0
            before = _metric(metrics, "FindMissing")
            again = shardstore.push(model, url, chunk_bytes=CHUNK)
            finds = _metric(metrics, "FindMissing") - before
    finally:
        metrics.close()
    assert again.pieces_encoded == 0 and again.pieces_reused == first.pieces_encoded
    assert again.manifest_id == first.manifest_id
    # One query for every shard plan; the blobs (one header, config.json) ask one each, as before.
    assert finds == 1 + 2


def test_server_keeps_only_entries_the_shard_bears_out(tmp_path: Path) -> None:
    model = _write(tmp_path / "model", _tensors(4))
    store = LocalStore(tmp_path / "store")
    shardstore.push(model, "m:v1", store=store, chunk_bytes=CHUNK)
    repo = Repository(store)
    entries = [IndexEntry.parse(p.read_bytes(), p.name) for p in sorted((store.root / "index").rglob("*"))
               if p.is_file()]
    entry, other = [e for e in entries if len(e.pieces) == 1][:2]
    # A hostile client claims that another shard (same dtype, shape, pipeline, even stream size) holds
    # these pieces: only the stream's checksum, the raw digest of a lossless piece, gives it away.
    forged = IndexEntry(other.shard, other.size,
                        (IndexedPiece(entry.pieces[0].input, other.pieces[0].stored_bytes),))
    with BackgroundServer(store) as server, connect(f"grpc://{server.address}") as client:
        assert client.put_index([forged]) == 0
        assert IndexEntry.parse((store.root / index_key(entry.key)).read_bytes(), entry.key) == entry
        assert client.put_index([entry]) == 1
        assert client.find_indexed([entry.key]) == {entry.key: entry}
    assert repo.find_indexed([entry.key, forged.key]) == {entry.key: entry}
    assert not (store.root / index_key(forged.key)).exists() or forged.key == entry.key


def test_lossy_repush_reuses_with_the_same_quality(tmp_path: Path) -> None:
    model = _write(tmp_path / "model", _tensors(5))
    store = tmp_path / "store"
    first = _push_cli(model, "m:v1", store, "--lossy", "*.weight=int8")
    again = _push_cli(model, "m:v1", store, "--lossy", "*.weight=int8")
    assert again["pieces_encoded"] == 0 and again["manifest_id"] == first["manifest_id"]
    quality = {n: t["quality"] for n, t in first["per_tensor"].items() if "quality" in t}
    assert len(quality) == 3
    assert {n: t["quality"] for n, t in again["per_tensor"].items() if "quality" in t} == quality


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_index_on_s3_heals_a_deleted_or_truncated_shard(tmp_path: Path, damage: str, s3_bucket: str) -> None:
    tensors = _tensors(6)
    model = _write(tmp_path / "model", tensors)
    url = f"s3://{s3_bucket}/registry"
    first = shardstore.push(model, "m:v1", store=url, chunk_bytes=CHUNK)
    store = open_store(url)
    victim = _shard_of(store, "m:v1", "layers.2.weight")  # one 64 KiB piece of a big weight
    whole = store.get(shard_key(victim))
    if damage == "delete":
        store.delete(shard_key(victim))
    else:
        store.put(shard_key(victim), whole[: len(whole) // 2])
    again = shardstore.push(model, "m:v1", store=url, chunk_bytes=CHUNK)
    assert (again.pieces_encoded, again.shards_uploaded) == (1, 1)
    assert again.pieces_reused == first.pieces_encoded - 1
    assert store.get(shard_key(victim)) == whole
    out = tmp_path / "pulled"
    shardstore.pull("m:v1", out, store=url)
    assert (out / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
