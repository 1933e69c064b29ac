"""push --base: a real MiniLM fine-tune stored as XOR deltas against its base, pulled back bit for bit.

The fine-tune is made by real AdamW steps on real sentence pairs (``tests/finetune.py``),
so the deltas have the structure real fine-tunes have; noise would not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune import make_finetune
from helpers import tree_snapshot
from safetensors.torch import load_file, save_file

import shardstore
from shardstore.errors import FormatError, IntegrityError, NotFoundError
from shardstore.format.manifest import PieceBase, parse_manifest
from shardstore.format.shard import Shard, parse_shard
from shardstore.repo.inspect import describe
from shardstore.repo.pieces import decode_piece
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.repo.verify import verify
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore

MODEL_FILE = "model.safetensors"
WORDS = "embeddings.word_embeddings.weight"


@pytest.fixture(scope="module")
def finetuned(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 after 4 AdamW steps (lr 2e-5) of a contrastive loss, FP32 like its base."""
    return make_finetune(minilm_dir, tmp_path_factory.mktemp("finetune") / "minilm-ft")


def _store(path: Path) -> LocalStore:
    return LocalStore(path)


def test_finetune_with_base_stores_half_or_less_and_pulls_bit_exact(
    minilm_dir: Path, finetuned: Path, tmp_path: Path
) -> None:
    changed = load_file(str(finetuned / MODEL_FILE))
    original = load_file(str(minilm_dir / MODEL_FILE))
    assert sum(not torch.equal(changed[n], original[n]) for n in original) >= 90  # the steps moved nearly every tensor

    alone = shardstore.push(finetuned, "minilm-ft:v1", store=_store(tmp_path / "alone"))
    store = _store(tmp_path / "store")
    base = shardstore.push(minilm_dir, "minilm:v1", store=store)
    delta = shardstore.push(finetuned, "minilm-ft:v1", store=store, base="minilm:v1")

    assert delta.stored_bytes <= 0.5 * alone.stored_bytes
    assert delta.uploaded_bytes <= 0.5 * alone.uploaded_bytes  # what actually went over the wire
    assert delta.base == "minilm:v1"
    codecs = {figures["codec"] for figures in delta.per_tensor.values()}
    assert "delta+float-entropy.v1" in codecs
    assert delta.per_tensor[WORDS]["new_bytes"] < 0.1 * alone.per_tensor[WORDS]["stored_bytes"]

    out = tmp_path / "pulled"
    shardstore.pull("minilm-ft:v1", out, store=store)
    assert tree_snapshot(out) == tree_snapshot(finetuned)  # every file, every byte

    with shardstore.open("minilm-ft:v1", store=store) as view:
        assert view.manifest.base == base.manifest_id
        for name in ("encoder.layer.3.attention.self.query.weight", WORDS, "pooler.dense.bias"):
            assert torch.equal(view.get_tensor(name), changed[name])
        assert torch.equal(view.get_slice(WORDS)[1000:1010], changed[WORDS][1000:1010])
        state = view.state_dict()
        assert all(torch.equal(state[n], changed[n]) for n in changed)

    health = verify(Repository(store), read_data=True)
    assert health.healthy, health.problems


