"""Fan-out past one server: 16 clients pull one model (a) through the gRPC server, (b) straight from S3 through
signed URLs, (c) through an nginx cache in front of the server's HTTP endpoint; and 4 ranks load it with and
without cooperation (torch.distributed, gloo).

    .venv/bin/python bench/bench_fanout.py [--size-mb 1024] [--clients 16] [--ranks 4] [--json out.json]

Everything runs on this machine, on 127.0.0.1: the object store is moto's S3 server in its own process,
the registry is ``shardstore serve`` in its own process (store on that S3, hot-shard cache large enough
to hold the whole model, so mode (a) is the server at its best: every shard read from S3 once), and nginx
is started by the bench (tests/nginx_cache.py, the config docs/operations.md shows). Each client is its
own process; it fetches and verifies every shard and blob of the model (what a pull does before it
decodes; decoding costs the same in every mode and is left out, so the table measures delivery).
Clients start, import and connect first, then all begin on one signal: wall time is from that signal
until the last client is done.

Columns: wall time; object bytes that left the registry server (its metrics: gRPC shard and blob bytes
plus HTTP body bytes); the registry's CPU seconds (/proc, over the run); the CPU seconds of the other
servers on the path (moto, nginx) for honesty: on a real deployment those are S3's fleet and the cache
hosts, here they share the same two cores.

Mode (c) runs twice: "cold" (an empty nginx cache: the first requests for each shard go to the server,
nginx's proxy_cache_lock makes it one request per shard) and "warm" (a second wave of clients).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the nginx helper the tests use

REF = "fanout/model:v1"
TICKS = os.sysconf("SC_CLK_TCK")


# -- processes and their CPU ---------------------------------------------------------------------------


def cpu_seconds(pid: int, with_children_of: bool = False) -> float:
    """utime + stime of ``pid`` (and, for nginx, of the processes whose parent it is)."""
    def one(p: int) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / TICKS

    total = one(pid)
    if with_children_of:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                total += one(int(stat.parent.name))
    return total


def free_port() -> int:
    from helpers import free_port as free

    return free()


@contextmanager
def moto_server(work: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=(work / "moto.log").open("wb"))
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(endpoint, timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield endpoint, process
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    address: str
    http_address: str
    metrics_address: str

    def bytes_out(self) -> int:
        text = urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10).read().decode()
        total = 0.0
        for name in ("shardstore_sent_bytes_total", "shardstore_http_sent_bytes_total"):
            total += sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))
        return int(total)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)


@contextmanager
def registry(store_url: str, endpoint: str, work: Path, *, sign: bool) -> Iterator[Server]:
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    command = [sys.executable, "-m", "shardstore", "serve", "--store", store_url, "--port", "0", "--http-port", "0",
               "--metrics-port", "0", "--cache-size", "4GiB", "--signed-url-ttl", "900" if sign else "0", "--json"]
    log = (work / "serve.log").open("ab")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env)
    try:
        assert process.stdout is not None
        ready = json.loads(process.stdout.readline())
        yield Server(process, ready["address"], ready["http_address"], ready["metrics_address"])
    finally:
        process.terminate()
        process.wait(timeout=60)


# -- the model -------------------------------------------------------------------------------------------


def make_model(folder: Path, size_mb: int) -> Path:
    """A Llama-shaped BF16 checkpoint of about ``size_mb`` MiB: normal(0, 0.02) weights, as trained weights look."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "model.safetensors").exists():
        return folder
    generator = torch.Generator().manual_seed(0)
    hidden = 2048
    per_layer = 4 * hidden * hidden + 3 * hidden * 5504  # q, k, v, o and the MLP's three matrices
    layers = max(1, (size_mb << 20) // (2 * per_layer))
    tensors: dict[str, Any] = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{name}.weight"] = torch.randn(hidden, hidden, generator=generator)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = torch.randn(5504, hidden, generator=generator)
        tensors[f"{prefix}.mlp.up_proj.weight"] = torch.randn(5504, hidden, generator=generator)
        tensors[f"{prefix}.mlp.down_proj.weight"] = torch.randn(hidden, 5504, generator=generator)
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden)
        for key in [k for k in tensors if k.startswith(f"{prefix}.") and k.endswith("proj.weight")]:
            tensors[key] = (tensors[key] * 0.02).to(torch.bfloat16)
        tensors[f"{prefix}.input_layernorm.weight"] = tensors[f"{prefix}.input_layernorm.weight"].to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"hidden_size": hidden, "num_hidden_layers": layers}))
    return folder


