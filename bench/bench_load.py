"""Loading benchmark: a model into memory, against its peers; seconds and peak host memory side by side.

    .venv/bin/python bench/bench_load.py [--model DIR] [--repeat 3] [--device cpu]

Every run is a fresh child process (so one run's memory cannot hide another's)
that imports what it needs, notes its RSS (the baseline), loads the model onto
``--device``, touches every page, and reports its seconds and its peak RSS
(sampled, and ``ru_maxrss``: :class:`shardstore.load.memory.PeakRss`):

* ``load_file``: ``safetensors.torch.load_file`` of the original file (page cache warm);
* ``pull, then load_file``: ``shardstore.pull`` from the local store to a folder, then ``load_file``;
* ``shardstore, local store``: ``shardstore.open(NAME:TAG, store=...).state_dict(device)``;
* ``shardstore, gRPC``: the same from ``grpc://`` (server in its own process, a cold client cache).

Seconds are the best of ``--repeat`` runs, also as a ratio to ``load_file``;
peak RSS growth (peak minus baseline) is the largest of the runs, also as a
multiple of the model's raw size: 1.00x means the model is held once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_grpc import _default_model, server_process

METHODS = {
    "load_file": "load_file",
    "pull_then_load": "pull, then load_file",
    "shardstore_local": "shardstore, local store",
    "shardstore_grpc": "shardstore, gRPC",
}


def child(method: str, model: Path, store: str, address: str, device: str, scratch: Path) -> dict[str, Any]:
    """One measured load in this process; returns its figures."""
    import torch
    from safetensors.torch import load_file

    import shardstore
    from shardstore.load.memory import PeakRss

    def from_files(folder: Path) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for path in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(str(path), device=device))
        return tensors

    loads: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "load_file": lambda: from_files(model),
        "pull_then_load": lambda: (shardstore.pull("bench:v1", scratch / "pulled", store=store),
                                   from_files(scratch / "pulled"))[1],
        "shardstore_local": lambda: shardstore.open("bench:v1", store=store).state_dict(device),
        "shardstore_grpc": lambda: shardstore.open(f"grpc://{address}/bench:v1",
                                                   cache=scratch / "cache").state_dict(device),
    }
    started = time.perf_counter()
    with PeakRss() as rss:
        tensors = loads[method]()
        for tensor in tensors.values():
            # A loader may map the file lazily: touch every page so the bytes are really in memory.
            tensor.reshape(-1).view(torch.uint8)[::4096].sum()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"seconds": seconds, "growth": rss.growth, "baseline": rss.baseline, "raw": raw}


def run_child(method: str, args: argparse.Namespace, store: Path, address: str, scratch: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=scratch) as run_dir:
        cmd = [sys.executable, __file__, "--child", method, "--model", str(args.model), "--store", str(store),
               "--address", address, "--device", args.device, "--scratch", run_dir]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    figures: dict[str, Any] = json.loads(out.splitlines()[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the MiniLM test model)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; the best time is kept")
    parser.add_argument("--device", default="cpu", help="where the tensors go: cpu, cuda:0 ...")
    parser.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    parser.add_argument("--address", default="", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or _default_model()
    if args.child:
        assert args.scratch is not None
        print(json.dumps(child(args.child, args.model, args.store, args.address, args.device, args.scratch)))
        return 0

    import shardstore

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = root / "store"
        pushed = shardstore.push(args.model, "bench:v1", store=str(store))
        raw_mib = pushed.raw_bytes / (1 << 20)
        print(f"model {args.model}: {raw_mib:.1f} MiB raw, {pushed.stored_bytes / (1 << 20):.1f} MiB stored "
              f"(codec {pushed.codec}), device {args.device}, {len(os.sched_getaffinity(0))} cores, "
              f"best of {args.repeat}\n")
        results: dict[str, list[dict[str, Any]]] = {}
        with server_process(store, None) as address:
            for method in METHODS:
                run_child(method, args, store, address, root)  # warm the page cache and the server
                results[method] = [run_child(method, args, store, address, root) for _ in range(args.repeat)]

    baseline_s = min(r["seconds"] for r in results["load_file"])
    print("| method | seconds | vs load_file | peak RSS growth | growth / raw size |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for method, label in METHODS.items():
        best = min(r["seconds"] for r in results[method])
        growth = max(r["growth"] for r in results[method])
        print(f"| {label} | {best:.3f} | {best / baseline_s:.2f}x | {growth / (1 << 20):.1f} MiB | "
              f"{growth / pushed.raw_bytes:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
