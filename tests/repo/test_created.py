"""Manifests carry their creation time ("created", optional); ls and inspect show it."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_json as ok
from helpers import run_cli as run
from rpc.grpc_helpers import write_small_model

from shardstore.errors import FormatError
from shardstore.format import canonical_json
from shardstore.format.digest import digest
from shardstore.format.manifest import parse_manifest

EPOCH = 1_000_000_000  # 2001-09-09 01:46:40 UTC


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "SHARDSTORE_STORE": str(tmp_path / "store"), "SOURCE_DATE_EPOCH": str(EPOCH)}


def test_push_dates_the_manifest_and_ls_shows_it(tmp_path: Path, env: dict[str, str]) -> None:
    model = write_small_model(tmp_path / "model")
    pushed = ok("push", model, "m:v1", env=env)
    expected = datetime.datetime.fromtimestamp(EPOCH, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = json.loads((tmp_path / "store" / "manifests" / f"{pushed['manifest_id']}.json").read_bytes())
    assert doc["created"] == expected == "2001-09-09T01:46:40Z"
    assert ok("ls", env=env)["models"] == [{  # type: ignore[comparison-overlap]
        "ref": "m:v1", "manifest_id": pushed["manifest_id"], "created": expected, "raw_bytes": pushed["raw_bytes"],
        "stored_bytes": pushed["stored_bytes"], "tensors": pushed["tensors"]}]
    assert ok("inspect", "m:v1", env=env)["created"] == expected
    table = run("ls", env=env).stdout.splitlines()
    assert "CREATED (UTC)" in table[0] and "2001-09-09 01:46" in table[1]

    # The same model pushed again later to the same ref is the same version: same id, nothing written.
    again = ok("push", model, "m:v1", env={**env, "SOURCE_DATE_EPOCH": str(EPOCH + 86400)})
    assert again["manifest_id"] == pushed["manifest_id"] and again["uploaded_bytes"] == 0
    # Under another tag it is a new manifest of the same objects, dated now.
    other = ok("push", model, "m:v2", env={**env, "SOURCE_DATE_EPOCH": str(EPOCH + 86400)})
    assert other["manifest_id"] != pushed["manifest_id"] and other["shards_uploaded"] == 0
    assert ok("inspect", "m:v2", env=env)["created"] == "2001-09-10T01:46:40Z"

    bad = run("push", model, "m:v3", env={**env, "SOURCE_DATE_EPOCH": "yesterday"})
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "SOURCE_DATE_EPOCH" in bad.stderr


def test_manifests_without_a_time_keep_their_bytes_and_a_bad_time_is_refused(tmp_path: Path,
                                                                             env: dict[str, str]) -> None:
    pushed = ok("push", write_small_model(tmp_path / "model"), "m:v1", env=env)
    doc = json.loads((tmp_path / "store" / "manifests" / f"{pushed['manifest_id']}.json").read_bytes())
    del doc["created"]  # as every manifest made before the field existed
    older = canonical_json.dumps(doc)
    parsed = parse_manifest(older, digest(older))
    assert parsed.created is None and parsed.to_bytes() == older
    assert canonical_json.dumps(parsed.to_json()) == older  # rebuilt, it still has no "created" key
    # null is refused too: the versioning rule is "absent", and null would not survive a rebuild.
    for bad in ("2001-09-09 01:46:40", "2001-09-09T01:46:40+02:00", 1000000000, None):
        data = canonical_json.dumps({**doc, "created": bad})
        with pytest.raises(FormatError, match="created"):
            parse_manifest(data)


def test_a_closed_stdout_ends_quietly(tmp_path: Path, env: dict[str, str]) -> None:
    ok("push", write_small_model(tmp_path / "model"), "m:v1", env=env)
    command = f"{sys.executable} -m shardstore inspect m:v1 | head -n 1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("m:v1  manifest ") and result.stderr == ""
