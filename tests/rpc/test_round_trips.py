"""A pull over a link with a round trip: fewer calls, small objects fetched several at once, shards not waiting.

The server is the real one on 127.0.0.1, made slow the way a distant link is: every GetBlob call
waits before it answers. Sequential fetches would never overlap; the pull must keep several of
them in flight, and still write every file byte for byte. The ref brings its manifest along, so
no GetManifest round trip follows, unless the server predates that (then it is asked as before),
and a manifest that came along is checked against the ref's id like any other.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

import shardstore
from rpc.grpc_helpers import push_small_model, write_small_model
from shardstore.errors import IntegrityError, NotFoundError
from shardstore.format.digest import digest
from shardstore.format.manifest import Manifest
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.client import GrpcClient
from shardstore.rpc.server import RegistryServicer
from shardstore.store import LocalStore

ROUND_TRIP_S = 0.3  # long beside the few ms a pull takes to start its shard stream, even on a busy machine
FILES = 3


class DistantRegistry(RegistryServicer):
    """The real servicer, each GetBlob answered a round trip late; it counts the calls open at once by kind."""

    def __init__(self, store: LocalStore, header_ids: set[str]) -> None:
        super().__init__(store)
        self.header_ids = header_ids
        self.open = {"header": 0, "blob": 0}
        self.peak = {"header": 0, "blob": 0}
        self.calls = {"header": 0, "blob": 0}
        self.headers_done_at_shards: list[int] = []

    async def StreamShards(self, request: pb.StreamShardsRequest, context: Any) -> AsyncIterator[bytes]:
        self.headers_done_at_shards.append(self.calls["header"] - self.open["header"])
        async for chunk in super().StreamShards(request, context):
            yield chunk

    async def GetBlob(self, request: pb.GetBlobRequest, context: Any) -> AsyncIterator[bytes]:
        kind = "header" if request.blob_id in self.header_ids else "blob"
        self.calls[kind] += 1
        self.open[kind] += 1
        self.peak[kind] = max(self.peak[kind], self.open[kind])
        try:
            await asyncio.sleep(ROUND_TRIP_S)
            async for chunk in super().GetBlob(request, context):
                yield chunk
        finally:
            self.open[kind] -= 1


def _split_folder(source: Path, dest: Path) -> Path:
    """The MiniLM folder with its weights cut into FILES safetensors files and an index, as HF shards them."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for index in range(FILES):
        part = names[index::FILES]
        file_name = f"model-{index + 1:05d}-of-{FILES:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(dest / file_name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file_name)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def _pushed_split(minilm_dir: Path, tmp_path: Path) -> tuple[Path, LocalStore, Manifest]:
    """The split MiniLM folder pushed as split:v1 into a store under ``tmp_path``: folder, store, manifest."""
    folder = _split_folder(minilm_dir, tmp_path / "split")
    store = LocalStore(tmp_path / "store")
    shardstore.push(folder, "split:v1", store=str(store.root))
    repo = Repository(store)
    return folder, store, repo.get_manifest(repo.resolve(parse_ref("split:v1")))


def test_pull_keeps_several_small_objects_in_flight(minilm_dir: Path, tmp_path: Path) -> None:
    folder, store, manifest = _pushed_split(minilm_dir, tmp_path)
    headers = {record.header for record in manifest.files}
    others = [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]
    assert len(headers) == FILES and len(others) == 13  # the shipped folder's 12 other files and the index

    servicer = DistantRegistry(store, headers)
    with BackgroundServer(store, servicer=servicer) as server:
        shardstore.pull(f"grpc://{server.address}/split:v1", tmp_path / "out", cache=tmp_path / "cold")

    for path in folder.rglob("*"):
        if path.is_file():
            rel = path.relative_to(folder)
            assert (tmp_path / "out" / rel).read_bytes() == path.read_bytes(), rel
    assert servicer.calls == {"header": FILES, "blob": len(others)}
    # Every header at once, and several of the 13 small files (they are all under 8 MiB); one at a time,
    # the peaks would be 1.
    assert servicer.peak["header"] == FILES
    assert servicer.peak["blob"] >= 4
    # The shard stream did not wait for the headers: it was asked for before any of them had come
    # back (each takes ROUND_TRIP_S; the stream's first call comes well within it).
    assert servicer.headers_done_at_shards[:1] == [0]


