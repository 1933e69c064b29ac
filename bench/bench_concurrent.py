"""Concurrent clients: N processes pulling at once from one server, next to a plain gRPC byte-stream peer.

    .venv/bin/python bench/bench_concurrent.py [--clients 32] [--model DIR] [--max-rate BYTES_PER_S]

One ``shardstore serve`` process holds the real MiniLM twice: FP32 as pushed,
and a BF16 copy (two models, two sets of shards). N client processes (one
process per client: they do not share a GIL, as real clients would not), each
with a cold cache of its own, start together on a barrier and each pull a
model to disk:

* ``same``: every client pulls FP32;
* ``mixed``: even clients pull FP32, odd ones BF16.

The peer is a minimal plain gRPC server in its own process that streams the
original ``model.safetensors`` files from memory in 1 MiB messages (what a
registry without compression, verification or caching would do), to the same
number of client processes writing them to disk.

Every pulled file is hashed and compared with the original; a client that
raised counts as an error. Reported: aggregate throughput (raw model bytes
delivered / wall time, MB = 1e6 B), p50 / p99 seconds per pull, the server's
peak RSS (VmHWM), the CPU seconds the server and the client processes used
(where a 2-core machine's time goes) and, for shardstore, the shard streams
still open afterwards (from its /metrics). One warm-up pull of each model fills the server's
hot-shard cache and the page cache first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_grpc import _default_model

MODEL_FILE = "model.safetensors"
PEER_METHOD = "/bench.Bytes/Get"
CHUNK = 1 << 20


# -- servers ---------------------------------------------------------------------------------------------------


@dataclass
class Server:
    address: str
    pid: int
    metrics: str | None = None

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) / 1024 if match else float("nan")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def active_streams(self) -> int | None:
        if self.metrics is None:
            return None
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as reply:
            match = re.search(r"^shardstore_active_streams (\S+)$", reply.read().decode(), re.MULTILINE)
        return int(float(match.group(1))) if match else None


@contextmanager
def shardstore_server(store: Path, max_rate: int | None) -> Iterator[Server]:
    cmd = [sys.executable, "-m", "shardstore", "serve", "--store", str(store), "--port", "0", "--json",
           "--metrics-port", "0"]
    if max_rate:
        cmd += ["--max-rate", str(max_rate)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        yield Server(ready["address"], proc.pid, ready.get("metrics_address"))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _peer_serve(files: dict[str, str], max_rate: int | None, ready: Any) -> None:
    """The plain gRPC peer: ``Get(name)`` streams that file's bytes from memory in 1 MiB messages."""
    import grpc

    blobs = {name: Path(path).read_bytes() for name, path in files.items()}

    def get(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        data = blobs[request.decode()]
        for start in range(0, len(data), CHUNK):
            if max_rate:
                time.sleep(CHUNK / max_rate)  # crude pacing, per stream (only for --max-rate runs)
            yield data[start : start + CHUNK]

    handler = grpc.method_handlers_generic_handler("bench.Bytes", {
        "Get": grpc.unary_stream_rpc_method_handler(get),  # no (de)serializers: raw bytes both ways
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), handlers=[handler], options=[
        ("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ready.put(f"127.0.0.1:{port}")
    server.wait_for_termination()


@contextmanager
def peer_server(files: dict[str, str], max_rate: int | None) -> Iterator[Server]:
    ctx = mp.get_context("spawn")
    ready: Any = ctx.Queue()
    proc = ctx.Process(target=_peer_serve, args=(files, max_rate, ready), daemon=True)
    proc.start()
    try:
        address = ready.get(timeout=60)
        assert proc.pid is not None
        yield Server(address, proc.pid)
    finally:
        proc.terminate()
        proc.join(timeout=30)


# -- clients ---------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _shardstore_pull(address: str, model: str, dest: Path) -> Path:
    import shardstore

    shardstore.pull(f"grpc://{address}/{model}", dest, cache=dest.parent / f"{dest.name}-cache", threads=1)
    return dest / MODEL_FILE


def _peer_pull(address: str, model: str, dest: Path) -> Path:
    import grpc

    dest.mkdir(parents=True, exist_ok=True)
    with grpc.insecure_channel(address) as channel, (dest / MODEL_FILE).open("wb") as out:
        for chunk in channel.unary_stream(PEER_METHOD)(model.encode(), timeout=600):
            out.write(chunk)
    return dest / MODEL_FILE


PULLS: dict[str, Callable[[str, str, Path], Path]] = {"shardstore": _shardstore_pull, "peer": _peer_pull}


def _client(kind: str, address: str, model: str, dest: str, expected: str, barrier: Any, results: Any) -> None:
    # Imports happen before the clock starts: a pull is measured, not an interpreter starting.
    import grpc  # noqa: F401

    import shardstore.repo.pull
    import shardstore.rpc.client  # noqa: F401

    barrier.wait()
    started = time.perf_counter()
    try:
        path = PULLS[kind](address, model, Path(dest))
        seconds = time.perf_counter() - started
        results.put((seconds, _sha256(path) == expected, None))
    except Exception as exc:  # counted and shown, never silently dropped
        results.put((time.perf_counter() - started, False, f"{type(exc).__name__}: {exc}"))
    finally:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(f"{dest}-cache", ignore_errors=True)


@dataclass
class Round:
    wall_s: float
    seconds: list[float]
    errors: list[str]
    corrupt: int
    raw_bytes: int
    clients_cpu_s: float
    server_cpu_s: float = 0.0


def run_round(kind: str, address: str, plan: list[tuple[str, str, int]], scratch: Path) -> Round:
    """``plan``: one (model, expected sha256, raw bytes) per client, all started together."""
    ctx = mp.get_context("spawn")
    barrier: Any = ctx.Barrier(len(plan) + 1)
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(kind, address, model, str(scratch / f"c{i}"), sha, barrier, results))
             for i, (model, sha, _raw) in enumerate(plan)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for proc in procs:
        proc.start()
    barrier.wait(timeout=300)  # every client imported and ready: the clock starts now
    started = time.perf_counter()
    outcomes = [results.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - started
    for proc in procs:
        proc.join(timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Whole client processes (start-up and the final hash included): what N clients cost this machine.
    clients_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    errors = [err for _s, _ok, err in outcomes if err]
    return Round(wall, sorted(s for s, _ok, err in outcomes if not err), errors,
                 sum(1 for _s, ok, err in outcomes if not ok and not err), sum(raw for _m, _s, raw in plan),
                 clients_cpu)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _bf16_copy(model: Path, dest: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, dest, ignore=shutil.ignore_patterns(MODEL_FILE))
    tensors = load_file(str(model / MODEL_FILE))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(dest / MODEL_FILE), metadata={"format": "pt"})
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="client processes pulling at once (default 32)")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the MiniLM test model)")
    parser.add_argument("--max-rate", type=int, default=None,
                        help="pace the servers' sends (bytes/s); default: unpaced loopback")
    args = parser.parse_args()
    model = args.model or _default_model()

    import shardstore

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = root / "store"
        models = {"minilm:fp32": model, "minilm:bf16": _bf16_copy(model, root / "bf16")}
        info: dict[str, tuple[str, int]] = {}  # ref -> (sha256 of the original file, raw file bytes)
        for ref, folder in models.items():
            report = shardstore.push(folder, ref, store=str(store))
            info[ref] = (_sha256(folder / MODEL_FILE), (folder / MODEL_FILE).stat().st_size)
            print(f"{ref}: {report.raw_bytes / 1e6:.1f} MB raw, {report.stored_bytes / 1e6:.1f} MB stored, "
                  f"{report.shards_total} shards")
        scenarios = {
            "same model": ["minilm:fp32"] * args.clients,
            "FP32 + BF16": [("minilm:fp32", "minilm:bf16")[i % 2] for i in range(args.clients)],
        }
        print(f"{args.clients} client processes, {os.cpu_count()} cores, "
              f"{'unpaced loopback' if not args.max_rate else f'paced {args.max_rate / 1e6:g} MB/s'}\n")
        rows: list[tuple[str, str, Round, float, int | None]] = []
        for kind in ("shardstore", "peer"):
            files = {ref: str(folder / MODEL_FILE) for ref, folder in models.items()}
            server_cm = shardstore_server(store, args.max_rate) if kind == "shardstore" \
                else peer_server(files, args.max_rate)
            with server_cm as server:
                warm = run_round(kind, server.address, [(ref, *info[ref]) for ref in models], root)
                assert not warm.errors and not warm.corrupt, warm.errors
                for label, refs in scenarios.items():
                    cpu_before = server.cpu_seconds()
                    result = run_round(kind, server.address, [(ref, *info[ref]) for ref in refs], root)
                    result.server_cpu_s = server.cpu_seconds() - cpu_before
                    rows.append((label, kind, result, server.peak_rss_mib(), server.active_streams()))
                    print(f"  done: {label}, {kind}: {result.wall_s:.1f} s", file=sys.stderr)

    print("| scenario | server | clients | aggregate MB/s | p50 s / pull | p99 s / pull | server peak RSS | "
          "server CPU s | clients CPU s | errors | corrupt | streams open after |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    peer_label = "plain gRPC byte stream (peer)"
    for label, kind, result, rss, open_after in rows:
        name = "shardstore serve" if kind == "shardstore" else peer_label
        print(f"| {label} | {name} | {len(result.seconds) + len(result.errors)} | "
              f"{result.raw_bytes / 1e6 / result.wall_s:.0f} | {_percentile(result.seconds, 50):.2f} | "
              f"{_percentile(result.seconds, 99):.2f} | {rss:.0f} MiB | {result.server_cpu_s:.1f} | "
              f"{result.clients_cpu_s:.1f} | {len(result.errors)} | {result.corrupt} | "
              f"{'-' if open_after is None else open_after} |")
    for _label, _kind, result, _rss, _open in rows:
        for error in result.errors[:3]:
            print(f"error: {error}")
    return 0 if all(not r.errors and not r.corrupt for _l, _k, r, _r, _o in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
