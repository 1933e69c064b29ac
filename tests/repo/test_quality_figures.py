"""The SNR and relative error a lossy push records, recomputed here from the original and the pulled weights.

Computed with torch in float64, from what a user holds (the original file and a real pull), sharing no
code with ``shardstore.repo.quality``: a wrong formula or a figure of the wrong piece would show.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rpc.grpc_helpers import write_small_model
from safetensors.torch import load_file

import shardstore
from shardstore.repo.policy import build_policy
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.store import LocalStore


@pytest.mark.parametrize("rule", ["*.weight=int8", "*.weight=int4", "*.weight=fp8"])
def test_recorded_snr_and_relative_error_match_an_independent_computation(tmp_path: Path, rule: str) -> None:
    model = write_small_model(tmp_path / "m")
    store = LocalStore(tmp_path / "store")
    shardstore.push(model, "m:q", store=store, policy=build_policy([rule]))
    shardstore.pull("m:q", tmp_path / "out", store=store)
    original = load_file(str(model / "model.safetensors"))
    pulled = load_file(str(tmp_path / "out" / "model.safetensors"))
    manifest = Repository(store).get_manifest(Repository(store).resolve(parse_ref("m:q")))
    lossy = [name for name, record in manifest.tensors.items() if record.quality is not None]
    assert sorted(lossy) == sorted(n for n in original if n.endswith(".weight"))
    for name in lossy:
        x = original[name].double().flatten()
        error = pulled[name].double().flatten() - x
        assert error.abs().max() > 0, f"{name}: lossy but pulled exactly"
        snr_db = 10 * math.log10(float(x.square().sum()) / float(error.square().sum()))
        rel_rmse = math.sqrt(float(error.square().sum()) / float(x.square().sum()))
        quality = manifest.tensors[name].quality
        assert quality is not None
        assert quality["snr_db"] == pytest.approx(snr_db, abs=0.002), name
        assert quality["rel_rmse"] == pytest.approx(rel_rmse, rel=1e-4), name
        assert quality["max_abs_error"] == pytest.approx(float(error.abs().max()), rel=1e-4), name
