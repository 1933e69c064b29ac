"""Push reads regular files only: a FIFO or a broken link is one line, never a hang; symlinks to files are followed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model

import shardstore
from shardstore.errors import InvalidInputError
from shardstore.store import LocalStore


def _cli_push(src: Path, store: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardstore", "push", str(src), "m:v1", "--store", str(store)],
                          capture_output=True, text=True, timeout=60)  # a hang would be the timeout


def test_a_fifo_named_safetensors_is_refused_in_one_line(tmp_path: Path) -> None:
    model = write_small_model(tmp_path / "m")
    os.mkfifo(model / "extra.safetensors")
    result = _cli_push(model, tmp_path / "store")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "extra.safetensors: not a regular file" in lines[0], result.stderr
    fifo = tmp_path / "alone.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError, match="not a regular file or a folder"):
        shardstore.push(fifo, "m:v1", store=LocalStore(tmp_path / "store"))


def test_a_broken_link_is_refused(tmp_path: Path) -> None:
    model = write_small_model(tmp_path / "m")
    (model / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(InvalidInputError, match=r"tokenizer\.json: not a regular file"):
        shardstore.push(model, "m:v1", store=LocalStore(tmp_path / "store"))


def test_symlinks_to_files_are_followed_like_a_hugging_face_cache_folder(tmp_path: Path) -> None:
    real = write_small_model(tmp_path / "blobs")
    snapshot = tmp_path / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (snapshot / name).symlink_to(real / name)
    store = LocalStore(tmp_path / "store")
    shardstore.push(snapshot, "m:v1", store=store, chunk_bytes=SMALL_CHUNK)
    shardstore.pull("m:v1", tmp_path / "out", store=store)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (real / name).read_bytes()
        assert not (tmp_path / "out" / name).is_symlink()


# A push whose input another program rewrites meanwhile (torch.save and save_file truncate a checkpoint in
# place). The callback stands in for that program: it runs on push's own thread between two reads, so the
# rewrite lands at a known point. The push runs in a child: without the SIGBUS guard the child dies of it.
_TRUNCATING_PUSH = """
import os, sys
import shardstore
from shardstore.errors import ShardstoreError

path, store = sys.argv[1], sys.argv[2]

def rewrite_under_the_push(task, advance, total):
    if os.path.getsize(path) > 4096:
        os.truncate(path, 4096)

try:
    shardstore.push(path, "m:v1", store=store, progress=rewrite_under_the_push, chunk_bytes=65536, threads=1)
except ShardstoreError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
"""


def _stored_refs(store: Path) -> list[str]:
    return sorted(str(path.relative_to(store / "refs")) for path in (store / "refs").rglob("*") if path.is_file())


def test_a_file_truncated_under_a_push_is_one_line_and_records_nothing(tmp_path: Path) -> None:
    model = write_small_model(tmp_path / "m") / "model.safetensors"
    size = model.stat().st_size
    store = tmp_path / "store"
    result = subprocess.run([sys.executable, "-c", _TRUNCATING_PUSH, str(model), str(store)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, (result.returncode, result.stderr)  # -7 would be the SIGBUS itself
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{model}: changed while it was being read (it shrank"), lines
    assert "nothing was recorded" in lines[0]
    assert model.stat().st_size == 4096 < size  # the rewrite happened
    assert not (store / "refs").exists() or _stored_refs(store) == []
    assert not (store / "manifests").exists() or not any((store / "manifests").rglob("*.json"))
    verified = subprocess.run([sys.executable, "-m", "shardstore", "verify", "--store", str(store), "--json"],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and json.loads(verified.stdout)["healthy"] is True, verified.stderr


def test_a_file_rewritten_in_place_under_a_push_is_refused(tmp_path: Path) -> None:
    model = write_small_model(tmp_path / "m") / "model.safetensors"
    store = LocalStore(tmp_path / "store")
    size = model.stat().st_size

    def rewrite_under_the_push(task: str, advance: int, total: int) -> None:
        if advance == 0:  # same size, other bytes: nothing faults, but what was read is not the file now
            with model.open("r+b") as handle:
                os.pwrite(handle.fileno(), b"\x01" * 64, size - 64)

    with pytest.raises(InvalidInputError, match=f"{model}: changed while it was being read .its size or times"):
        shardstore.push(model, "m:v1", store=store, progress=rewrite_under_the_push, chunk_bytes=SMALL_CHUNK)
    assert not (store.root / "refs").exists() or _stored_refs(store.root) == []
    assert model.stat().st_size == size


def test_a_push_that_fails_while_mapping_leaves_no_range_guarded(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from shardstore.repo import _mapguard  # type: ignore[attr-defined]
    from shardstore.repo.model_files import MappedFiles, scan_model

    folder = tmp_path / "m"
    folder.mkdir()
    for index in range(2):
        save_file({f"w{index}": np.arange(4096, dtype=np.float32)}, str(folder / f"part-{index}.safetensors"))
    model = scan_model(folder)
    (folder / "part-1.safetensors").unlink()  # gone between the scan and the mapping (a cache cleanup, say)
    with pytest.raises(FileNotFoundError):
        MappedFiles(model).__enter__()
    # part-0 was mapped and guarded before part-1 failed. Its guard must be gone with its map: a guard left
    # behind would turn a later fault at that address, in any mapping, into silent zeros. Guards take the
    # lowest free slot, and nothing else in this process holds one now.
    slot = _mapguard.watch(b"any buffer")
    _mapguard.unwatch(slot)
    assert slot == 0
