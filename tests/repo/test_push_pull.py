"""Push and pull of the real MiniLM model (FP32, BF16, FP16): bit-identical, deduplicated, lazy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import tree_snapshot
from safetensors.torch import load_file, save_file

import shardstore
from shardstore.errors import NotFoundError
from shardstore.store import LocalStore

LAYER = "encoder.layer.2."


@pytest.mark.parametrize("variant", ["minilm_dir", "minilm_bf16_dir", "minilm_fp16_dir"])
@pytest.mark.parametrize("codec", ["zstd", "raw"])
def test_push_pull_is_byte_identical(
    request: pytest.FixtureRequest, variant: str, codec: str, tmp_path: Path, local_store: LocalStore
) -> None:
    model: Path = request.getfixturevalue(variant)
    report = shardstore.push(model, "minilm:v1", store=local_store, codec=codec)
    assert report.tensors == 101 + 3  # MiniLM's 104 tensors
    assert report.shards_uploaded == report.shards_total > 0
    pulled = shardstore.pull("minilm:v1", tmp_path / "out", store=local_store)
    assert pulled.tensors == report.tensors and pulled.raw_bytes == report.raw_bytes
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(model)  # every file, every byte


def test_second_push_uploads_nothing(minilm_dir: Path, local_store: LocalStore,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    first = shardstore.push(minilm_dir, "minilm:v1", store=local_store)
    again = shardstore.push(minilm_dir, "minilm:v1", store=local_store)
    assert again.manifest_id == first.manifest_id
    assert again.uploaded_bytes == 0 and again.shards_uploaded == 0 and again.blobs_uploaded == 0
    # Another creation time than the first push's, even when both fall in the same second.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    renamed = shardstore.push(minilm_dir, "other/name:v9", store=local_store)
    # The same model under another name is the same objects; only its manifest (its own "created") is new.
    manifest_bytes = len(local_store.get(f"manifests/{renamed.manifest_id}.json"))
    assert renamed.shards_uploaded == renamed.blobs_uploaded == 0 and renamed.uploaded_bytes == manifest_bytes


def test_changing_one_tensor_uploads_only_its_shards(
    minilm_bf16_dir: Path, tmp_path: Path, local_store: LocalStore
) -> None:
    base = shardstore.push(minilm_bf16_dir, "minilm:v1", store=local_store)
    changed_dir = tmp_path / "changed"
    shutil.copytree(minilm_bf16_dir, changed_dir)
    tensors = load_file(str(changed_dir / "model.safetensors"))
    name = "encoder.layer.4.intermediate.dense.weight"
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(changed_dir / "model.safetensors"), metadata={"format": "pt"})

    second = shardstore.push(changed_dir, "minilm:v2", store=local_store)
    view1, view2 = shardstore.open("minilm:v1", store=local_store), shardstore.open("minilm:v2", store=local_store)
    old_shards = set(view1.manifest.shards)
    new_shards = set(view2.manifest.shards) - old_shards
    holding = {p.shard for p in view2.manifest.tensors[name].pieces}
    assert new_shards == holding  # only the shards that hold the changed tensor are new
    assert second.shards_uploaded == len(holding)
    new_bytes = sum(view2.manifest.shards[s] for s in new_shards)
    assert view2.manifest.files[0].header == view1.manifest.files[0].header  # same names, shapes, offsets
    assert second.uploaded_bytes == new_bytes + len(view2.manifest.to_bytes())  # the new shards + the manifest
    assert base.stored_bytes / second.uploaded_bytes > 5


def test_lazy_view_reads_only_what_is_asked(minilm_dir: Path, local_store: LocalStore) -> None:
    shardstore.push(minilm_dir, "minilm:v1", store=local_store)
    originals = load_file(str(minilm_dir / "model.safetensors"))
    view = shardstore.open("minilm:v1", store=local_store)
    assert sorted(view.keys()) == sorted(originals)
    assert view.metadata() == {"format": "pt"}
    manifest_bytes = len(view.manifest.to_bytes())
    assert view.source.transferred_bytes == manifest_bytes  # names and shapes come from the manifest alone
    name = "embeddings.word_embeddings.weight"
    rows = view.get_slice(name)[1000:1010]
    assert torch.equal(rows, originals[name][1000:1010])
    record = view.manifest.tensors[name]
    (piece,) = record.pieces_for_rows(1000, 1010)
    one_piece = view.manifest.shards[piece.shard]
    assert len(record.pieces) > 5
    assert view.source.transferred_bytes == manifest_bytes + one_piece  # one piece, not the whole table
    assert torch.equal(view.get_slice(name)[-3], originals[name][-3])
    assert torch.equal(view.get_slice(name)[5:50:7, 2:4], originals[name][5:50:7, 2:4])
    names = view.keys()
    layer = {k: view.get_tensor(k) for k in names if k.startswith(LAYER)}
    assert all(torch.equal(v, originals[k]) for k, v in layer.items())
    state = view.state_dict()
    assert all(torch.equal(state[k], originals[k]) and state[k].dtype == originals[k].dtype for k in originals)
    with pytest.raises(NotFoundError, match="no tensor named"):
        view.get_tensor("nope")


def test_pull_only_glob_writes_a_loadable_subset(minilm_dir: Path, tmp_path: Path, local_store: LocalStore) -> None:
    shardstore.push(minilm_dir, "minilm:v1", store=local_store)
    report = shardstore.pull("minilm:v1", tmp_path / "part", store=local_store, only=[f"{LAYER}*"])
    subset = load_file(str(tmp_path / "part" / "model.safetensors"))
    originals = load_file(str(minilm_dir / "model.safetensors"))
    assert set(subset) == {k for k in originals if k.startswith(LAYER)}
    assert all(torch.equal(subset[k], originals[k]) for k in subset)
    assert report.raw_bytes == sum(v.numel() * v.element_size() for v in subset.values())
    assert (tmp_path / "part" / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
    with pytest.raises(NotFoundError, match="no tensor matches"):
        shardstore.pull("minilm:v1", tmp_path / "none", store=local_store, only=["no.such.*"])


def test_sharded_checkpoint_with_index(tmp_path: Path, local_store: LocalStore) -> None:
    import json

    model = tmp_path / "sharded"
    model.mkdir()
    first = {"layers.0.w": torch.randn(64, 32), "layers.0.b": torch.randn(32)}
    second = {"layers.1.w": torch.randn(64, 32).to(torch.bfloat16), "lm_head.weight": torch.randn(10, 32)}
    save_file(first, str(model / "model-00001-of-00002.safetensors"))
    save_file(second, str(model / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model / "config.json").write_text("{}")
    shardstore.push(model, "sharded:v1", store=local_store, chunk_bytes=1024)
    shardstore.pull("sharded:v1", tmp_path / "out", store=local_store)
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(model)


def test_view_behaves_like_a_mapping_of_names(minilm_dir: Path, local_store: LocalStore) -> None:
    shardstore.push(minilm_dir, "minilm:v1", store=local_store)
    with shardstore.open("minilm:v1", store=local_store) as view:
        assert list(view) == view.keys() and len(view) == 104
        assert "pooler.dense.weight" in view and "nope" not in view


def test_view_shard_cache_stays_within_its_bound(minilm_dir: Path, local_store: LocalStore) -> None:
    shardstore.push(minilm_dir, "minilm:v1", store=local_store)
    limit = 6 << 20
    with shardstore.open("minilm:v1", store=local_store, shard_cache_bytes=limit) as view:
        for name in view:
            view.get_tensor(name)
            cached = view._cache
            assert view._cache_bytes == sum(view.manifest.shards[s] for s in cached) <= limit
        assert len(view._cache) > 0


def test_forged_shard_declaring_a_bigger_stream_is_refused(tmp_path: Path, local_store: LocalStore) -> None:
    """A shard whose id is valid but whose stream is not the piece the manifest names is an error, not a write."""
    import dataclasses

    import numpy as np

    from shardstore.codecs.raw import RawCodec
    from shardstore.errors import IntegrityError
    from shardstore.format.digest import digest, stream_checksum
    from shardstore.format.shard import StreamHeader, build_shard
    from shardstore.repo.refs import parse_ref
    from shardstore.repo.repository import Repository

    save_file({"w": torch.zeros(4, 8)}, str(tmp_path / "m.safetensors"))
    shardstore.push(tmp_path / "m.safetensors", "m:v1", store=local_store, codec="raw")
    repo = Repository(local_store)
    manifest = repo.get_manifest(repo.resolve(parse_ref("m:v1")))
    record = manifest.tensors["w"]
    # 64 rows where the manifest expects 4: a reader trusting the shard would write 16x past the tensor.
    big = np.ones((64, 8), dtype=np.float32).tobytes()
    header = StreamHeader("F32", (64, 8), (RawCodec().get_config(),), stream_checksum(big))
    forged = build_shard([(header, big)])
    forged_id = digest(forged)
    repo.put_shard(forged_id, forged)
    piece = dataclasses.replace(record.pieces[0], shard=forged_id, stored_bytes=len(big))
    tensors = {"w": dataclasses.replace(record, pieces=(piece,))}
    forged_manifest = dataclasses.replace(manifest, tensors=tensors, shards={forged_id: len(forged)}, _bytes=b"")
    manifest_id, _ = repo.put_manifest(forged_manifest)
    repo.set_ref(parse_ref("m:forged"), manifest_id)

    with pytest.raises(IntegrityError, match=f"shard {forged_id}: stream 0 declares F32 \\[64, 8\\]"):
        shardstore.pull("m:forged", tmp_path / "out", store=local_store)
    with shardstore.open("m:forged", store=local_store) as view, pytest.raises(IntegrityError, match=forged_id):
        view.get_tensor("w")
