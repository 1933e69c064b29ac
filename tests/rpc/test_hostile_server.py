"""A hostile server against the client: endless and oversized streams.

The server is a real gRPC server whose servicer is written here by hand and misbehaves on
purpose (a fake is the only way to get a server that lies). It serves a real pushed model's
ref, manifest, shards and blobs, except for the one object it attacks: for that one it
declares a huge size, or declares the true size and keeps sending. It gives up after
``FLOOD`` bytes, so a client without bounds ends up holding them all (and the test fails on
its memory) rather than hanging. The client is a real ``shardstore pull`` in a child
process, whose memory is measured by the child itself (VmHWM against its VmRSS before).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import shardstore
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model
from shardstore.errors import IntegrityError
from shardstore.format.digest import digest
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc
from shardstore.rpc.client import GrpcClient
from shardstore.store import LocalStore

FLOOD = 400 << 20  # what the hostile server sends at most: more than the client may hold
PIECE = 1 << 20
RSS_BOUND_MIB = 256


class HostileRegistry(pb_grpc.RegistryServicer):
    """Serves ``repo`` honestly, except the object ``target``, which it floods in the way ``attack`` says."""

    def __init__(self, repo: Repository, target: str, attack: str) -> None:
        self.repo, self.target, self.attack = repo, target, attack

    def ResolveRef(self, request: pb.ResolveRefRequest, context: Any) -> pb.ResolveRefResponse:
        return pb.ResolveRefResponse(manifest_id=self.repo.resolve(parse_ref(f"{request.name}:{request.tag}")))

    def GetManifest(self, request: pb.GetManifestRequest, context: Any) -> pb.GetManifestResponse:
        return pb.GetManifestResponse(manifest=self.repo.store.get(f"manifests/{request.manifest_id}.json"))

    def _honest(self, object_id: str, data: bytes) -> Iterator[pb.ObjectChunk]:
        for start in range(0, max(len(data), 1), PIECE):
            yield pb.ObjectChunk(id=object_id, offset=start, total_size=len(data), data=data[start:start + PIECE])

    def _flood(self, object_id: str, true_size: int) -> Iterator[pb.ObjectChunk]:
        if self.attack == "resize":  # declares one size, then a larger one half way through
            yield pb.ObjectChunk(id=object_id, offset=0, total_size=true_size, data=b"\xab" * (true_size // 2))
            yield pb.ObjectChunk(id=object_id, offset=true_size // 2, total_size=2 * true_size,
                                 data=b"\xab" * true_size)
            return
        declared = 1 << 40 if self.attack == "endless" else true_size
        filler = b"\xab" * PIECE
        for offset in range(0, FLOOD, PIECE):
            yield pb.ObjectChunk(id=object_id, offset=offset, total_size=declared, data=filler)

    def StreamShards(self, request: pb.StreamShardsRequest, context: Any) -> Iterator[pb.ObjectChunk]:
        for shard_id in request.shard_ids:
            data = bytes(self.repo.get_shard_bytes(shard_id))
            yield from (self._flood(shard_id, len(data)) if shard_id == self.target else self._honest(shard_id, data))

    def SignObjectUrls(self, request: pb.SignObjectUrlsRequest, context: Any) -> pb.SignObjectUrlsResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "no signed URLs here")  # the client falls back to streams
        raise AssertionError("unreachable")

    def GetBlob(self, request: pb.GetBlobRequest, context: Any) -> Iterator[pb.ObjectChunk]:
        data = self.repo.get_blob(request.blob_id)
        yield from (self._flood(request.blob_id, len(data)) if request.blob_id == self.target
                    else self._honest(request.blob_id, data))


_CHILD = """
import json, sys
from pathlib import Path
import shardstore.cli, shardstore.rpc.client, shardstore.repo.pull, shardstore.load.view  # imports before the baseline

def kib(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])