def test_inspect_and_push_json_report_delta_per_tensor(minilm_dir: Path, finetuned: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SHARDSTORE_STORE": str(tmp_path / "store")}

    def cli(*args: str | Path) -> dict[str, object]:
        result = subprocess.run([sys.executable, "-m", "shardstore", *map(str, args), "--json"], capture_output=True,
                                text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        figures: dict[str, object] = json.loads(result.stdout)
        return figures

    cli("push", minilm_dir, "minilm:v1")
    pushed = cli("push", finetuned, "minilm-ft:v1", "--base", "minilm:v1")
    inspected = cli("inspect", "minilm-ft:v1")
    per_tensor = pushed["per_tensor"]
    tensors = inspected["tensors"]
    assert isinstance(per_tensor, dict) and isinstance(tensors, dict)
    query = "encoder.layer.0.attention.self.query.weight"
    assert per_tensor[query]["codec"] == tensors[query]["codec"] == "delta+float-entropy.v1"
    assert 0 < tensors[query]["ratio"] < 0.6  # the XOR of a fine-tuned float is mostly zeros
    assert inspected["base"] is not None and inspected["stored_bytes"] == pushed["stored_bytes"]


def test_same_model_with_base_costs_only_its_manifest(minilm_bf16_dir: Path, tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    shardstore.push(minilm_bf16_dir, "minilm:v1", store=store)
    again = shardstore.push(minilm_bf16_dir, "minilm:v2", store=store, base="minilm:v1")
    assert again.stored_bytes == 0 and again.shards_uploaded == 0 and again.blobs_uploaded == 0
    with shardstore.open("minilm:v2", store=store) as view:
        assert again.uploaded_bytes == len(view.manifest.to_bytes())
    assert {f["codec"] for f in again.per_tensor.values()} == {"base"}
    shardstore.pull("minilm:v2", tmp_path / "out", store=store)
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(minilm_bf16_dir)


def test_one_changed_tensor_stores_only_that_tensor(minilm_bf16_dir: Path, tmp_path: Path) -> None:
    changed_dir = tmp_path / "changed"
    shutil.copytree(minilm_bf16_dir, changed_dir)
    tensors = load_file(str(changed_dir / MODEL_FILE))
    name = "encoder.layer.3.attention.output.LayerNorm.weight"  # 384 values packed with the rest of layer 3
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(changed_dir / MODEL_FILE), metadata={"format": "pt"})

    plain_store, delta_store = _store(tmp_path / "plain"), _store(tmp_path / "delta")
    for store in (plain_store, delta_store):
        shardstore.push(minilm_bf16_dir, "minilm:v1", store=store)
    plain = shardstore.push(changed_dir, "minilm:v2", store=plain_store)
    delta = shardstore.push(changed_dir, "minilm:v2", store=delta_store, base="minilm:v1")

    assert plain.uploaded_bytes > 1 << 20  # without a base the whole packed layer shard is new
    assert delta.stored_bytes < 2048  # with it, one small stream: the 768 raw bytes of the changed tensor
    assert [n for n, f in delta.per_tensor.items() if f["codec"] != "base"] == [name]
    shardstore.pull("minilm:v2", tmp_path / "out", store=delta_store)
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(changed_dir)


def test_chain_of_deltas_and_another_chunk_size(minilm_dir: Path, finetuned: Path, tmp_path: Path) -> None:
    twice = make_finetune(finetuned, tmp_path / "ft2", steps=2, seed=1)
    store = _store(tmp_path / "store")
    shardstore.push(minilm_dir, "minilm:v1", store=store)
    shardstore.push(finetuned, "minilm:v2", store=store, base="minilm:v1")
    third = shardstore.push(twice, "minilm:v3", store=store, base="minilm:v2")
    with shardstore.open("minilm:v3", store=store) as view:
        depths = {p.base.depth for t in view.manifest.tensors.values() for p in t.pieces if p.base is not None}
        assert 2 in depths  # a delta against a delta
        assert third.stored_bytes < 0.5 * sum(view.manifest.shards.values())
    shardstore.pull("minilm:v3", tmp_path / "out3", store=store)
    assert tree_snapshot(tmp_path / "out3") == tree_snapshot(twice)

    # Another chunk size cuts big tensors into other rows: those are coded on their own, the rest still deltas.
    other = shardstore.push(finetuned, "minilm:chunked", store=store, base="minilm:v1", chunk_bytes=1 << 20)
    assert other.per_tensor[WORDS]["codec"] == "float-entropy.v1"
    assert other.per_tensor["encoder.layer.0.attention.self.query.weight"]["codec"] == "delta+float-entropy.v1"
    shardstore.pull("minilm:chunked", tmp_path / "outc", store=store)
    assert tree_snapshot(tmp_path / "outc") == tree_snapshot(finetuned)


def test_push_and_pull_with_base_over_grpc(
    minilm_dir: Path, finetuned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDSTORE_CACHE", str(tmp_path / "client-cache"))
    server_store = _store(tmp_path / "server-store")
    with BackgroundServer(server_store) as server:
        url = f"grpc://{server.address}"
        shardstore.push(minilm_dir, f"{url}/minilm:v1")
        delta = shardstore.push(finetuned, f"{url}/minilm-ft:v1", base="minilm:v1")
        assert delta.base == "minilm:v1" and delta.stored_bytes < 0.5 * delta.raw_bytes
        shardstore.pull(f"{url}/minilm-ft:v1", tmp_path / "out")
        assert tree_snapshot(tmp_path / "out") == tree_snapshot(finetuned)
        changed = load_file(str(finetuned / MODEL_FILE))
        with shardstore.open(f"{url}/minilm-ft:v1", cache=tmp_path / "view-cache") as view:
            name = "encoder.layer.5.output.dense.weight"
            assert torch.equal(view.get_tensor(name), changed[name])
    assert verify(Repository(server_store), read_data=True).healthy


def test_missing_base_is_a_one_line_error_and_writes_nothing(minilm_dir: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    shardstore.push(minilm_dir, "minilm:v1", store=_store(store_dir))
    before = tree_snapshot(store_dir)
    with pytest.raises(NotFoundError, match="nope:v1"):
        shardstore.push(minilm_dir, "minilm:v2", store=_store(store_dir), base="nope:v1")
    result = subprocess.run([sys.executable, "-m", "shardstore", "push", str(minilm_dir), "minilm:v2", "--base",
                             "nope:v1", "--store", str(store_dir)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "nope:v1" in result.stderr
    assert tree_snapshot(store_dir) == before


def test_a_manifest_that_lies_about_a_delta_is_an_error(minilm_dir: Path, finetuned: Path, tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    shardstore.push(minilm_dir, "minilm:v1", store=store)
    shardstore.push(finetuned, "minilm-ft:v1", store=store, base="minilm:v1")
    repo = Repository(store)
    manifest = repo.get_manifest(repo.resolve(parse_ref("minilm-ft:v1")))
    record = manifest.tensors["encoder.layer.1.attention.self.key.weight"]
    (piece,) = record.pieces
    assert piece.base is not None
    shard = parse_shard(repo.get_shard_bytes(piece.shard), piece.shard)

    def lookup(shard_id: str) -> Shard:
        return parse_shard(repo.get_shard_bytes(shard_id), shard_id)

    good = bytes(decode_piece(shard, piece, record, lookup=lookup))
    assert good == changed_bytes(finetuned, "encoder.layer.1.attention.self.key.weight")
    with pytest.raises(FormatError, match="is a delta stream"):
        decode_piece(shard, dataclasses.replace(piece, base=None), record, lookup=lookup)
    with pytest.raises(FormatError, match="no base shard"):
        decode_piece(shard, piece, record)
    other = manifest.tensors["encoder.layer.1.attention.self.key.bias"].pieces[0]
    wrong = dataclasses.replace(piece, base=PieceBase(other.base.shard if other.base else other.shard, other.stream))
    with pytest.raises((IntegrityError, FormatError)):
        decode_piece(shard, wrong, record, lookup=lookup)
    info = describe(manifest, "minilm-ft:v1", "x")
    assert info["stored_bytes"] == manifest.stored_bytes < sum(manifest.shards.values())


def changed_bytes(folder: Path, name: str) -> bytes:
    return load_file(str(folder / MODEL_FILE))[name].contiguous().view(torch.uint8).numpy().tobytes()


def test_manifest_delta_fields_round_trip_and_are_validated(minilm_dir: Path, finetuned: Path, tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    plain = shardstore.push(minilm_dir, "minilm:v1", store=store)
    shardstore.push(finetuned, "minilm-ft:v1", store=store, base="minilm:v1")
    repo = Repository(store)
    manifest = repo.get_manifest(repo.resolve(parse_ref("minilm-ft:v1")))
    assert parse_manifest(manifest.to_bytes()) == manifest  # piece bases and base_shards survive a round trip
    doc = manifest.to_json()
    assert doc["base_shards"] and doc["totals"]["base_bytes"] > 0
    assert b"base_shards" not in repo.store.get(f"manifests/{plain.manifest_id}.json")  # absent without a base

    name = "encoder.layer.1.attention.self.key.weight"
    piece = doc["tensors"][name]["pieces"][0]

    def broken(change: Callable[[dict[str, Any]], None]) -> bytes:
        copy = json.loads(json.dumps(doc))
        change(copy)
        return json.dumps(copy).encode()

    unknown = "f" * 64
    cases: list[Callable[[dict[str, Any]], None]] = [
        lambda d: d["tensors"][name]["pieces"][0]["base"].update(shard=unknown),
        lambda d: d["tensors"][name]["pieces"][0]["base"].update(extra=1),
        lambda d: d["tensors"][name]["pieces"][0].update(base=_chain(piece["base"], 9)),
        lambda d: d.update(base_shards=[unknown]),
        lambda d: d.update(base=None),
    ]
    for change in cases:
        with pytest.raises(FormatError):
            parse_manifest(broken(change))
    parse_manifest(broken(lambda d: d["tensors"][name]["pieces"][0].update(base=_chain(piece["base"], 8))))


def _chain(base: dict[str, Any], depth: int) -> dict[str, Any]:
    link = dict(base)
    for _ in range(depth - 1):
        link = {**base, "base": link}
    return link