# -- clients ---------------------------------------------------------------------------------------------


def client_main(address: str, mirror: str) -> None:
    """One client process: connect, say ready, wait for "go", fetch and verify everything, report."""
    from shardstore.repo.refs import parse_ref
    from shardstore.rpc.client import GrpcClient

    with GrpcClient(address, use_cache=False, mirror=mirror or None) as client:
        client.resolve(parse_ref(REF))  # connected before the start signal
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.perf_counter()
        manifest = client.get_manifest(client.resolve(parse_ref(REF)))
        received = 0
        for _shard_id, data in client.fetch_shards(manifest.shards):
            received += len(data)
        for blob in [f.header for f in manifest.files] + [b.id for b in manifest.blobs.values()]:
            received += len(client.get_blob(blob))
        print(json.dumps({"seconds": time.perf_counter() - started, "bytes": received,
                          "mirror_bytes": client.mirror_bytes, "signed_url_bytes": client.signed_url_bytes}),
              flush=True)


@dataclass
class Row:
    mode: str
    clients: int
    wall_s: float
    server_bytes_out: int
    server_cpu_s: float
    other_cpu_s: float
    other: str
    client_bytes: int
    note: str = ""


def run_clients(count: int, address: str, mirror: str | None) -> tuple[float, int, list[dict[str, Any]]]:
    command = [sys.executable, __file__, "--client", address, "--mirror", mirror or ""]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ,
                                "OMP_NUM_THREADS": "1"}) for _ in range(count)]
    for worker in workers:
        assert worker.stdout is not None
        line = worker.stdout.readline().decode().strip()
        if line != "ready":
            raise SystemExit(f"client failed to start: {line!r}")
    started = time.perf_counter()
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(b"go\n")
        worker.stdin.flush()
    reports = []
    for worker in workers:
        out, _ = worker.communicate(timeout=3600)
        if worker.returncode != 0:
            raise SystemExit(f"client failed: exit {worker.returncode}")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    wall = time.perf_counter() - started
    return wall, sum(r["bytes"] for r in reports), reports


# -- cooperative loading ---------------------------------------------------------------------------------


def rank_main(rank: int, world: int, port: int, address: str, cooperate: bool) -> None:
    import torch
    import torch.distributed as dist

    from shardstore.load.loader import LoadOptions
    from shardstore.load.view import ModelView
    from shardstore.repo.refs import parse_ref
    from shardstore.rpc.client import GrpcClient

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    with GrpcClient(address, use_cache=False) as client:
        manifest_id = client.resolve(parse_ref(REF))
        view = ModelView(client, REF, manifest_id, client.get_manifest(manifest_id))
        dist.barrier()
        started = time.perf_counter()
        result = view.load(LoadOptions(group=dist.group.WORLD if cooperate else None), threads=1)
        seconds = time.perf_counter() - started
        dist.barrier()
        wall = time.perf_counter() - started
        figures = {"rank": rank, "seconds": seconds, "wall": wall, "fetched_bytes": result.fetched_bytes,
                   "tensor_bytes": result.raw_bytes}
        if result.cooperative is not None:
            figures["exchanged_bytes"] = result.cooperative.received_bytes
        del result
    dist.destroy_process_group()
    print(json.dumps(figures), flush=True)


def run_ranks(world: int, address: str, cooperate: bool) -> tuple[float, list[dict[str, Any]]]:
    port = free_port()
    started = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, __file__, "--rank", str(rank), str(world), str(port), address,
                                 "1" if cooperate else "0"], stdout=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in range(world)]
    reports = []
    for worker in workers:
        out, _ = worker.communicate(timeout=3600)
        if worker.returncode != 0:
            raise SystemExit(f"rank failed: exit {worker.returncode}")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    return time.perf_counter() - started, reports


