"""Manifest file paths are checked on parse, so on PutManifest and on every read: no collisions, no NUL, no escapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model

import shardstore
from shardstore.errors import FormatError
from shardstore.format.digest import digest
from shardstore.format.manifest import parse_manifest
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository, manifest_key
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, dict[str, Any]]:
    root = tmp_path_factory.mktemp("paths")
    store = LocalStore(root / "store")
    shardstore.push(write_small_model(root / "m"), "m:v1", store=store, chunk_bytes=SMALL_CHUNK)
    manifest_id = Repository(store).resolve(parse_ref("m:v1"))
    return store, json.loads(store.get(manifest_key(manifest_id)))


def _with_file_path(doc: dict[str, Any], path: str) -> bytes:
    changed = json.loads(json.dumps(doc))
    changed["files"][0]["path"] = path
    return json.dumps(changed).encode()


BAD_PATHS = {
    "collides with a blob": "config.json",
    "NUL byte": "model\x00.safetensors",
    "newline": "model\n.safetensors",
    "absolute": "/etc/model.safetensors",
    "escapes": "../model.safetensors",
    "dot part": "a/./model.safetensors",
    "empty part": "a//model.safetensors",
    "backslash": "a\\model.safetensors",
    "empty": "",
    "inside a file": "config.json/model.safetensors",
}


@pytest.mark.parametrize("path", BAD_PATHS.values(), ids=BAD_PATHS.keys())
def test_a_bad_file_path_is_one_format_error(pushed: tuple[LocalStore, dict[str, Any]], path: str) -> None:
    _store, doc = pushed
    data = _with_file_path(doc, path)
    with pytest.raises(FormatError, match="file path") as refused:
        parse_manifest(data, digest(data))
    assert "\n" not in str(refused.value)


def test_the_original_paths_parse(pushed: tuple[LocalStore, dict[str, Any]]) -> None:
    _store, doc = pushed
    data = _with_file_path(doc, "weights/model.safetensors")  # a sub-folder is fine
    assert parse_manifest(data, digest(data)).files[0].path == "weights/model.safetensors"


def test_put_manifest_refuses_a_colliding_path_and_pull_of_a_planted_one_fails_in_one_line(
    pushed: tuple[LocalStore, dict[str, Any]], tmp_path: Path
) -> None:
    store, doc = pushed
    data = _with_file_path(doc, "config.json")
    with BackgroundServer(store) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RegistryStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.PutManifest(pb.PutManifestRequest(manifest=data), timeout=30)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "listed twice" in (refused.value.details() or "")
    assert not store.exists(manifest_key(digest(data)))
    # Planted straight into the store (a writer that bypassed the server): reading it is the error.
    store.put(manifest_key(digest(data)), data)
    Repository(store).set_ref(parse_ref("planted:v1"), digest(data))
    with pytest.raises(FormatError, match="listed twice"):
        shardstore.pull("planted:v1", tmp_path / "out", store=store)
    assert not (tmp_path / "out" / "config.json").exists()
