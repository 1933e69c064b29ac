"""The HTTP object endpoint of ``serve --http-port``, and clients reading through a real nginx cache in front of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import urllib3
from helpers import tree_snapshot
from nginx_cache import NginxCache

import shardstore
from shardstore.api import connect
from shardstore.format.digest import digest
from shardstore.repo.repository import Repository, shard_key
from shardstore.rpc.auth import Grant, Scope, TokenTable
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore


def _shards(store: LocalStore, manifest_id: str) -> list[str]:
    return sorted(Repository(store).get_manifest(manifest_id).shards)


def test_objects_by_id_with_etag_cache_control_range_and_head(minilm_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    pushed = shardstore.push(minilm_dir, "minilm:v1", store=store)
    shard_id = _shards(store, pushed.manifest_id)[0]
    data = store.get(shard_key(shard_id))
    http = urllib3.PoolManager()
    with BackgroundServer(store, http_port=0) as server:
        base = f"http://{server.registry.http_address}"  # type: ignore[union-attr]
        whole = http.request("GET", f"{base}/v1/shards/{shard_id}")
        assert whole.status == 200 and whole.data == data
        assert whole.headers["ETag"] == f'"{shard_id}"'
        assert whole.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        part = http.request("GET", f"{base}/v1/shards/{shard_id}", headers={"Range": "bytes=10-109"})
        assert part.status == 206 and part.data == data[10:110]
        assert part.headers["Content-Range"] == f"bytes 10-109/{len(data)}"
        tail = http.request("GET", f"{base}/v1/shards/{shard_id}", headers={"Range": "bytes=-7"})
        assert tail.status == 206 and tail.data == data[-7:]
        beyond = http.request("GET", f"{base}/v1/shards/{shard_id}", headers={"Range": f"bytes={len(data)}-"})
        assert beyond.status == 416
        head = http.request("HEAD", f"{base}/v1/shards/{shard_id}")
        assert head.status == 200 and int(head.headers["Content-Length"]) == len(data) and head.data == b""
        unchanged = http.request("GET", f"{base}/v1/shards/{shard_id}", headers={"If-None-Match": f'"{shard_id}"'})
        assert unchanged.status == 304 and unchanged.data == b""
        config = Repository(store).get_manifest(pushed.manifest_id).blobs["config.json"]
        blob = http.request("GET", f"{base}/v1/blobs/{config.id}")
        assert blob.status == 200 and blob.data == (minilm_dir / "config.json").read_bytes()
        assert http.request("GET", f"{base}/v1/shards/{'0' * 64}").status == 404
        assert http.request("GET", f"{base}/v1/shards/not-an-id").status == 400
        requests, sent = server.servicer.metrics.http_figures("shard")
        # One whole body and two ranges; HEAD, 304, 404, 400 and 416 send no object byte.
        assert requests == 8 and sent == len(data) + 100 + 7
        # A corrupt object is refused by the server, never sent.
        path = store.root / shard_key(shard_id)
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
        corrupt = http.request("GET", f"{base}/v1/shards/{shard_id}")
        assert corrupt.status == 500 and data not in corrupt.data and shard_id.encode() in corrupt.data


def test_tokens_guard_the_http_endpoint(minilm_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    pushed = shardstore.push(minilm_dir, "minilm:v1", store=store)
    shard_id = _shards(store, pushed.manifest_id)[0]
    reader = "reader-token-0123456789"
    tokens = TokenTable([(reader, Grant(Scope.READ, "other/"))])
    http = urllib3.PoolManager()
    with BackgroundServer(store, http_port=0, tokens=tokens) as server:
        url = f"http://{server.registry.http_address}/v1/shards/{shard_id}"  # type: ignore[union-attr]
        assert http.request("GET", url).status == 401
        assert http.request("GET", url, headers={"Authorization": "Bearer wrong-token-0123456789"}).status == 401
        allowed = http.request("GET", url, headers={"Authorization": f"Bearer {reader}"})
        assert allowed.status == 200 and digest(allowed.data) == shard_id
        auth = f"http://{server.registry.http_address}/v1/auth"  # type: ignore[union-attr]
        assert http.request("GET", auth).status == 401
        assert http.request("GET", auth, headers={"Authorization": f"Bearer {reader}"}).status == 204


def test_two_clients_through_nginx_and_a_tampered_cache_entry(minilm_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    pushed = shardstore.push(minilm_dir, "minilm:v1", store=store)
    shard_ids = _shards(store, pushed.manifest_id)
    with BackgroundServer(store, http_port=0) as server, \
            NginxCache(tmp_path / "nginx", server.registry.http_address) as nginx:  # type: ignore[union-attr]
        servicer = server.servicer
        url = f"grpc://{server.address}/minilm:v1"
        first = shardstore.pull(url, tmp_path / "first", cache=tmp_path / "cache1", mirror=nginx.url)
        assert tree_snapshot(tmp_path / "first") == tree_snapshot(minilm_dir)
        assert first.shards_fetched == len(shard_ids)
        after_first = servicer.metrics.http_figures("shard")
        assert after_first == (len(shard_ids), pushed.stored_bytes)  # nginx fetched each shard once
        assert servicer.sent_shard_bytes == 0  # nothing came over gRPC

        second = shardstore.pull(url, tmp_path / "second", cache=tmp_path / "cache2", mirror=nginx.url)
        assert tree_snapshot(tmp_path / "second") == tree_snapshot(minilm_dir)
        assert second.shards_fetched == len(shard_ids)
        assert servicer.metrics.http_figures("shard") == after_first  # the second pull read no shard on the server
        assert servicer.sent_shard_bytes == 0

        # Flip the last byte (the end of the body) of one cached shard: nginx serves it, the client refuses it.
        victim = shard_ids[0]
        entry = next(p for p in nginx.cache_files() if f"/v1/shards/{victim}".encode() in p.read_bytes()[:4096])
        raw = bytearray(entry.read_bytes())
        raw[-1] ^= 0xFF
        entry.write_bytes(bytes(raw))
        with connect(url, cache=tmp_path / "cache3", mirror=nginx.url) as client:
            fetched = dict(client.fetch_shards(shard_ids))
            assert all(digest(fetched[s]) == s for s in shard_ids)
            assert client._mirror_http is not None and client._mirror_http.figures.refused == 1
        assert servicer.sent_shard_bytes == len(store.get(shard_key(victim)))  # that one shard, over gRPC
        assert servicer.metrics.http_figures("shard") == after_first


def test_a_mirror_that_is_down_falls_back_to_the_server(minilm_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import free_port

    store = LocalStore(tmp_path / "store")
    shardstore.push(minilm_dir, "minilm:v1", store=store)
    monkeypatch.setenv("SHARDSTORE_MIRROR", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with BackgroundServer(store) as server:
        shardstore.pull(f"grpc://{server.address}/minilm:v1", tmp_path / "out", cache=tmp_path / "cache")
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(minilm_dir)