before = kib("VmRSS")
code = shardstore.cli.main(["pull", sys.argv[1], sys.argv[2], "--cache", sys.argv[3], "--quiet"])
print(json.dumps({"code": code, "growth_mib": (kib("VmHWM") - before) / 1024}))
"""


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repository, Path]:
    root = tmp_path_factory.mktemp("hostile-server")
    model = write_small_model(root / "m")
    store = LocalStore(root / "store")
    shardstore.push(model, "m:v1", store=store, chunk_bytes=SMALL_CHUNK)
    return Repository(store), model


@pytest.mark.parametrize(("kind", "attack"), [("shard", "endless"), ("shard", "oversized"), ("blob", "endless")])
def test_an_endless_or_oversized_stream_fails_in_one_line_within_bounded_memory(
    pushed: tuple[Repository, Path], tmp_path: Path, kind: str, attack: str
) -> None:
    repo, model = pushed
    manifest = repo.get_manifest(repo.resolve(parse_ref("m:v1")))
    target = (next(iter(manifest.shards)) if kind == "shard"
              else digest((model / "config.json").read_bytes()))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_RegistryServicer_to_server(HostileRegistry(repo, target, attack), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        child = subprocess.run([sys.executable, "-c", _CHILD, f"grpc://127.0.0.1:{port}/m:v1", str(tmp_path / "out"),
                                str(tmp_path / "cache")],
                               capture_output=True, text=True, timeout=300)
    finally:
        server.stop(grace=None)
    outcome = json.loads(child.stdout.strip().splitlines()[-1])
    error_lines = child.stderr.strip().splitlines()
    assert outcome["growth_mib"] < RSS_BOUND_MIB, outcome
    assert outcome["code"] == 1 and len(error_lines) == 1, child.stderr
    assert f"{kind} {target}" in error_lines[0] and "refused" in error_lines[0], error_lines[0]


def test_a_shard_whose_declared_size_changes_mid_stream_is_refused_naming_it(
        pushed: tuple[Repository, Path]) -> None:
    # Without a manifest only the declared size bounds a shard (and sizes the buffer it lands in):
    # a server that raises it half way is refused, never written past the buffer's end.
    repo, _model = pushed
    target = next(iter(repo.get_manifest(repo.resolve(parse_ref("m:v1"))).shards))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_RegistryServicer_to_server(HostileRegistry(repo, target, "resize"), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GrpcClient(f"127.0.0.1:{port}", use_cache=False) as client, \
                pytest.raises(IntegrityError, match=f"shard {target}: server changed its size"):
            list(client.fetch_shards([target]))
    finally:
        server.stop(grace=None)


class _EndlessMirror:
    """An HTTP mirror that answers every object GET with an endless body (no Content-Length), counting what it sent."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        mirror = self
        self.sent = 0
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection does: here, never

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                mirror.requests += 1
                self.send_response(200)
                self.end_headers()
                filler = b"\xab" * PIECE
                try:
                    while mirror.sent < FLOOD:
                        self.wfile.write(filler)
                        mirror.sent += len(filler)
                except OSError:
                    return  # the client hung up: what a bounded client does

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_endless_mirror_body_is_cut_off_and_the_server_serves_instead(pushed: tuple[Repository, Path],
                                                                        tmp_path: Path) -> None:
    from shardstore.rpc.background import BackgroundServer

    repo, model = pushed
    mirror = _EndlessMirror()
    try:
        with BackgroundServer(repo.store) as server:
            shardstore.pull(f"grpc://{server.address}/m:v1", tmp_path / "out", cache=tmp_path / "cache",
                            mirror=mirror.url)
    finally:
        mirror.close()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    # Each refused body was read only to just past its object's size: the client holds at most that plus one
    # piece; what the mirror got out besides sits in the kernel's socket buffers (a few MiB per request).
    assert mirror.requests > 0 and mirror.sent / mirror.requests < 16 << 20, (mirror.sent, mirror.requests)
