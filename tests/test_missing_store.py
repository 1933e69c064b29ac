"""A store or bucket that does not exist is an error for every command that reads one, never "healthy" or "empty"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = {
    "verify": ["verify"],
    "verify --read-data": ["verify", "--read-data"],
    "ls": ["ls"],
    "gc": ["gc"],
    "gc --dry-run": ["gc", "--dry-run"],
    "pull": ["pull", "m:v1", "{tmp}/out"],
    "inspect": ["inspect", "m:v1"],
    "diff": ["diff", "m:v1", "m:v2"],
    "tag": ["tag", "m:v1", "m:v2"],
    "rm": ["rm", "m:v1"],
    "snapshot": ["snapshot", "m:v1"],
}


def _run(argv: list[str], store: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    return subprocess.run([sys.executable, "-m", "shardstore", *args, "--store", store, *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_missing_local_store_is_one_line_and_exit_1(tmp_path: Path, argv: list[str]) -> None:
    missing = tmp_path / "no-such-store"
    result = _run(argv, str(missing), tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"store file://{missing} does not exist" in lines[0], result.stderr
    assert not missing.exists()  # and nothing was created on the way


@pytest.mark.parametrize("command", ["verify", "ls", "gc"])
def test_a_missing_bucket_is_one_line_and_exit_1_with_json_too(s3_endpoint: str, tmp_path: Path,
                                                               command: str) -> None:
    result = _run([command], "s3://no-such-bucket-shardstore/models", tmp_path, "--json")
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert "does not exist" in result.stderr and "no-such-bucket-shardstore" in result.stderr, result.stderr


def test_serve_refuses_a_missing_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "shardstore", "serve", "--store", "s3://no-such-bucket-shardstore",
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "does not exist (create the bucket first)" in result.stderr, result.stderr


def test_an_existing_empty_store_is_still_empty_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _run(["ls"], str(tmp_path / "empty"), tmp_path)
    assert result.returncode == 0, result.stderr