# -- the run ---------------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="raw size of the synthetic model (default 1024)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one, deleted after)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import boto3
    from nginx_cache import NginxCache

    import shardstore
    from shardstore.store import open_store

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with tempfile.TemporaryDirectory(prefix="bench-fanout-", dir=args.work) as tmp:
        work = Path(tmp)
        model = make_model(work / "model", args.size_mb)
        rows: list[Row] = []
        with moto_server(work) as (endpoint, moto):
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="fanout")
            store_url = "s3://fanout/models"
            pushed = shardstore.push(model, REF, store=open_store(store_url, endpoint_url=endpoint))
            print(f"model: {fmt_bytes(pushed.raw_bytes)} raw, {fmt_bytes(pushed.stored_bytes)} stored in "
                  f"{pushed.shards_total} shards; {args.clients} clients", flush=True)

            def measure(mode: str, server: Server, mirror: str | None, other: list[tuple[str, int, bool]],
                        note: str = "") -> Row:
                before_bytes, before_cpu = server.bytes_out(), server.cpu()
                before_other = {name: cpu_seconds(pid, tree) for name, pid, tree in other}
                wall, client_bytes, _reports = run_clients(args.clients, server.address, mirror)
                row = Row(mode, args.clients, round(wall, 2), server.bytes_out() - before_bytes,
                          round(server.cpu() - before_cpu, 2),
                          round(sum(cpu_seconds(pid, tree) - before_other[name] for name, pid, tree in other), 2),
                          "+".join(name for name, _pid, _tree in other), client_bytes, note)
                print(row, flush=True)
                return row

            with registry(store_url, endpoint, work, sign=False) as server:
                rows.append(measure("(a) gRPC stream", server, None, [("moto", moto.pid, False)]))
            with registry(store_url, endpoint, work, sign=True) as server:
                rows.append(measure("(b) S3 signed URLs", server, None, [("moto", moto.pid, False)]))
            with registry(store_url, endpoint, work, sign=False) as server, \
                    NginxCache(work / "nginx", server.http_address, workers=2) as nginx:
                assert nginx.process is not None
                others = [("moto", moto.pid, False), ("nginx", nginx.process.pid, True)]
                rows.append(measure("(c) nginx, cold cache", server, nginx.url, others, "first wave fills it"))
                rows.append(measure("(c) nginx, warm cache", server, nginx.url, others, "a second wave"))

            coop_rows = []
            for cooperate in (False, True):
                with registry(store_url, endpoint, work, sign=False) as server:
                    before_bytes, before_cpu = server.bytes_out(), server.cpu()
                    wall, reports = run_ranks(args.ranks, server.address, cooperate)
                    coop_rows.append({
                        "mode": f"{args.ranks} ranks, {'cooperative' if cooperate else 'each alone'}",
                        "wall_s": round(max(r["wall"] for r in reports), 2),
                        "process_wall_s": round(wall, 2),
                        "server_bytes_out": server.bytes_out() - before_bytes,
                        "server_cpu_s": round(server.cpu() - before_cpu, 2),
                        "fetched_bytes_per_rank": [r["fetched_bytes"] for r in reports],
                        "exchanged_bytes_per_rank": [r.get("exchanged_bytes", 0) for r in reports],
                    })
                    print(coop_rows[-1], flush=True)

        base = rows[0]
        print()
        print(f"## 16 clients x {fmt_bytes(pushed.raw_bytes)} model ({fmt_bytes(pushed.stored_bytes)} stored)")
        print("| mode | wall s | x (a) | server bytes out | % of (a) | server CPU s | other CPU s | note |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for row in rows:
            share = 100 * row.server_bytes_out / base.server_bytes_out if base.server_bytes_out else 0.0
            print(f"| {row.mode} | {row.wall_s:.1f} | {row.wall_s / base.wall_s:.2f} | "
                  f"{fmt_bytes(row.server_bytes_out)} | {share:.2f} % | {row.server_cpu_s:.1f} | "
                  f"{row.other_cpu_s:.1f} ({row.other}) | {row.note} |")
        print()
        print(f"## {args.ranks} ranks load the model (state dict in memory, gloo)")
        print("| mode | wall s | server bytes out | server CPU s | fetched per rank | received from peers per rank |")
        print("| --- | ---: | ---: | ---: | --- | --- |")
        for coop in coop_rows:
            print(f"| {coop['mode']} | {coop['wall_s']:.1f} | {fmt_bytes(coop['server_bytes_out'])} | "
                  f"{coop['server_cpu_s']:.1f} | {', '.join(fmt_bytes(b) for b in coop['fetched_bytes_per_rank'])} | "
                  f"{', '.join(fmt_bytes(b) for b in coop['exchanged_bytes_per_rank'])} |")
        if coop_rows[0]["server_bytes_out"]:
            print(f"\ncooperative / alone registry bytes: "
                  f"{coop_rows[1]['server_bytes_out'] / coop_rows[0]['server_bytes_out']:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"model": {"raw": pushed.raw_bytes, "stored": pushed.stored_bytes,
                                                             "shards": pushed.shards_total},
                                                   "fanout": [asdict(r) for r in rows], "cooperative": coop_rows},
                                                  indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], sys.argv[4] if len(sys.argv) > 4 else "")
    elif len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1")
    else:
        main()