class CountingRegistry(RegistryServicer):
    """The real servicer, counting ResolveRef and GetManifest calls; ``answer`` may rewrite ResolveRef's answer."""

    def __init__(self, store: LocalStore, answer: str = "as is") -> None:
        super().__init__(store)
        self.manifests = Path(store.root) / "manifests"
        self.answer = answer
        self.calls = {"ResolveRef": 0, "GetManifest": 0, "SignObjectUrls": 0}
        self.asked_with_manifest: list[bool] = []

    async def ResolveRef(self, request: pb.ResolveRefRequest, context: Any) -> pb.ResolveRefResponse:
        self.calls["ResolveRef"] += 1
        self.asked_with_manifest.append(request.with_manifest)
        response = await super().ResolveRef(request, context)
        if self.answer == "old server":  # a server from before with_manifest and signs_urls: the id alone
            return pb.ResolveRefResponse(manifest_id=response.manifest_id)
        if self.answer == "forged manifest":  # another model's manifest, valid on its own, under this ref's id
            forged = next(p.read_bytes() for p in sorted(self.manifests.iterdir()) if p.stem != response.manifest_id)
            return pb.ResolveRefResponse(manifest_id=response.manifest_id, manifest=forged)
        return response

    async def GetManifest(self, request: pb.GetManifestRequest, context: Any) -> pb.GetManifestResponse:
        self.calls["GetManifest"] += 1
        return await super().GetManifest(request, context)

    async def SignObjectUrls(self, request: pb.SignObjectUrlsRequest, context: Any) -> pb.SignObjectUrlsResponse:
        self.calls["SignObjectUrls"] += 1
        return await super().SignObjectUrls(request, context)


def _pull_through(servicer: CountingRegistry, store: LocalStore, out: Path) -> None:
    with BackgroundServer(store, servicer=servicer) as server:
        shardstore.pull(f"grpc://{server.address}/small:v1", out)


