"""Signed URLs: clients of a server over S3 (moto on 127.0.0.1) read shard bytes from the bucket, not the server."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from faults import FaultProxy
from helpers import tree_snapshot

import shardstore
from shardstore.api import connect
from shardstore.format.digest import digest
from shardstore.repo.repository import Repository
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.server import RegistryServicer
from shardstore.store import LocalStore, Store, open_store

CLIENTS = 8


def test_eight_clients_pull_through_signed_urls_and_a_wrong_byte_is_refused(
    minilm_bf16_dir: Path, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store_url = f"s3://{s3_bucket}/models"
    pushed = shardstore.push(minilm_bf16_dir, "minilm:v1", store=store_url)
    shard_ids = sorted(Repository(open_store(store_url)).get_manifest(pushed.manifest_id).shards)
    victim = shard_ids[len(shard_ids) // 2]
    tampered: list[str] = []
    tamper = threading.Event()

    def lying_bucket(method: str, path: str, body: bytes) -> bytes:
        # Only presigned GETs (the clients'), never the server's own signed-header reads.
        if tamper.is_set() and method == "GET" and victim in path and "Signature=" in path:
            tampered.append(path)
            return bytes([body[0] ^ 0xFF]) + body[1:]
        return body

    # The server's store goes through the proxy, so the URLs it signs point there too.
    with FaultProxy(s3_endpoint, lambda number, method, path: None, lying_bucket) as proxy, \
            BackgroundServer(open_store(store_url, endpoint_url=proxy.url)) as server:
        servicer = server.servicer
        errors: list[BaseException] = []

        def pull(index: int) -> None:
            try:
                report = shardstore.pull(f"grpc://{server.address}/minilm:v1", tmp_path / f"out{index}",
                                         cache=tmp_path / f"cache{index}")
                assert report.shards_fetched == len(shard_ids)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=pull, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        for index in range(CLIENTS):
            assert tree_snapshot(tmp_path / f"out{index}") == tree_snapshot(minilm_bf16_dir)
        # Weights came from the bucket: the server sent no shard byte, only signed URLs. The small files
        # (all under 1 MiB here) and the header came through the server, one stream each, every client.
        header_bytes = int.from_bytes((minilm_bf16_dir / "model.safetensors").read_bytes()[:8], "little")
        small_files = sum(p.stat().st_size for p in minilm_bf16_dir.rglob("*")
                          if p.is_file() and p.name != "model.safetensors")
        assert servicer.sent_shard_bytes == 0
        assert servicer.sent_blob_bytes == CLIENTS * (small_files + header_bytes)
        assert servicer.signed_urls >= CLIENTS * len(shard_ids)

        # A URL that answers the wrong bytes: refused, and that one shard comes through the server.
        tamper.set()
        with connect(f"grpc://{server.address}", cache=tmp_path / "cache-tampered") as client:
            fetched = dict(client.fetch_shards(shard_ids))
            assert tampered and all(digest(fetched[s]) == s for s in shard_ids)
            assert client._signed_http is not None and client._signed_http.figures.refused == 1
        victim_size = open_store(store_url).size(f"shards/{victim[:2]}/{victim}")
        assert servicer.sent_shard_bytes == victim_size


def test_a_store_that_cannot_sign_streams(tmp_path: Path, minilm_dir: Path) -> None:
    store = LocalStore(tmp_path / "store")
    pushed = shardstore.push(minilm_dir, "minilm:v1", store=store)
    with BackgroundServer(store) as server:
        report = shardstore.pull(f"grpc://{server.address}/minilm:v1", tmp_path / "out", cache=tmp_path / "cache")
        assert tree_snapshot(tmp_path / "out") == tree_snapshot(minilm_dir)
        assert server.servicer.signed_urls == 0
        assert server.servicer.sent_shard_bytes == pushed.stored_bytes
        assert report.shards_fetched == pushed.shards_total


def test_signing_can_be_turned_off(minilm_bf16_dir: Path, s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    store_url = f"s3://{s3_bucket}/models"
    pushed = shardstore.push(minilm_bf16_dir, "minilm:v1", store=store_url)
    with BackgroundServer(open_store(store_url), signed_url_ttl=0) as server:
        shardstore.pull(f"grpc://{server.address}/minilm:v1", tmp_path / "out", cache=tmp_path / "cache")
        assert server.servicer.signed_urls == 0
        assert server.servicer.sent_shard_bytes == pushed.stored_bytes
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(minilm_bf16_dir)


def test_signed_urls_need_a_read_token(minilm_bf16_dir: Path, s3_endpoint: str, s3_bucket: str) -> None:
    from shardstore.rpc._generated import registry_pb2 as pb
    from shardstore.rpc.auth import Grant, Scope, TokenTable

    store_url = f"s3://{s3_bucket}/models"
    pushed = shardstore.push(minilm_bf16_dir, "minilm:v1", store=store_url)
    shard_id = next(iter(Repository(open_store(store_url)).get_manifest(pushed.manifest_id).shards))
    token = "reader-token-0123456789"
    with BackgroundServer(open_store(store_url), tokens=TokenTable([(token, Grant(Scope.READ))])) as server:
        with connect(f"grpc://{server.address}") as anonymous, pytest.raises(grpc.RpcError) as refused:
            anonymous._stub.SignObjectUrls(pb.SignObjectUrlsRequest(kind=pb.OBJECT_KIND_SHARD, ids=[shard_id]),
                                           timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with connect(f"grpc://{server.address}", token=token) as reader:
            urls = reader._sign(pb.OBJECT_KIND_SHARD, [shard_id])
        assert urls is not None and urlsplit(urls[0]).path.endswith(shard_id)


def test_only_large_files_come_through_signed_urls(minilm_bf16_dir: Path, s3_endpoint: str, s3_bucket: str,
                                                    tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(minilm_bf16_dir, folder)
    big = os.urandom(3 << 20)  # a 3 MiB file (a sentencepiece model, say): worth a trip to the bucket
    (folder / "tokenizer.model").write_bytes(big)
    store_url = f"s3://{s3_bucket}/large-files"
    shardstore.push(folder, "minilm:v1", store=store_url)
    with BackgroundServer(open_store(store_url)) as server:
        shardstore.pull(f"grpc://{server.address}/minilm:v1", tmp_path / "out", cache=tmp_path / "cache")
        sent_blobs = server.servicer.sent_blob_bytes
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(folder)
    header_bytes = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    small_files = sum(p.stat().st_size for p in folder.rglob("*")
                      if p.is_file() and p.name not in ("model.safetensors", "tokenizer.model"))
    # The header and every small file through the server; the 3 MiB file from the bucket.
    assert sent_blobs == small_files + header_bytes


class BusyAtFirst(RegistryServicer):
    """Answers its first two SignObjectUrls calls "busy" (RESOURCE_EXHAUSTED), as the per-address cap does."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.refused = 0

    async def SignObjectUrls(self, request: Any, context: Any) -> Any:
        if self.refused < 2:
            self.refused += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy; retry")
        return await super().SignObjectUrls(request, context)


def test_a_busy_server_is_asked_again_not_taken_for_one_that_cannot_sign(
    minilm_bf16_dir: Path, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store_url = f"s3://{s3_bucket}/busy"
    shardstore.push(minilm_bf16_dir, "minilm:v1", store=store_url)
    store = open_store(store_url)
    servicer = BusyAtFirst(store)
    with BackgroundServer(store, servicer=servicer) as server:
        shardstore.pull(f"grpc://{server.address}/minilm:v1", tmp_path / "out", cache=tmp_path / "cache")
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(minilm_bf16_dir)
    # The probe and the first real call were refused, and the shards still came from the bucket.
    assert servicer.refused == 2
    assert servicer.sent_shard_bytes == 0 and servicer.signed_urls > 0
