"""A full disk during pull names the file it could not write, in one line, and leaves no partial file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from rpc.grpc_helpers import push_small_model

from shardstore.cli import main


def test_a_full_disk_during_pull_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    store, _model = push_small_model(tmp_path)
    real_pwrite = os.pwrite

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        # A fake for the one fault a test cannot make on a real disk: it fills up after the header.
        if offset > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    dest = tmp_path / "out"
    code = main(["pull", "small:v1", str(dest), "--store", str(store.root), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [f"shardstore pull: error: {dest / 'model.safetensors'}: No space left on device"]
    assert not [p for p in dest.rglob("*") if p.is_file()]  # neither the file nor its .partial
