"""The store's ``config`` object: written by the first push, checked by every reader and writer.

The rules under test (``docs/formats.md``): an unknown ``version`` or read feature refuses reads
and writes, an unknown write feature refuses only writes, unknown other keys are ignored, and a
store made before ``config`` existed reads as version 1 and gets its config on its next push.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import tree_snapshot
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model

import shardstore
from shardstore.errors import FormatError, UnsupportedFormatError
from shardstore.repo.gc import collect
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.repo.verify import verify
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore, Store, open_store
from shardstore.store.fsspec_store import FsspecStore


def _config(store: Store) -> dict[str, object]:
    return dict(json.loads(store.get("config")))


def _write_config(store: Store, **changes: object) -> None:
    doc = {"format": "shardstore.store", "version": 1, "hash": "blake3",
           "features": {"read": [], "write": ["leases"]}, **changes}
    store.put("config", json.dumps(doc).encode())


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_model(tmp_path_factory.mktemp("model") / "small")


@pytest.fixture(params=["local", "fsspec-file", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every kind of backend a Repository reads and writes: the check is the same on each."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        store: Store = open_store(f"s3://{bucket}/prefix", endpoint_url=request.getfixturevalue("s3_endpoint"))
    elif request.param == "fsspec-file":
        store = FsspecStore(f"file://{tmp_path / 'fsspec'}")
    else:
        store = LocalStore(tmp_path / "local")
    yield store
    store.close()


def test_first_push_writes_the_config(any_store: Store, model: Path) -> None:
    assert not any_store.exists("config")
    shardstore.push(model, "small:v1", store=any_store, chunk_bytes=SMALL_CHUNK)
    assert _config(any_store) == {"format": "shardstore.store", "version": 1, "hash": "blake3",
                                  "features": {"read": ["tag-keys"], "write": ["leases"]}}


def test_unknown_version_refuses_every_reader_and_writer(any_store: Store, model: Path, tmp_path: Path) -> None:
    shardstore.push(model, "small:v1", store=any_store, chunk_bytes=SMALL_CHUNK)
    _write_config(any_store, version=2, features="anything a version 2 may put here")
    before = sorted(any_store.list())
    attempts = {
        "pull": lambda: shardstore.pull("small:v1", tmp_path / "out", store=any_store),
        "open": lambda: shardstore.open("small:v1", store=any_store),
        "push": lambda: shardstore.push(model, "small:v2", store=any_store, chunk_bytes=SMALL_CHUNK),
        "gc": lambda: collect(Repository(any_store), grace=0),
        "verify": lambda: verify(Repository(any_store)),
        "ls": lambda: Repository(any_store).list_refs(),
        "rm": lambda: Repository(any_store).delete_ref(parse_ref("small:v1")),
        "tag": lambda: Repository(any_store).tag(parse_ref("small:v1"), parse_ref("small:v9")),
    }
    for name, attempt in attempts.items():
        with pytest.raises(UnsupportedFormatError) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message and "version 2" in message and any_store.url in message, (name, message)
    assert sorted(any_store.list()) == before  # not even a lease was written
    assert not (tmp_path / "out").exists()


def test_store_made_before_config_still_reads_and_gets_one_on_next_push(any_store: Store, model: Path,
                                                                        tmp_path: Path) -> None:
    shardstore.push(model, "small:v1", store=any_store, chunk_bytes=SMALL_CHUNK)
    any_store.delete("config")  # what a store written before config existed holds: everything else
    shardstore.pull("small:v1", tmp_path / "out", store=any_store)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    report = verify(Repository(any_store), read_data=True)
    assert report.healthy and (report.store_version, report.has_config) == (1, False)
    assert not any_store.exists("config")  # readers never write
    shardstore.push(model, "small:v2", store=any_store, chunk_bytes=SMALL_CHUNK)
    assert _config(any_store)["version"] == 1
    assert verify(Repository(any_store)).has_config


def test_unknown_write_feature_reads_but_refuses_writes(local_store: LocalStore, model: Path, tmp_path: Path) -> None:
    shardstore.push(model, "small:v1", store=local_store, chunk_bytes=SMALL_CHUNK)
    _write_config(local_store, features={"read": [], "write": ["leases", "future-index"]})
    shardstore.pull("small:v1", tmp_path / "out", store=local_store)
    assert (tmp_path / "out" / "config.json").read_bytes() == (model / "config.json").read_bytes()
    before = tree_snapshot(local_store.root)
    for attempt in (lambda: shardstore.push(model, "small:v2", store=local_store),
                    lambda: collect(Repository(local_store), grace=0),
                    lambda: verify(Repository(local_store), repair=True)):
        with pytest.raises(UnsupportedFormatError, match=r"future-index.*cannot write"):
            attempt()
    assert tree_snapshot(local_store.root) == before


def test_unknown_read_feature_refuses_reads(local_store: LocalStore, model: Path, tmp_path: Path) -> None:
    shardstore.push(model, "small:v1", store=local_store, chunk_bytes=SMALL_CHUNK)
    _write_config(local_store, features={"read": ["zfp-streams"], "write": ["leases"]})
    with pytest.raises(UnsupportedFormatError, match=r"zfp-streams.*cannot read"):
        shardstore.pull("small:v1", tmp_path / "out", store=local_store)


def test_unknown_informational_keys_are_ignored(local_store: LocalStore, model: Path, tmp_path: Path) -> None:
    shardstore.push(model, "small:v1", store=local_store, chunk_bytes=SMALL_CHUNK)
    _write_config(local_store, created_by="shardstore 9.0", features={"read": [], "write": ["leases"], "info": ["x"]})
    shardstore.pull("small:v1", tmp_path / "out", store=local_store)
    shardstore.push(model, "small:v2", store=local_store, chunk_bytes=SMALL_CHUNK)
    assert _config(local_store)["created_by"] == "shardstore 9.0"  # a config is never rewritten


@pytest.mark.parametrize("garbage", [b"not json", b'{"format": "shardstore.store"}', b"[1]",
                                     b'{"format": "shardstore.store", "version": 1, "features": {"read": "x"}}'])
def test_garbled_config_is_a_format_error(local_store: LocalStore, garbage: bytes) -> None:
    local_store.put("config", garbage)
    with pytest.raises(FormatError, match="config"):
        Repository(local_store).list_refs()


def test_grpc_server_checks_its_store(local_store: LocalStore, model: Path, tmp_path: Path) -> None:
    shardstore.push(model, "small:v1", store=local_store, chunk_bytes=SMALL_CHUNK)
    _write_config(local_store, features={"read": [], "write": ["leases", "future-index"]})
    with BackgroundServer(local_store) as server:  # it may serve reads ...
        shardstore.pull(f"grpc://{server.address}/small:v1", tmp_path / "out")
        assert (tmp_path / "out" / "model.safetensors").exists()
        with pytest.raises(UnsupportedFormatError, match="future-index"):  # ... but takes no writes
            shardstore.push(model, f"grpc://{server.address}/small:v2", chunk_bytes=SMALL_CHUNK)
    _write_config(local_store, version=7)
    server = BackgroundServer(local_store)
    try:
        with pytest.raises(UnsupportedFormatError, match="version 7"):
            server.start()
    finally:
        server.stop()


def _cli(*args: str | Path, store: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHARDSTORE_STORE": str(store)}
    return subprocess.run([sys.executable, "-m", "shardstore", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_verify_says_a_store_has_no_config_yet(local_store: LocalStore, model: Path) -> None:
    shardstore.push(model, "small:v1", store=local_store, chunk_bytes=SMALL_CHUNK)
    local_store.delete("config")
    figures = json.loads(_cli("verify", "--json", store=local_store.root).stdout)
    assert (figures["store_version"], figures["has_config"], figures["healthy"]) == (1, False, True)
    human = _cli("verify", store=local_store.root)
    assert human.returncode == 0 and "made before the store config existed" in human.stdout


def test_cli_refuses_an_unknown_version_in_one_line(local_store: LocalStore, model: Path, tmp_path: Path) -> None:
    shardstore.push(model, "small:v1", store=local_store, chunk_bytes=SMALL_CHUNK)
    _write_config(local_store, version=2)
    for command in (["pull", "small:v1", tmp_path / "out"], ["ls"], ["push", model, "small:v2"], ["gc"], ["verify"],
                    ["serve", "--port", "0"]):
        result = _cli(*command, store=local_store.root)
        assert result.returncode == 1, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, (command, result.stderr)
        assert f"shardstore {command[0]}: error: store {local_store.url} has format version 2" in lines[0]