def _same_files(model: Path, out: Path) -> None:
    files = [p for p in model.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert (out / path.relative_to(model)).read_bytes() == path.read_bytes(), path.name


def test_the_manifest_comes_with_the_ref(tmp_path: Path) -> None:
    store, model = push_small_model(tmp_path)
    servicer = CountingRegistry(store)
    _pull_through(servicer, store, tmp_path / "out")
    _same_files(model, tmp_path / "out")
    assert servicer.asked_with_manifest == [True]
    # One round trip where there were two, and no probe for signed URLs: over a local folder the
    # server said in that answer that it does not sign, so the shard stream waits for nothing.
    assert servicer.calls == {"ResolveRef": 1, "GetManifest": 0, "SignObjectUrls": 0}


def test_a_server_from_before_still_serves_a_pull(tmp_path: Path) -> None:
    store, model = push_small_model(tmp_path)
    servicer = CountingRegistry(store, "old server")
    _pull_through(servicer, store, tmp_path / "out")
    _same_files(model, tmp_path / "out")
    assert servicer.calls == {"ResolveRef": 1, "GetManifest": 1, "SignObjectUrls": 1}  # asked, as before


def test_a_manifest_that_is_not_the_refs_is_refused(tmp_path: Path) -> None:
    store, _ = push_small_model(tmp_path)
    # A second model in the same store gives the server a real manifest to pass off as small:v1's.
    shardstore.push(write_small_model(tmp_path / "second", seed=1), "second:v1", store=str(store.root))
    real_id = Repository(store).resolve(parse_ref("small:v1"))
    forged = [p for p in (Path(store.root) / "manifests").iterdir() if p.stem != real_id]
    assert len(forged) == 1 and digest(forged[0].read_bytes()) != real_id

    with pytest.raises(IntegrityError) as caught:
        _pull_through(CountingRegistry(store, "forged manifest"), store, tmp_path / "out")
    assert str(caught.value) == f"manifest {real_id}: content does not match its id"
    assert not (tmp_path / "out").exists()  # refused before a file was written


def test_a_header_that_cannot_be_fetched_fails_the_pull_and_leaves_no_file(minilm_dir: Path, tmp_path: Path) -> None:
    # The shards are already streaming when the second file's header turns out to be missing: the
    # pull must stop with that error, wait for its fetches and leave no file, finished or partial.
    _, store, manifest = _pushed_split(minilm_dir, tmp_path)
    lost = manifest.files[1].header
    (next(p for p in (tmp_path / "store" / "blobs").rglob(lost + "*"))).unlink()

    servicer = DistantRegistry(store, {record.header for record in manifest.files})
    out = tmp_path / "out"
    with BackgroundServer(store, servicer=servicer) as server, pytest.raises(NotFoundError) as caught:
        shardstore.pull(f"grpc://{server.address}/split:v1", out, cache=tmp_path / "cold")
    assert lost in str(caught.value)
    assert servicer.headers_done_at_shards[:1] == [0]  # the shards had started before the header failed
    assert [p.name for p in out.rglob("*") if p.is_file()] == []


def test_a_warm_pull_with_more_pieces_in_flight_than_pool_workers_finishes(tmp_path: Path) -> None:
    # Shards from the local cache come without the pool; with 64 threads a pull keeps 128 pieces in
    # flight, more than the shared pool's 64 workers. Were pieces to wait in pool workers for their
    # file's header (which needs a worker too), this pull would hang: a child process, with a timeout.
    model = tmp_path / "model"
    model.mkdir()
    weight_map: dict[str, str] = {}
    generator = torch.Generator().manual_seed(0)
    for index, count in enumerate([1, 1, 1, 1, 1, 200]):
        name = f"model-{index + 1:05d}-of-00006.safetensors"
        tensors = {f"f{index}.t{i}": torch.randn(16, 1024, generator=generator) for i in range(count)}
        save_file(tensors, str(model / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    store = LocalStore(tmp_path / "store")
    pushed = shardstore.push(model, "many:v1", store=str(store.root), chunk_bytes=64 << 10)
    assert pushed.shards_total > 200

    with BackgroundServer(store, servicer=DistantRegistry(store, set())) as server:
        url = f"grpc://{server.address}/many:v1"
        shardstore.pull(url, tmp_path / "warm", cache=tmp_path / "cache")
        command = [sys.executable, "-m", "shardstore", "pull", url, str(tmp_path / "out"), "--threads", "64",
                   "--cache", str(tmp_path / "cache"), "--json"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["shards_cached"] == pushed.shards_total and report["shards_fetched"] == 0
    for path in model.iterdir():
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name


def test_the_manifest_that_came_with_the_ref_is_used_once(tmp_path: Path) -> None:
    store, _ = push_small_model(tmp_path)
    servicer = CountingRegistry(store)
    with BackgroundServer(store, servicer=servicer) as server, GrpcClient(server.address) as client:
        manifest_id = client.resolve(parse_ref("small:v1"))
        first = client.get_manifest(manifest_id)
        assert servicer.calls["GetManifest"] == 0
        # Not held on to: a second read asks the server, as it did before the ref brought the manifest.
        assert client.get_manifest(manifest_id) == first
        assert servicer.calls["GetManifest"] == 1
        assert client.resolve(parse_ref("small:v1"), with_manifest=False) == manifest_id
    assert servicer.asked_with_manifest == [True, False]


class SignerFails(LocalStore):
    """A store whose URL signer raises (an object store without credentials yet)."""

    def signed_url(self, key: str, expires_s: int) -> str | None:
        raise RuntimeError("no credentials")


def test_a_store_whose_signer_fails_still_answers_refs_and_serves_pulls(tmp_path: Path) -> None:
    _, model = push_small_model(tmp_path)
    store = SignerFails(tmp_path / "store")
    servicer = CountingRegistry(store)
    with BackgroundServer(store, servicer=servicer) as server:
        with grpc.insecure_channel(server.address) as channel:
            answer = pb_grpc.RegistryStub(channel).ResolveRef(pb.ResolveRefRequest(name="small", tag="v1"), timeout=10)
        assert answer.manifest_id and not answer.HasField("signs_urls")  # unknown, so left unset
        shardstore.pull(f"grpc://{server.address}/small:v1", tmp_path / "out", cache=tmp_path / "cold")
    _same_files(model, tmp_path / "out")
    assert servicer.calls["SignObjectUrls"] == 1  # the client asked itself, as with a server from before
