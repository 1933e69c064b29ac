"""The CLI as a user runs it: real processes, one JSON object with --json, one-line errors, store untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tree_snapshot


def run(*args: str | Path, store: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHARDSTORE_STORE": str(store)}
    result = subprocess.run([sys.executable, "-m", "shardstore", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def pushed_store(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> tuple[Path, dict[str, object]]:
    store = tmp_path_factory.mktemp("cli") / "store"
    result = run("push", minilm_dir, "minilm:v1", "--json", store=store)
    return store, json.loads(result.stdout)


def test_push_json_figures(pushed_store: tuple[Path, dict[str, object]]) -> None:
    _store, figures = pushed_store
    for key in ("raw_bytes", "stored_bytes", "uploaded_bytes", "shards_total", "shards_uploaded", "seconds"):
        assert isinstance(figures[key], int | float), key
    assert figures["raw_bytes"] == 90856960
    assert 0 < figures["stored_bytes"] < figures["raw_bytes"]  # type: ignore[operator]


def test_pull_inspect_ls_json(pushed_store: tuple[Path, dict[str, object]], tmp_path: Path) -> None:
    store, pushed = pushed_store
    pulled = json.loads(run("pull", "minilm:v1", tmp_path / "out", "--json", store=store).stdout)
    for key in ("raw_bytes", "transferred_bytes", "shards_fetched", "seconds"):
        assert key in pulled
    assert pulled["raw_bytes"] == pushed["raw_bytes"]
    assert pulled["shards_fetched"] == pushed["shards_total"]
    inspected = json.loads(run("inspect", "minilm:v1", "--json", store=store).stdout)
    assert inspected["raw_bytes"] == pushed["raw_bytes"] and inspected["stored_bytes"] == pushed["stored_bytes"]
    word = inspected["tensors"]["embeddings.word_embeddings.weight"]
    assert word["dtype"] == "F32" and word["shape"] == [30522, 384] and word["raw_bytes"] == 30522 * 384 * 4
    assert 0 < word["stored_bytes"] < word["raw_bytes"]
    listed = json.loads(run("ls", "--json", store=store).stdout)
    assert [m["ref"] for m in listed["models"]] == ["minilm:v1"]


def test_human_output_and_progress(pushed_store: tuple[Path, dict[str, object]], tmp_path: Path) -> None:
    store, _ = pushed_store
    result = run("pull", "minilm:v1", tmp_path / "out", store=store)
    assert "pulled minilm:v1" in result.stdout
    assert "pull minilm:v1" in result.stderr  # the progress bar
    quiet = run("pull", "minilm:v1", tmp_path / "out2", "--quiet", store=store)
    assert quiet.stdout == "" and quiet.stderr == ""
    table = run("inspect", "minilm:v1", store=store).stdout
    assert "embeddings.word_embeddings.weight" in table and "ratio" in table


def _bad_inputs(tmp: Path, minilm_dir: Path) -> list[tuple[list[str | Path], str]]:
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes((minilm_dir / "model.safetensors").read_bytes()[:1_000_000])
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    pickle = tmp / "pickled"
    pickle.mkdir()
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04")
    return [
        (["push", truncated, "m:v1"], "truncated.safetensors: truncated"),
        (["push", garbage, "m:v1"], "garbage.safetensors: header: not valid JSON"),
        (["push", tmp / "missing.safetensors", "m:v1"], "missing.safetensors: no such file"),
        (["push", minilm_dir, "m:v1", "--codec", "gzip9"], "unknown codec 'gzip9'"),
        (["push", minilm_dir, "Bad Name:v1"], "bad ref 'Bad Name:v1'"),
        (["push", pickle, "m:v1"], "refusing a pickle checkpoint"),
        (["pull", "nothere:v1", tmp / "out"], "nothere:v1: no such model"),
        (["inspect", "minilm:nope"], "minilm:nope: no such model"),
        (["pull", "minilm:v1", tmp / "out", "--only", "zzz*"], "no tensor matches zzz*"),
    ]


def test_bad_input_gives_one_line_and_leaves_store_as_it_was(
    pushed_store: tuple[Path, dict[str, object]], tmp_path: Path, minilm_dir: Path
) -> None:
    store, _ = pushed_store
    before = tree_snapshot(store)
    for args, message in _bad_inputs(tmp_path, minilm_dir):
        result = run(*args, "--json", store=store, check=False)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert tree_snapshot(store) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_usage_error_exits_2(tmp_path: Path) -> None:
    result = run("push", store=tmp_path, check=False)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_verify_finds_a_flipped_byte(pushed_store: tuple[Path, dict[str, object]], tmp_path: Path) -> None:
    import shutil

    store, _ = pushed_store
    healthy = json.loads(run("verify", "--read-data", "--json", store=store).stdout)
    assert healthy["healthy"] is True and healthy["shards"] > 0 and healthy["problems"] == []
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    shard = sorted((broken / "shards").rglob("*"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    quick = run("verify", "--json", store=broken, check=False)  # sizes still match: structure is fine
    assert quick.returncode == 0
    result = run("verify", "--read-data", "--json", store=broken, check=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["healthy"] is False
    assert report["problems"] == [f"shards/{shard.name[:2]}/{shard.name}: shard {shard.name}: content does not "
                                  "match its id (corrupt or truncated)"]


def test_storage_options_reach_the_s3_backend(minilm_dir: Path, s3_endpoint: str, s3_bucket: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    base = [sys.executable, "-m", "shardstore"]
    url = f"s3://{s3_bucket}/cli"
    pushed = subprocess.run([*base, "push", str(minilm_dir), "minilm:v1", "--store", url, "-o",
                             f"endpoint_url={s3_endpoint}", "--json"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert pushed.returncode == 0, pushed.stderr
    listed = subprocess.run([*base, "ls", "--store", url, "--storage-option", f"endpoint_url={s3_endpoint}",
                             "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert [m["ref"] for m in json.loads(listed.stdout)["models"]] == ["minilm:v1"]
