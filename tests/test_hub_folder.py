"""A Hub folder as `hf download` leaves it: safetensors beside pickles, extra formats; --include/--exclude; options
anywhere on the line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import cli_json as ok
from helpers import run_cli as run
from helpers import tree_snapshot
from rpc.grpc_helpers import write_small_model
from safetensors import safe_open


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "SHARDSTORE_STORE": str(tmp_path / "store")}


@pytest.fixture
def hub_folder(tmp_path: Path) -> Path:
    """safetensors weights, the same weights as a pickle with its index, and an ONNX export, as on the Hub."""
    folder = write_small_model(tmp_path / "hub")
    torch.save({"head.bias": torch.zeros(128)}, folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": {"head.bias": "pytorch_model.bin"}}\n')
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"onnx bytes")
    (folder / "tokenizer.json").write_text("{}\n")
    return folder


def names_of(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return sorted(handle.keys())


def test_pickles_beside_safetensors_are_skipped_and_said_so(hub_folder: Path, tmp_path: Path,
                                                            env: dict[str, str]) -> None:
    human = run("push", hub_folder, "hub:v1", env=env)
    assert human.returncode == 0, human.stderr
    assert "skipped pytorch_model.bin, pytorch_model.bin.index.json: pickle weights" in human.stdout
    assert "transformers prefers them" in human.stdout
    pushed = ok("push", hub_folder, "hub:v1", env=env)
    assert set(pushed["skipped_files"]) == {"pytorch_model.bin", "pytorch_model.bin.index.json"}  # type: ignore[arg-type]
    ok("pull", "hub:v1", tmp_path / "out", env=env)
    expected = {k: v for k, v in tree_snapshot(hub_folder).items() if not k.startswith("pytorch_model.bin")}
    assert tree_snapshot(tmp_path / "out") == expected


def test_push_include_and_exclude_pick_files_by_path_or_name(hub_folder: Path, tmp_path: Path,
                                                             env: dict[str, str]) -> None:
    ok("push", "--include", "*.safetensors", "--include", "config.json", hub_folder, "hub:slim", env=env)
    ok("pull", "hub:slim", tmp_path / "slim", env=env)
    assert sorted(tree_snapshot(tmp_path / "slim")) == ["config.json", "model.safetensors"]
    pushed = ok("push", hub_folder, "hub:no-onnx", "--exclude", "onnx/*", "--exclude", "tokenizer.json", env=env)
    assert pushed["skipped_files"]["onnx/model.onnx"] == "left out by --include/--exclude"  # type: ignore[index]
    ok("pull", "hub:no-onnx", tmp_path / "no-onnx", env=env)
    assert sorted(tree_snapshot(tmp_path / "no-onnx")) == ["config.json", "model.safetensors"]


def test_pull_include_exclude_and_options_before_positionals(hub_folder: Path, tmp_path: Path,
                                                            env: dict[str, str]) -> None:
    ok("push", hub_folder, "hub:v1", env=env)
    # The option first, as users type it; --only stays an alias of --include.
    for flag in ("--only", "--include"):
        dest = tmp_path / flag.strip("-")
        pulled = ok("pull", flag, "layers.1.*", "hub:v1", dest, env=env)
        assert pulled["tensors"] == 1 and names_of(dest / "model.safetensors") == ["layers.1.weight"]
    dest = tmp_path / "excluded"
    pulled = ok("pull", "--exclude", "layers.*", "--exclude", "onnx/*", "hub:v1", dest, env=env)
    assert names_of(dest / "model.safetensors") == ["head.bias"]
    assert sorted(tree_snapshot(dest)) == ["config.json", "model.safetensors", "tokenizer.json"]
    nothing = run("pull", "--exclude", "*", "hub:v1", tmp_path / "none", env=env)
    assert nothing.returncode == 1
    assert nothing.stderr.strip() == "shardstore pull: error: hub:v1: no tensor matches * less *"
    # Positionals split by an option: argparse's intermixed parsing, for every command.
    ok("tag", "hub:v1", "hub:v2", env=env)
    removed = ok("rm", "hub:v1", "--quiet", "hub:v2", env=env)
    assert [r["ref"] for r in removed["removed"]] == ["hub:v1", "hub:v2"]  # type: ignore[attr-defined]
