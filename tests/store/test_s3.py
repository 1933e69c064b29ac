"""S3 through a real HTTP endpoint (moto on 127.0.0.1): the real model, races, transient and permanent faults."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from faults import FaultProxy
from helpers import tree_snapshot
from safetensors.torch import load_file, save_file

import shardstore
from shardstore.errors import StoreError
from shardstore.repo.repository import Repository
from shardstore.repo.verify import verify
from shardstore.store import open_store
from shardstore.store.s3 import S3Store


def test_push_pull_open_real_model_on_s3(minilm_bf16_dir: Path, s3_bucket: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{s3_bucket}/models")
    assert isinstance(store, S3Store) and store.capabilities.atomic_compare_and_set
    pushed = shardstore.push(minilm_bf16_dir, "minilm:bf16", store=store)
    assert shardstore.push(minilm_bf16_dir, "minilm:bf16", store=store).uploaded_bytes == 0
    pulled = shardstore.pull("minilm:bf16", tmp_path / "out", store=f"s3://{s3_bucket}/models")
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(minilm_bf16_dir)
    assert pulled.shards_fetched == pushed.shards_total
    originals = load_file(str(minilm_bf16_dir / "model.safetensors"))
    with shardstore.open("minilm:bf16", store=store) as view:
        name = "encoder.layer.1.attention.self.key.weight"
        assert torch.equal(view.get_tensor(name), originals[name])
    assert verify(Repository(store), read_data=True).healthy


def _variant(src: Path, dest: Path, tensor: str) -> Path:
    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    tensors[tensor] = -tensors[tensor]
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_racing_pushes_with_overlapping_tensors(minilm_bf16_dir: Path, s3_bucket: str, tmp_path: Path) -> None:
    models = {
        "race/a:v1": _variant(minilm_bf16_dir, tmp_path / "a", "encoder.layer.0.output.dense.weight"),
        "race/b:v1": _variant(minilm_bf16_dir, tmp_path / "b", "encoder.layer.5.output.dense.weight"),
        "race/c:v1": minilm_bf16_dir,
    }
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(models))

    def push(ref: str, src: Path) -> None:
        try:
            barrier.wait()
            shardstore.push(src, ref, store=open_store(f"s3://{s3_bucket}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push, args=item) for item in models.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    repo = Repository(open_store(f"s3://{s3_bucket}"))
    report = verify(repo, read_data=True)
    assert report.healthy, report.problems
    assert report.refs == 3
    for ref, src in models.items():
        shardstore.pull(ref, tmp_path / "pulled" / ref.replace("/", "_"), store=repo.store)
        assert tree_snapshot(tmp_path / "pulled" / ref.replace("/", "_")) == tree_snapshot(src)


def test_transient_503s_are_survived(minilm_fp16_dir: Path, s3_endpoint: str, s3_bucket: str,
                                     tmp_path: Path) -> None:
    def every_third(number: int, method: str, path: str) -> int | None:
        return 503 if number % 3 == 0 else None

    with FaultProxy(s3_endpoint, every_third) as proxy:
        store = open_store(f"s3://{s3_bucket}/flaky", endpoint_url=proxy.url)
        shardstore.push(minilm_fp16_dir, "flaky:v1", store=store)
        shardstore.pull("flaky:v1", tmp_path / "out", store=store)
        assert proxy.faults > 10
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(minilm_fp16_dir)


def test_missing_bucket_is_a_clear_error(minilm_dir: Path, s3_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket/prefix")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as info:
        shardstore.push(minilm_dir, "m:v1", store=store)
    assert "\n" not in str(info.value)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        shardstore.pull("m:v1", "unused", store=store)


def test_access_denied_is_a_clear_error(minilm_dir: Path, s3_endpoint: str, s3_bucket: str) -> None:
    with FaultProxy(s3_endpoint, lambda number, method, path: 403) as proxy:
        store = open_store(f"s3://{s3_bucket}", endpoint_url=proxy.url)
        with pytest.raises(StoreError, match="access denied") as info:
            shardstore.push(minilm_dir, "m:v1", store=store)
        assert "\n" not in str(info.value)
        assert proxy.requests < 20  # permanent errors are not retried over and over


def test_two_servers_over_one_bucket_serve_the_same_model(
    minilm_bf16_dir: Path, s3_bucket: str, tmp_path: Path
) -> None:
    from shardstore.rpc.background import BackgroundServer

    store_url = f"s3://{s3_bucket}/shared"
    pushed = shardstore.push(minilm_bf16_dir, "minilm:v1", store=store_url)
    originals = load_file(str(minilm_bf16_dir / "model.safetensors"))
    name = "encoder.layer.3.intermediate.dense.weight"
    with BackgroundServer(open_store(store_url)) as first, BackgroundServer(open_store(store_url)) as second:
        views = [shardstore.open(f"grpc://{server.address}/minilm:v1", cache=str(tmp_path / f"cache{i}"))
                 for i, server in enumerate((first, second))]
        try:
            assert {view.manifest_id for view in views} == {pushed.manifest_id}
            for view in views:
                assert torch.equal(view.get_tensor(name), originals[name])  # lazily: one layer
        finally:
            for view in views:
                view.close()
        shardstore.pull(f"grpc://{second.address}/minilm:v1", tmp_path / "out", cache=str(tmp_path / "cache2"))
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(minilm_bf16_dir)
