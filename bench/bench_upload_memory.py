"""Server memory under concurrent uploads: N clients each upload one big object at once.

    .venv/bin/python bench/bench_upload_memory.py [--clients 2] [--size 1.5GiB] [--dir /tmp/bench-upload]

One ``shardstore serve`` process over a local store; N client processes (each its own
process, as real pushers would be) start together and each upload one blob of ``--size``
bytes through the ``UploadObjects`` RPC, 1 MiB per message, as ``shardstore push`` does.
The bytes are generated piece by piece (a random 1 MiB block, each piece stamped with its
client and index, so every object is distinct), hashed once to get the id and then sent, so
no process ever holds a whole object. Reported: the server's RSS before, its peak (VmHWM)
and after, the growth, seconds and the aggregate upload rate; and whether each stored
object hashes to its id. Before uploads were streamed to the store, two 1.5 GiB uploads
took a server from 117 MiB to 3.2 GiB (issue 14).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import blake3

from shardstore.cli.common import parse_size

PIECE = 1 << 20


def _pieces(client: int, size: int, block: bytes) -> Iterator[bytes]:
    for index, start in enumerate(range(0, size, PIECE)):
        stamp = f"{client}:{index}:".encode()
        yield (stamp + block[len(stamp):])[: min(PIECE, size - start)]


def _upload(address: str, client: int, size: int, block: bytes, start: mp.synchronize.Event,  # type: ignore[name-defined]
            results: mp.Queue) -> None:  # type: ignore[type-arg]
    import grpc

    from shardstore.rpc._generated import registry_pb2 as pb
    from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc

    hasher = blake3.blake3()
    for piece in _pieces(client, size, block):
        hasher.update(piece)
    blob_id = hasher.hexdigest()

    def chunks() -> Iterator[pb.UploadChunk]:
        offset = 0
        for piece in _pieces(client, size, block):
            yield pb.UploadChunk(kind=pb.OBJECT_KIND_BLOB, id=blob_id, offset=offset, total_size=size, data=piece)
            offset += len(piece)

    start.wait()
    began = time.monotonic()
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        response = pb_grpc.RegistryStub(channel).UploadObjects(chunks(), timeout=1800)  # type: ignore[no-untyped-call]
    results.put({"client": client, "id": blob_id, "seconds": time.monotonic() - began,
                 "committed": list(response.committed_ids)})


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--size", type=parse_size, default=parse_size("1.5GiB"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-upload"))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    store = args.dir / "store"
    server = subprocess.Popen([sys.executable, "-m", "shardstore", "serve", "--store", str(store), "--port", "0",
                               "--json", "--quiet"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        address = json.loads(server.stdout.readline())["address"]
        time.sleep(1.0)
        before = _rss_kib(server.pid, "VmRSS")
        block = os.urandom(PIECE)
        start = mp.Event()
        results: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        workers = [mp.Process(target=_upload, args=(address, c, args.size, block, start, results))
                   for c in range(args.clients)]
        for worker in workers:
            worker.start()
        time.sleep(2.0)  # let each client hash its object first
        began = time.monotonic()
        start.set()
        done = [results.get(timeout=1800) for _ in workers]
        wall = time.monotonic() - began
        for worker in workers:
            worker.join()
        peak = _rss_kib(server.pid, "VmHWM")
        after = _rss_kib(server.pid, "VmRSS")
        intact = all(
            blake3.blake3((store / "blobs" / r["id"][:2] / r["id"]).read_bytes()).hexdigest() == r["id"]
            and r["committed"] == [r["id"]] for r in done)
        row = {"clients": args.clients, "object_bytes": args.size, "server_rss_before_mib": round(before / 1024),
               "server_peak_mib": round(peak / 1024), "server_rss_after_mib": round(after / 1024),
               "peak_growth_mib": round((peak - before) / 1024), "seconds": round(wall, 1),
               "mb_per_s": round(args.clients * args.size / wall / 1e6, 1), "stored_objects_intact": intact}
        print(json.dumps(row))
        print(f"| {args.clients} x {args.size / (1 << 30):.1f} GiB | {row['server_rss_before_mib']} MiB | "
              f"{row['server_peak_mib']} MiB | +{row['peak_growth_mib']} MiB | {row['server_rss_after_mib']} MiB | "
              f"{row['seconds']} s | {row['mb_per_s']} MB/s | {'yes' if intact else 'NO'} |")
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
