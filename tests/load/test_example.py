"""The example loads MiniLM from a real server into sentence-transformers: embeddings equal the original's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embeddings_over_grpc.py"


def test_embeddings_from_the_served_model_equal_the_original(minilm_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("embeddings_over_grpc", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.compare_embeddings(minilm_dir)
    assert report["identical"] and report["max_abs_diff"] == 0.0
    assert torch.equal(report["got"], report["expected"]) and report["got"].shape == (4, 384)
    assert report["tensors_loaded"] == 103 and report["not_in_module"] == []
    assert report["fetched_bytes"] > 0.5 * report["raw_bytes"]  # it really came over the wire
