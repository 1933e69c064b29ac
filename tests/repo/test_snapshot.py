"""Snapshots from a store: one folder per manifest, atomic against a failure mid-write, abandoned ones cleared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shardstore
from shardstore.api import snapshot_report
from shardstore.errors import IntegrityError
from shardstore.store import LocalStore


@pytest.fixture
def pushed(minilm_dir: Path, tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    shardstore.push(minilm_dir, "minilm:v1", store=store, chunk_bytes=1 << 20)
    return store


def test_a_moved_tag_gets_its_own_folder_and_the_old_one_stays(pushed: LocalStore, tmp_path: Path) -> None:
    first = shardstore.snapshot("minilm:v1", store=pushed, cache=tmp_path / "cache")
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text('{"model_type": "bert"}')
    save_file({"w": torch.ones(3, 3)}, str(small / "model.safetensors"))
    shardstore.push(small, "minilm:v1", store=pushed)  # the tag now names another manifest
    second = shardstore.snapshot("minilm:v1", store=pushed, cache=tmp_path / "cache")
    assert second != first and first.is_dir()
    assert sorted(p.name for p in second.iterdir()) == ["config.json", "model.safetensors"]


def test_a_failure_mid_write_leaves_no_snapshot(pushed: LocalStore, tmp_path: Path) -> None:
    with shardstore.open("minilm:v1", store=pushed) as view:
        last_shard = list(view.manifest.shards)[-1]
    shard_file = pushed.root / "shards" / last_shard[:2] / last_shard
    shard_file.write_bytes(shard_file.read_bytes()[:-1] + b"\0")  # a corrupt shard, found only when it is read
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match=last_shard):
        shardstore.snapshot("minilm:v1", store=pushed, cache=cache)
    assert list((cache / "snapshots").iterdir()) == []  # no final folder, and the temporary one is gone


def test_a_crashed_writers_folder_is_removed_by_the_next_snapshot(pushed: LocalStore, tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    snapshots = tmp_path / "cache" / "snapshots"
    abandoned = snapshots / f".tmp-{'0' * 64}-{int(dead.stdout)}-deadbeef"
    (abandoned / "1_Pooling").mkdir(parents=True)
    (abandoned / "model.safetensors").write_bytes(b"half")
    report = snapshot_report("minilm:v1", store=pushed, cache=tmp_path / "cache")
    assert not report.reused and report.written_bytes > 90_000_000
    assert sorted(p.name for p in snapshots.iterdir()) == [report.manifest_id]


def test_cli_snapshot_prints_the_folder_and_pull_no_weights(pushed: LocalStore, tmp_path: Path,
                                                            minilm_dir: Path) -> None:
    env_cache = tmp_path / "cli-cache"
    run = [sys.executable, "-m", "shardstore"]
    out = subprocess.run([*run, "snapshot", "minilm:v1", "--store", str(pushed.root), "--cache", str(env_cache)],
                         capture_output=True, text=True, check=True)
    folder = Path(out.stdout.strip())
    assert out.stdout.count("\n") == 1 and (folder / "model.safetensors").is_file()
    assert folder.parent.parent == env_cache
    out = subprocess.run([*run, "snapshot", "minilm:v1", "--store", str(pushed.root), "--cache", str(env_cache),
                          "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["reused"] is True
    out = subprocess.run([*run, "pull", "minilm:v1", str(tmp_path / "files"), "--no-weights", "--store",
                          str(pushed.root), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["tensors"] == 0
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == sorted(
        p.name for p in minilm_dir.iterdir() if not p.name.endswith(".safetensors"))
    bad = subprocess.run([*run, "pull", "minilm:v1", str(tmp_path / "x"), "--no-weights", "--include", "pooler.*",
                          "--store", str(pushed.root)], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "--no-weights" in bad.stderr


def test_two_writers_racing_on_one_model_both_get_the_whole_folder(pushed: LocalStore, tmp_path: Path,
                                                                     minilm_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cache = tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: snapshot_report("minilm:v1", store=pushed, cache=cache), range(2)))
    assert reports[0].path == reports[1].path
    folder = Path(reports[0].path)
    assert sorted(p.name for p in (cache / "snapshots").iterdir()) == [folder.name]  # no temporary folder left
    assert (folder / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()
