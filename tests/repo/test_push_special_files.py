"""Push reads regular files only: a FIFO or a broken link is one line, never a hang; symlinks to files are followed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
