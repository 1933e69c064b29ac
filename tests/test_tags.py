"""``shardstore tag`` and ``rm``: refs only move or go; gc then frees exactly what no other ref reaches.

Expected deletions are computed from the manifests' JSON here, not by shardstore's gc code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tree_snapshot
from rpc.access_helpers import DELETE_TOKEN, READ_TOKEN, TOKENS, WRITE_TOKEN, env_with, one_line_error, serve_process
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model
from safetensors.torch import load_file, save_file


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardstore", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def ok(*args: str | Path, env: dict[str, str] | None = None) -> dict[str, object]:
    result = run(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert isinstance(figures, dict)
    return figures


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Model A, and B: A with one tensor and config.json changed (so B shares most shards and the header)."""
    root = tmp_path_factory.mktemp("tags")
    a = write_small_model(root / "a")
    b = root / "b"
    shutil.copytree(a, b)
    tensors = load_file(str(b / "model.safetensors"))
    tensors["layers.3.weight"] = torch.full_like(tensors["layers.3.weight"], 0.5)
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    (b / "config.json").write_text('{"layers": 4, "tuned": true}\n')
    return a, b


def object_keys(store: Path) -> set[str]:
    return {p.relative_to(store).as_posix() for kind in ("shards", "blobs", "manifests")
            for p in (store / kind).rglob("*") if p.is_file() and not p.name.startswith(".")}


def keys_of_manifest(store: Path, manifest_id: str) -> set[str]:
    """Every object key a manifest needs, read from its JSON by hand."""
    doc = json.loads((store / "manifests" / f"{manifest_id}.json").read_bytes())
    blobs = [f["header"] for f in doc["files"]] + [b["id"] for b in doc["blobs"].values()]
    return ({f"manifests/{manifest_id}.json"} | {f"shards/{s[:2]}/{s}" for s in doc["shards"]}
            | {f"blobs/{b[:2]}/{b}" for b in blobs})


def test_rm_then_gc_frees_exactly_the_objects_only_that_model_used(
    two_models: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_models
    store = tmp_path / "store"
    env = {**os.environ, "SHARDSTORE_STORE": str(store)}
    pushed_a = ok("push", a, "a:v1", "--chunk-size", str(SMALL_CHUNK), env=env)
    pushed_b = ok("push", b, "b:v1", "--chunk-size", str(SMALL_CHUNK), env=env)
    keys_a = keys_of_manifest(store, str(pushed_a["manifest_id"]))
    keys_b = keys_of_manifest(store, str(pushed_b["manifest_id"]))
    only_b = keys_b - keys_a
    # The fixture is meant to share: B's own objects are its changed shards, its config and its manifest.
    assert 2 <= len(only_b) < len(keys_b)

    tagged = ok("tag", "b:v1", "b:keep", env=env)
    assert tagged["manifest_id"] == pushed_b["manifest_id"]
    removed = ok("rm", "b:v1", env=env)
    assert removed["removed"] == [{"ref": "b:v1", "manifest_id": pushed_b["manifest_id"]}]
    before = object_keys(store)
    assert ok("gc", "--grace", "0", env=env)["deleted_manifests"] == 0  # b:keep still holds B
    assert object_keys(store) == before

    ok("rm", "b:keep", env=env)
    ok("gc", "--grace", "0", env=env)
    assert before - object_keys(store) == only_b
    listed = ok("ls", env=env)["models"]
    assert [m["ref"] for m in listed] == ["a:v1"]  # type: ignore[index]
    ok("pull", "a:v1", tmp_path / "out", env=env)
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(a)


def test_missing_tag_lists_the_tags_that_exist(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {**os.environ, "SHARDSTORE_STORE": str(store)}
    ok("push", two_models[0], "a:v1", env=env)
    ok("tag", "a:v1", "a:v2", env=env)
    for command in (("pull", "a:v3", tmp_path / "x"), ("inspect", "a:v3"), ("rm", "a:v3"), ("tag", "a:v3", "a:v4")):
        line = one_line_error(run(*command, env=env), command[0])
        assert "a:v3: no such model" in line and line.endswith("tags of 'a': v1, v2"), line
    line = one_line_error(run("inspect", "nobody:v1", env=env), "inspect")
    assert "no tags of 'nobody'" in line


def test_tag_and_rm_over_grpc_need_their_scopes_and_reveal_no_path(
    two_models: tuple[Path, Path], tmp_path: Path
) -> None:
    store = tmp_path / "private-store-folder"
    ok("push", two_models[0], "a:v1", "--store", store)
    with serve_process(store, env=env_with(SHARDSTORE_TOKENS=TOKENS)) as served:
        url = f"grpc://{served.address}"
        writer = env_with(SHARDSTORE_TOKEN=WRITE_TOKEN)
        tagged = ok("tag", f"{url}/a:v1", "a:v2", env=writer)
        assert tagged["ref"] == "a:v2" and tagged["registry"] == served.address
        # A read token cannot tag, a write token cannot remove: one line each, exit 1.
        assert "may not write" in one_line_error(run("tag", f"{url}/a:v1", f"{url}/a:v3", "--token", READ_TOKEN,
                                                     env=env_with()), "tag")
        assert "may not delete" in one_line_error(run("rm", f"{url}/a:v1", env=writer), "rm")
        removed = ok("rm", f"{url}/a:v1", "--token", DELETE_TOKEN, env=env_with())
        assert removed["removed"] == [{"ref": "a:v1", "manifest_id": tagged["manifest_id"]}]
        listed = ok("ls", "--store", url, env=writer)["models"]
        assert [m["ref"] for m in listed] == ["a:v2"]  # type: ignore[index]
        for command in (("inspect", f"{url}/a:v1"), ("pull", f"{url}/a:v1", tmp_path / "x"),
                        ("rm", f"{url}/a:v1")):
            line = one_line_error(run(*command, "--token", DELETE_TOKEN, env=env_with()), command[0])
            assert "a:v1: no such model" in line and "tags of 'a': v2" in line, line
            assert "private-store-folder" not in line and str(tmp_path) not in line, line
    assert (store / "manifests" / f"{tagged['manifest_id']}.json").is_file()  # rm moved no object
