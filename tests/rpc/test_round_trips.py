"""A pull over a link with a round trip: small objects (headers, config, tokenizer) are fetched several at once.

The server is the real one on 127.0.0.1, made slow the way a distant link is: every GetBlob call
waits before it answers. Sequential fetches would never overlap; the pull must keep several of
them in flight, and still write every file byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

import shardstore
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.server import RegistryServicer
from shardstore.store import LocalStore

ROUND_TRIP_S = 0.15
FILES = 3


class DistantRegistry(RegistryServicer):
    """The real servicer, each GetBlob answered a round trip late; it counts the calls open at once by kind."""

    def __init__(self, store: LocalStore, header_ids: set[str]) -> None:
        super().__init__(store)
        self.header_ids = header_ids
        self.open = {"header": 0, "blob": 0}
        self.peak = {"header": 0, "blob": 0}
        self.calls = {"header": 0, "blob": 0}

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


def test_pull_keeps_several_small_objects_in_flight(minilm_dir: Path, tmp_path: Path) -> None:
    folder = _split_folder(minilm_dir, tmp_path / "split")
    store = LocalStore(tmp_path / "store")
    shardstore.push(folder, "split:v1", store=str(tmp_path / "store"))
    repo = Repository(store)
    manifest = repo.get_manifest(repo.resolve(parse_ref("split:v1")))
    headers = {record.header for record in manifest.files}
    others = [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]
    assert len(headers) == FILES and len(others) == 13  # the shipped folder's 12 other files and the index

    servicer = DistantRegistry(store, headers)
    with BackgroundServer(store, servicer=servicer) as server:
        shardstore.pull(f"grpc://{server.address}/split:v1", tmp_path / "out")

    for path in folder.rglob("*"):
        if path.is_file():
            rel = path.relative_to(folder)
            assert (tmp_path / "out" / rel).read_bytes() == path.read_bytes(), rel
    assert servicer.calls == {"header": FILES, "blob": len(others)}
    # Every header at once, and several of the 13 small files (they are all under 8 MiB); one at a time,
    # the peaks would be 1.
    assert servicer.peak["header"] == FILES
    assert servicer.peak["blob"] >= 4
