"""The ``shardstore`` command: push, pull, ls, inspect (and, as they land, serve, verify, gc, bench).

Every command takes ``--json`` and then prints exactly one JSON object on
stdout. Mistakes in the input end in one line on stderr and exit status 1 (2
for bad usage); a traceback means a bug in shardstore.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shardstore.codecs import DEFAULT_CODEC_NAME, codec_names
from shardstore.errors import InvalidInputError, ShardstoreError
from shardstore.repo.chunking import DEFAULT_CHUNK_BYTES
from shardstore.store import STORE_ENV

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``4MiB``, ``512KiB``, ``1048576``."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    number, factor = lowered, 1
    for suffix, unit in units.items():
        if lowered.endswith(suffix):
            number, factor = lowered[: -len(suffix)].strip(), unit
            break
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


# -- commands ---------------------------------------------------------------------


def _emit(args: argparse.Namespace, figures: dict[str, Any], human: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    elif not args.quiet:
        print(human())


def cmd_push(args: argparse.Namespace) -> None:
    from shardstore.api import push

    report = push(args.src, args.ref, store=args.store, codec=args.codec, chunk_bytes=args.chunk_size,
                  threads=args.threads, progress=args.progress)
    figures = report.to_json()

    def human() -> str:
        return (
            f"pushed {report.ref} (manifest {report.manifest_id[:12]})\n"
            f"  {report.tensors} tensors, {human_bytes(report.raw_bytes)} raw -> "
            f"{human_bytes(report.stored_bytes)} stored (ratio {figures['ratio']:.4f}, codec {report.codec})\n"
            f"  uploaded {human_bytes(report.uploaded_bytes)}: {report.shards_uploaded}/{report.shards_total} shards, "
            f"{report.blobs_uploaded} blobs, in {report.seconds:.2f} s"
        )

    _emit(args, figures, human)


def cmd_pull(args: argparse.Namespace) -> None:
    from shardstore.api import pull

    report = pull(args.ref, args.dest, store=args.store, only=args.only, threads=args.threads,
                  progress=args.progress, cache=args.cache)

    def human() -> str:
        return (
            f"pulled {report.ref} into {report.dest}: {report.tensors} tensors, {report.files} files, "
            f"{human_bytes(report.raw_bytes)} of weights\n"
            f"  transferred {human_bytes(report.transferred_bytes)} in {report.shards_fetched} shards "
            f"({report.shards_cached} from cache), {report.seconds:.2f} s"
        )

    _emit(args, report.to_json(), human)


def cmd_ls(args: argparse.Namespace) -> None:
    from shardstore.repo.repository import Repository
    from shardstore.store import open_store

    repo = Repository(open_store(args.store))
    models: list[dict[str, Any]] = []
    for ref, manifest_id in repo.list_refs():
        manifest = repo.get_manifest(manifest_id)
        models.append({"ref": str(ref), "manifest_id": manifest_id, "raw_bytes": manifest.raw_bytes,
                       "stored_bytes": manifest.stored_bytes, "tensors": len(manifest.tensors)})

    def human() -> str:
        if not models:
            return f"no models in {repo.store.url}"
        width = max(len(m["ref"]) for m in models)
        lines = [f"{'REF':<{width}}  MANIFEST      TENSORS        RAW     STORED"]
        lines += [
            f"{m['ref']:<{width}}  {m['manifest_id'][:12]}  {m['tensors']:>7}  {human_bytes(m['raw_bytes']):>9}  "
            f"{human_bytes(m['stored_bytes']):>9}"
            for m in models
        ]
        return "\n".join(lines)

    _emit(args, {"store": repo.store.url, "models": models}, human)


def cmd_inspect(args: argparse.Namespace) -> None:
    from shardstore.repo.inspect import describe
    from shardstore.repo.repository import Repository, resolve_ref_text
    from shardstore.store import open_store

    repo = Repository(open_store(args.store))
    ref, manifest_id, manifest = resolve_ref_text(repo, args.ref)
    info = describe(manifest, str(ref), manifest_id)

    def human() -> str:
        width = max((len(n) for n in info["tensors"]), default=4)
        lines = [f"{info['ref']}  manifest {manifest_id}",
                 f"{'TENSOR':<{width}}  {'DTYPE':<7} {'SHAPE':<16} {'RAW':>10} {'STORED':>10} {'RATIO':>6}  SHARDS"]
        for name, t in info["tensors"].items():
            shape = "x".join(map(str, t["shape"])) or "scalar"
            lines.append(
                f"{name:<{width}}  {t['dtype']:<7} {shape:<16} {human_bytes(t['raw_bytes']):>10} "
                f"{human_bytes(t['stored_bytes']):>10} {t['ratio']:>6.3f}  {len(t['shards'])}"
            )
        lines.append(
            f"total: {len(info['tensors'])} tensors, {human_bytes(info['raw_bytes'])} raw, "
            f"{human_bytes(info['stored_bytes'])} stored in {info['shards']} shards (ratio {info['ratio']:.4f}), "
            f"{len(info['files'])} files"
        )
        return "\n".join(lines)

    _emit(args, info, human)


def cmd_serve(args: argparse.Namespace) -> None:
    import asyncio
    import logging

    from shardstore.rpc.server import serve
    from shardstore.store import open_store

    store = open_store(args.store)
    logging.basicConfig(level=logging.WARNING if args.quiet or args.json else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)

    def ready(address: str) -> None:
        # The bound address (the port, when --port 0) is how scripts and tests find the server.
        if args.json:
            print(json.dumps({"address": address, "store": store.url}), flush=True)
        elif not args.quiet:
            print(f"serving {store.url} on grpc://{address} (Ctrl-C to stop)", flush=True)

    options: dict[str, Any] = {"cache_bytes": args.cache_size}
    if args.max_rate is not None:
        options["pace_bytes_per_s"] = args.max_rate
    asyncio.run(serve(store, args.host, args.port, on_ready=ready, grace=args.grace, **options))


def cmd_verify(args: argparse.Namespace) -> None:
    from shardstore.repo.repository import Repository
    from shardstore.repo.verify import verify
    from shardstore.store import open_store

    repo = Repository(open_store(args.store))
    report = verify(repo, read_data=args.read_data)

    def human() -> str:
        depth = "every byte read and decoded" if args.read_data else "structure and sizes"
        lines = [f"checked {repo.store.url} ({depth}): {report.refs} refs, {report.manifests} manifests, "
                 f"{report.shards} shards, {report.blobs} blobs in {report.seconds:.2f} s"]
        lines += [f"  problem: {p}" for p in report.problems]
        lines.append("healthy" if report.healthy else f"{len(report.problems)} problems")
        return "\n".join(lines)

    _emit(args, report.to_json(), human)
    if not report.healthy:
        raise SystemExit(EXIT_ERROR)


def cmd_bench_codecs(args: argparse.Namespace) -> None:
    from shardstore.codecs.benchmark import format_codec_table, run_codec_benchmark
    from shardstore.format.safetensors_io import read_file_header

    read_file_header(args.file)  # a bad file is a one-line error before any work starts
    result = run_codec_benchmark(args.file, threads=args.threads, piece_bytes=args.piece_size)
    _emit(args, result, lambda: format_codec_table(result))


# -- parser -----------------------------------------------------------------------


def parse_storage_option(text: str) -> tuple[str, Any]:
    """``key=value``; the value is JSON when it parses as JSON (numbers, booleans, objects), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _common(parser: argparse.ArgumentParser, store: bool = True) -> None:
    if store:
        parser.add_argument("--store", metavar="URL", default=None,
                            help=f"store URL or folder (default: ${STORE_ENV}, else ~/.local/share/shardstore)")
        parser.add_argument("--storage-option", "-o", type=parse_storage_option, action="append", default=[],
                            metavar="KEY=VALUE", dest="storage_options",
                            help="passed to the store backend, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of figures on stdout, nothing else")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardstore", description=__doc__.splitlines()[0] if __doc__ else None)
    from shardstore import __version__

    parser.add_argument("--version", action="version", version=f"shardstore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("push", help="push a .safetensors file or a model folder as NAME:TAG (or to grpc://HOST:PORT/NAME:TAG)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("--codec", default=DEFAULT_CODEC_NAME, help=f"lossless codec: {', '.join(codec_names())}")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help="target raw size of a piece / shard (default 4MiB)")
    p.add_argument("--threads", type=int, default=None, help="encoding threads (default: all cores)")
    _common(p)
    p.set_defaults(func=cmd_push)

    p = commands.add_parser("pull", help="write NAME:TAG (or grpc://HOST:PORT/NAME:TAG) into folder DEST")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--only", nargs="+", metavar="GLOB", help="only tensors whose names match these globs")
    p.add_argument("--threads", type=int, default=None, help="decoding threads (default: all cores)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="shard cache for grpc:// pulls (default: $SHARDSTORE_CACHE, else ~/.cache/shardstore)")
    _common(p)
    p.set_defaults(func=cmd_pull)

    p = commands.add_parser("serve", help="serve a store over gRPC")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)")
    p.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="SIZE",
                   help="in-memory cache of hot shards (default 256MiB)")
    p.add_argument("--max-rate", type=parse_size, default=None, metavar="BYTES_PER_S",
                   help="pace all sends to this rate, e.g. 125MB for a 1 Gbit/s link (benchmarks)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds calls in flight get on shutdown (default 10)")
    _common(p)
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("ls", help="list the models in a store")
    _common(p)
    p.set_defaults(func=cmd_ls)

    p = commands.add_parser("inspect", help="show the tensors, sizes and ratios of NAME:TAG")
    p.add_argument("ref", metavar="NAME:TAG")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser("verify", help="check that every ref, manifest, shard and blob of a store is sound")
    p.add_argument("--read-data", action="store_true",
                   help="also read every object, check its digest and decode every stream against its checksum")
    _common(p)
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser("bench", help="benchmarks that print a table side by side with the peers")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = benches.add_parser("codecs", help="ratio and GB/s of every codec and peer on FILE, per dtype")
    b.add_argument("file", metavar="FILE", help="a .safetensors file (BF16 and FP16 copies are made from it)")
    b.add_argument("--threads", type=int, default=None, help="the 'all threads' column (default: all cores)")
    b.add_argument("--piece-size", type=parse_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help="raw size of the pieces coded independently, as push cuts them (default 4MiB)")
    _common(b, store=False)
    b.set_defaults(func=cmd_bench_codecs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.progress = not (args.json or args.quiet)
    try:
        options = dict(getattr(args, "storage_options", None) or [])
        if options:
            from shardstore.store import open_store

            if args.store and args.store.startswith("grpc://"):
                raise InvalidInputError("--storage-option applies to stores, not to grpc:// servers")
            args.store = open_store(args.store, **options)
        args.func(args)
    except ShardstoreError as exc:
        print(f"shardstore {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"shardstore {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a user's path or disk: report it, don't dump a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"shardstore {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
