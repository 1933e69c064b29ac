"""``--lossy auto`` picks the same codecs and reports the same sizes and quality as before it kept its winners.

The expected figures were computed by the implementation that measured every
candidate, threw the encodings away and encoded each winner again (main at
5b2cb44), on the model below; any change in what auto picks, or in the bytes
or errors of what it stores, shows here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import shardstore
from shardstore.repo import policy as policy_module
from shardstore.repo.policy import build_policy
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.store import LocalStore


def _intn(bits: int, group: int) -> str:
    return f"bits={bits} clip_steps=11 group={group} id=intn-group.v1"


# tensor -> (first codec's config, stored bytes, [snr_db, rel_rmse, max_abs_error])
EXPECTED: dict[str, dict[str, tuple[str, int, list[float]]]] = {
    "max-ratio 0.2": {
        "layers.0.attn.weight": (_intn(4, 64), 4740, [21.136, 0.0877446, 0.0166843]),
        "layers.0.mlp.weight": (_intn(5, 64), 4414, [27.068, 0.044321, 0.0116352]),
        "layers.1.attn.weight": (_intn(4, 64), 4731, [21.25, 0.0865961, 0.0190088]),
        "layers.1.mlp.weight": (_intn(4, 64), 3609, [21.154, 0.0875626, 0.0228033]),
        "layers.2.attn.weight": (_intn(4, 64), 4729, [21.11, 0.0880024, 0.0322998]),
        "layers.2.mlp.weight": (_intn(4, 64), 3621, [21.136, 0.0877429, 0.0204773]),
    },
    "max-ratio 0.3": {
        "layers.0.attn.weight": (_intn(7, 64), 7916, [39.45, 0.0106536, 0.00212857]),
        "layers.0.mlp.weight": (_intn(7, 64), 6216, [39.344, 0.0107846, 0.00137291]),
        "layers.1.attn.weight": (_intn(7, 64), 8194, [39.417, 0.0106944, 0.00228882]),
        "layers.1.mlp.weight": ("id=int8-channel.v1", 6338, [44.405, 0.00602224, 0.000655212]),
        "layers.2.attn.weight": ("id=int8-channel.v1", 8322, [43.26, 0.00687033, 0.00198226]),
        "layers.2.mlp.weight": ("id=int8-channel.v1", 6338, [44.401, 0.00602493, 0.000798326]),
    },
    "min-snr 30": {
        "layers.0.attn.weight": (_intn(6, 128), 6579, [31.683, 0.0260537, 0.00439963]),
        "layers.0.mlp.weight": (_intn(6, 64), 5321, [33.22, 0.0218263, 0.00270386]),
        "layers.1.attn.weight": (_intn(6, 128), 6563, [32.313, 0.0242299, 0.00465891]),
        "layers.1.mlp.weight": (_intn(6, 64), 5300, [33.182, 0.0219242, 0.00239809]),
        "layers.2.attn.weight": (_intn(6, 128), 6565, [32.334, 0.0241715, 0.00509643]),
        "layers.2.mlp.weight": (_intn(6, 64), 5318, [33.272, 0.0216982, 0.00265818]),
    },
}
# Shard format v2 (XXH3 stream checksums): its headers are 8 bytes longer than v1's in these shards.
STORED_BYTES = {"max-ratio 0.2": 31752, "max-ratio 0.3": 48992, "min-snr 30": 41554}


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(18)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(3):
        weight = rng.standard_normal((64, 128)).astype(np.float32) * np.float32(0.02 * (layer + 1))
        weight[0, :4] = np.float32(0.5)  # outliers, so clipping matters
        tensors[f"layers.{layer}.attn.weight"] = weight
        tensors[f"layers.{layer}.mlp.weight"] = (rng.standard_normal((96, 64)) * 0.05).astype(np.float32)
        tensors[f"layers.{layer}.norm.weight"] = np.ones(64, dtype=np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("keep", ["kept", "encoded again"])
@pytest.mark.parametrize("budget", sorted(EXPECTED))
def test_auto_figures_are_those_of_the_encode_twice_implementation(tmp_path: Path, budget: str, keep: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if keep != "kept":  # no room to keep candidates' streams: push encodes the winners itself
        monkeypatch.setattr(policy_module, "KEEP_STREAM_BYTES", 0)
    policy_file = tmp_path / "policy.json"
    policy_file.write_text('{"min_elements": 4096}')
    kind, value = budget.split()
    options: dict[str, Any] = {"max_ratio": float(value)} if kind == "max-ratio" else {"min_snr_db": float(value)}
    policy = build_policy(["auto"], policy_file, **options)
    store = LocalStore(tmp_path / "store")
    # 16 KiB chunks: every weight is two pieces, so per-piece streams and summed errors are both exercised.
    report = shardstore.push(_model(tmp_path / "model"), "m:a", store=store, chunk_bytes=16 << 10, policy=policy)
    repo = Repository(store)
    manifest = repo.get_manifest(repo.resolve(parse_ref("m:a")))
    figures = {
        name: (" ".join(f"{k}={v}" for k, v in sorted(record.codec[0].items())), record.stored_bytes,
               [record.quality[k] for k in ("snr_db", "rel_rmse", "max_abs_error")])
        for name, record in manifest.tensors.items() if record.quality is not None
    }
    assert figures == EXPECTED[budget]
    assert manifest.stored_bytes == report.stored_bytes == STORED_BYTES[budget]
    pulled = shardstore.pull("m:a", tmp_path / "out", store=store)  # what was kept is what decodes
    assert pulled.tensors == 9
