"""Re-push against first push: what the content index saves (docs/design.md, "The content index").

.venv/bin/python bench/bench_repush.py [--dir /tmp/repush] [--layers 44] [--rounds 2] [--json] [--keep]

Writes a synthetic Llama-shaped BF16 model (hidden 2048, GQA 32/4 heads, MLP 5632, vocab 32000;
44 layers make 4.1 GB; values normal(0, 0.02) rounded to BF16) in four safetensors files, then,
in each round, into an empty local store: the first push, a re-push of the unchanged model, and
a push of a copy with one tensor changed (its file copied and edited, the others hard-linked).
Rows are the best of the rounds, interleaved; the reference row is BLAS-free BLAKE3 of every
file, the floor of any scheme that must read the weights to know they are unchanged. The
generated files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np

import shardstore

HIDDEN, KV, MLP, VOCAB = 2048, 256, 5632, 32000
FILES = 4
CHANGED = "model.layers.1.mlp.down_proj.weight"


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                   p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
                   p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "mlp.gate_proj.weight": (MLP, HIDDEN), p + "mlp.up_proj.weight": (MLP, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, MLP)}
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    return shapes


def bf16_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> bytes:
    """normal(0, 0.02) as BF16 bits, rounded to nearest even (what torch's .to(bfloat16) does)."""
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    bits = values.view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2").tobytes()


def write_model(folder: Path, layers: int) -> dict[str, tuple[str, int]]:
    """The model in FILES safetensors files written tensor by tensor; returns name -> (file, data offset)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(layers)
    names = list(shapes)
    per_file = math.ceil(len(names) / FILES)
    rng = np.random.default_rng(0)
    where: dict[str, tuple[str, int]] = {}
    weight_map: dict[str, str] = {}
    for index in range(FILES):
        chunk = names[index * per_file : (index + 1) * per_file]
        file_name = f"model-{index + 1:05d}-of-{FILES:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in chunk:
            size = 2 * math.prod(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(folder / file_name, "wb") as handle:
            handle.write(struct.pack("<Q", len(head)) + head)
            for name in chunk:
                where[name] = (file_name, 8 + len(head) + header[name]["data_offsets"][0])
                weight_map[name] = file_name
                handle.write(bf16_normal(rng, shapes[name]))
    index_doc = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN,
                                                    "num_hidden_layers": layers}))
    return where


def changed_copy(model: Path, dest: Path, where: dict[str, tuple[str, int]], layers: int) -> None:
    """``dest``: ``model`` with CHANGED's values negated (sign bits flipped); the other files hard links."""
    dest.mkdir(parents=True, exist_ok=True)
    file_name, offset = where[CHANGED]
    for item in model.iterdir():
        if item.name == file_name:
            shutil.copyfile(item, dest / item.name)
        else:
            os.link(item, dest / item.name)
    size = 2 * math.prod(llama_shapes(layers)[CHANGED])
    with open(dest / file_name, "r+b") as handle:
        handle.seek(offset)
        data = np.frombuffer(handle.read(size), dtype="<u2") ^ np.uint16(0x8000)
        handle.seek(offset)
        handle.write(data.tobytes())


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measured(action: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = action()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def hash_files(folder: Path) -> None:
    for item in sorted(folder.iterdir()):
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        hasher.update_mmap(str(item))
        hasher.hexdigest()


def rounds(args: argparse.Namespace, model: Path, changed: Path) -> Iterator[dict[str, Any]]:
    for round_index in range(args.rounds):
        store = args.dir / f"store-{round_index}"
        shutil.rmtree(store, ignore_errors=True)
        row: dict[str, Any] = {}
        for label, src in (("first push", model), ("re-push, unchanged", model), ("push, one tensor changed", changed)):
            ref = "llama:changed" if src == changed else "llama:v1"
            wall, cpu, report = measured(
                lambda src=src, ref=ref, store=store: shardstore.push(src, ref, store=str(store)))
            row[label] = {"seconds": wall, "cpu_seconds": cpu, "pieces_encoded": report.pieces_encoded,
                          "pieces_reused": report.pieces_reused, "bytes_encoded": report.bytes_encoded,
                          "raw_bytes": report.raw_bytes}
        wall, cpu, _ = measured(lambda: hash_files(model))
        row["reference: BLAKE3 of the files"] = {"seconds": wall, "cpu_seconds": cpu}
        shutil.rmtree(store, ignore_errors=True)
        yield row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/shardstore-bench-repush"))
    parser.add_argument("--layers", type=int, default=44)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the generated model for the next run")
    args = parser.parse_args()
    model, changed = args.dir / "model", args.dir / "model-changed"
    try:
        where_file = args.dir / "where.json"
        if not (model.exists() and where_file.exists()):
            shutil.rmtree(args.dir, ignore_errors=True)
            where = write_model(model, args.layers)
            where_file.write_text(json.dumps(where))
        where = {k: tuple(v) for k, v in json.loads(where_file.read_text()).items()}  # type: ignore[misc]
        shutil.rmtree(changed, ignore_errors=True)
        changed_copy(model, changed, where, args.layers)
        results = list(rounds(args, model, changed))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    best = {label: min((r[label] for r in results), key=lambda m: m["seconds"]) for label in results[0]}
    first = best["first push"]["seconds"]
    expected_pieces = math.ceil(HIDDEN / max(1, (4 << 20) // (2 * MLP)))  # CHANGED's rows cut at 4 MiB
    summary = {"raw_bytes": best["first push"]["raw_bytes"], "rounds": args.rounds, "rows": best,
               "repush_ratio": round(best["re-push, unchanged"]["seconds"] / first, 4),
               "changed_tensor_pieces": expected_pieces}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"Re-push of a {summary['raw_bytes'] / 1e9:.2f} GB Llama-shaped BF16 model, local store, "
          f"best of {args.rounds} interleaved rounds, {os.cpu_count()} cores")
    print(f"{'':34} {'seconds':>8} {'x first':>8} {'CPU-s':>7} {'pieces encoded':>15} {'reused':>7}")
    for label, m in best.items():
        print(f"{label:34} {m['seconds']:8.2f} {m['seconds'] / first:8.3f} {m['cpu_seconds']:7.1f} "
              f"{m.get('pieces_encoded', ''):>15} {m.get('pieces_reused', ''):>7}")
    print(f"(the changed tensor {CHANGED} is {expected_pieces} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
