"""Commands on models in a registry: push, pull, ls, inspect."""

from __future__ import annotations

import argparse
from typing import Any

from shardstore.cli.common import Commands, add_common_options, emit, human_bytes, parse_size
from shardstore.codecs import DEFAULT_CODEC_NAME, codec_names
from shardstore.repo.chunking import DEFAULT_CHUNK_BYTES


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

    emit(args, figures, human)


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

    emit(args, report.to_json(), human)


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

    emit(args, {"store": repo.store.url, "models": models}, human)


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

    emit(args, info, human)


def register(commands: Commands) -> None:
    p = commands.add_parser("push", help="push a .safetensors file or a model folder as NAME:TAG (or to grpc://HOST:PORT/NAME:TAG)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("--codec", default=DEFAULT_CODEC_NAME, help=f"lossless codec: {', '.join(codec_names())}")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help="target raw size of a piece / shard (default 4MiB)")
    p.add_argument("--threads", type=int, default=None, help="encoding threads (default: all cores)")
    add_common_options(p)
    p.set_defaults(func=cmd_push)

    p = commands.add_parser("pull", help="write NAME:TAG (or grpc://HOST:PORT/NAME:TAG) into folder DEST")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--only", nargs="+", metavar="GLOB", help="only tensors whose names match these globs")
    p.add_argument("--threads", type=int, default=None, help="decoding threads (default: all cores)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="shard cache for grpc:// pulls (default: $SHARDSTORE_CACHE, else ~/.cache/shardstore)")
    add_common_options(p)
    p.set_defaults(func=cmd_pull)

    p = commands.add_parser("ls", help="list the models in a store")
    add_common_options(p)
    p.set_defaults(func=cmd_ls)

    p = commands.add_parser("inspect", help="show the tensors, sizes and ratios of NAME:TAG")
    p.add_argument("ref", metavar="NAME:TAG")
    add_common_options(p)
    p.set_defaults(func=cmd_inspect)
