"""shardstore diff: which tensors changed between two versions and what an upgrade costs, on real MiniLM pushes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from edited_model import ADDED, EDITED, REMOVED, make_edited_minilm
from safetensors import safe_open

import shardstore
from shardstore.repo.diff import diff_refs
from shardstore.repo.repository import Repository
from shardstore.store import LocalStore


def _shard_files(store: Path) -> dict[str, int]:
    """Every shard file in a local store and its size, read from the directory, not from any manifest."""
    return {p.name: p.stat().st_size for p in (store / "shards").rglob("*") if p.is_file()}


def _manifest_doc(store: Path, name: str, tag: str) -> dict:
    manifest_id = (store / "refs" / name / f"@{tag}").read_text().strip()
    return json.loads((store / "manifests" / f"{manifest_id}.json").read_bytes())


@pytest.fixture(scope="module")
def versions(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One store holding minilm:v1 (the original) and minilm:v2 (edited), with the shard files v2's push wrote."""
    root = tmp_path_factory.mktemp("diff")
    edited = make_edited_minilm(minilm_dir, root / "edited")
    store = root / "store"
    shardstore.push(minilm_dir, "minilm:v1", store=LocalStore(store))
    before = _shard_files(store)
    shardstore.push(edited, "minilm:v2", store=LocalStore(store))
    after = _shard_files(store)
    return {"store": store, "edited": edited, "new_shards": {k: v for k, v in after.items() if k not in before}}


def _names(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return list(f.keys())


def test_diff_names_exactly_the_edited_tensors_and_costs_the_shards_the_push_wrote(
    versions: dict, minilm_dir: Path
) -> None:
    store = versions["store"]
    diff = diff_refs(Repository(LocalStore(store)), "minilm:v1", "minilm:v2")
    assert {c.name for c in diff.changed} == set(EDITED)
    assert diff.added == (ADDED,) and diff.removed == (REMOVED,)
    assert len(diff.unchanged) == len(_names(minilm_dir)) - len(EDITED) - 1
    # Untouched tensors packed in the same v1 shard as an edited one now sit in another shard: still unchanged.
    v1 = _manifest_doc(store, "minilm", "v1")["tensors"]
    edited_shards = {p["shard"] for name in EDITED for p in v1[name]["pieces"]}
    neighbours = {n for n, t in v1.items() if n not in EDITED and {p["shard"] for p in t["pieces"]} & edited_shards}
    assert neighbours and neighbours <= set(diff.unchanged)
    # What a client holding v1 lacks is exactly what pushing v2 next to v1 had to write.
    new_shards = versions["new_shards"]
    assert diff.fetch_shards == len(new_shards) and diff.fetch_shard_bytes == sum(new_shards.values())
    assert diff.fetch_files == () and diff.fetch_bytes == diff.fetch_shard_bytes
    v2_shards = _manifest_doc(store, "minilm", "v2")["shards"]
    assert diff.shared_shards == len(v2_shards) - len(new_shards) > 0
    assert diff.full_bytes > diff.fetch_bytes


def test_a_version_against_itself_is_free(versions: dict) -> None:
    diff = diff_refs(Repository(LocalStore(versions["store"])), "minilm:v1", "minilm:v1")
    shards = _manifest_doc(versions["store"], "minilm", "v1")["shards"]
    assert (len(diff.changed), diff.added, diff.removed, diff.fetch_bytes) == (0, (), (), 0)
    assert diff.shared_shards == len(shards) and diff.shared_bytes == sum(shards.values())


def test_same_values_under_another_codec_are_unchanged_but_cost_their_shards(
    versions: dict, minilm_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shardstore.push(minilm_dir, "minilm:v1", store=LocalStore(store))
    before = _shard_files(store)
    shardstore.push(minilm_dir, "minilm:zstd", store=LocalStore(store), codec="zstd")
    written = {k: v for k, v in _shard_files(store).items() if k not in before}
    diff = diff_refs(Repository(LocalStore(store)), "minilm:v1", "minilm:zstd")
    assert diff.changed == () and len(diff.unchanged) == len(_names(minilm_dir))
    assert diff.fetch_shard_bytes == sum(written.values()) > 0


def test_a_delta_against_the_held_version_costs_its_own_stored_bytes(versions: dict) -> None:
    store = versions["store"]
    shardstore.push(versions["edited"], "minilm:v2-delta", store=LocalStore(store), base="minilm:v1")
    diff = diff_refs(Repository(LocalStore(store)), "minilm:v1", "minilm:v2-delta")
    doc = _manifest_doc(store, "minilm", "v2-delta")
    assert {c.name for c in diff.changed} == set(EDITED)
    assert diff.fetch_shard_bytes == doc["totals"]["stored_bytes"]  # every shard it takes from the base, v1 has
    assert diff.shared_shards == len(doc["base_shards"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardstore", *args], capture_output=True, text=True, timeout=120)


def test_cli_diff_prints_the_same_figures_and_one_line_errors(versions: dict) -> None:
    store = str(versions["store"])
    result = _cli("diff", "minilm:v1", "minilm:v2", "--store", store, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures == diff_refs(Repository(LocalStore(store)), "minilm:v1", "minilm:v2").to_json()
    assert figures["tensors"] == {"unchanged": 100, "changed": 3, "added": 1, "removed": 1}

    human = _cli("diff", "minilm:v1", "minilm:v2", "--store", store)
    assert human.returncode == 0 and "3 changed, 1 added, 1 removed" in human.stdout
    assert all(f"changed  {name}" in human.stdout for name in EDITED)

    for args, words in ((("minilm:v1", "minilm:nope"), "minilm:nope"),
                        (("grpc://127.0.0.1:1/minilm:v1", "minilm:v2"), "/compare")):
        bad = _cli("diff", *args, "--store", store)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and len(lines) == 1 and lines[0].startswith("shardstore diff: error: "), bad.stderr
        assert words in lines[0]


def test_diff_over_s3_range_reads_matches_the_local_store(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard headers come by range reads from any store; a header longer than the first read takes a second."""
    import numpy as np
    from safetensors.numpy import save_file

    from shardstore.repo import repository
    from shardstore.store import open_store

    rng = np.random.default_rng(1)
    tensors = {f"blocks.{i}.{part}": rng.standard_normal((32, 16), dtype=np.float32)
               for i in range(3) for part in ("q", "k", "v", "o")}
    save_file(tensors, str(tmp_path / "v1.safetensors"))
    tensors["blocks.1.k"] = tensors["blocks.1.k"] * np.float32(2)
    save_file(tensors, str(tmp_path / "v2.safetensors"))
    stores = [open_store(f"s3://{s3_bucket}/models", endpoint_url=s3_endpoint), LocalStore(tmp_path / "local")]
    figures = []
    for store in stores:
        for tag in ("v1", "v2"):
            shardstore.push(tmp_path / f"{tag}.safetensors", f"tiny:{tag}", store=store)
        monkeypatch.setattr(repository, "_HEAD_READ_BYTES", 16)  # every header now needs its second read
        diff = diff_refs(Repository(store), "tiny:v1", "tiny:v2")
        assert [c.name for c in diff.changed] == ["blocks.1.k"] and len(diff.unchanged) == 11
        figures.append({k: v for k, v in diff.to_json().items() if k not in ("a_manifest", "b_manifest")})
    assert figures[0] == figures[1]  # manifest ids differ (each carries its push time); nothing else does
