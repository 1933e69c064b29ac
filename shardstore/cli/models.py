"""Commands on models in a registry: push, pull, ls, inspect."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from shardstore.cli.common import (
    Commands,
    add_client_options,
    add_common_options,
    client_options,
    emit,
    human_bytes,
    parse_size,
)
from shardstore.codecs import DEFAULT_CODEC_NAME, codec_names
from shardstore.errors import InvalidInputError
from shardstore.repo.chunking import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    from shardstore.repo.registry import Registry


def cmd_push(args: argparse.Namespace) -> None:
    from shardstore.api import push
    from shardstore.cli.progress import ProgressBars

    policy = None
    if args.lossy or args.policy or args.min_snr is not None or args.max_ratio is not None:
        from shardstore.repo.policy import build_policy

        policy = build_policy(args.lossy, args.policy, codec=args.codec, min_snr_db=args.min_snr,
                              max_ratio=args.max_ratio)
    with ProgressBars() as bars:
        report = push(args.src, args.ref, store=args.store, codec=args.codec, chunk_bytes=args.chunk_size,
                      threads=args.threads, progress=bars if args.progress else None, policy=policy, base=args.base,
                      include=args.include, exclude=args.exclude, **client_options(args))
    figures = report.to_json()

    def human() -> str:
        return (
            f"pushed {report.ref} (manifest {report.manifest_id[:12]})\n"
            f"  {report.tensors} tensors, {human_bytes(report.raw_bytes)} raw -> "
            f"{human_bytes(report.stored_bytes)} stored (ratio {figures['ratio']:.4f}, codec {report.codec})\n"
            f"  uploaded {human_bytes(report.uploaded_bytes)}: {report.shards_uploaded}/{report.shards_total} shards, "
            f"{report.blobs_uploaded} blobs, in {report.seconds:.2f} s\n"
            f"  encoded {report.pieces_encoded} pieces ({human_bytes(report.bytes_encoded)}), reused "
            f"{report.pieces_reused} already stored ({human_bytes(report.bytes_reused)})"
        ) + _lossy_summary(report.per_tensor) + _skipped_summary(report.skipped_files)

    emit(args, figures, human)


def _skipped_summary(skipped: dict[str, str]) -> str:
    """What the push left out and why, one line per reason (pickles beside safetensors, globs)."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped.items():
        by_reason.setdefault(reason, []).append(path)
    lines = []
    for reason, paths in by_reason.items():
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        lines.append(f"\n  skipped {shown}: {reason}")
    return "".join(lines)


def _lossy_summary(per_tensor: dict[str, dict[str, Any]]) -> str:
    """One line on the quantized tensors of a push, or nothing when every tensor is lossless."""
    lossy = [t for t in per_tensor.values() if "quality" in t]
    if not lossy:
        return ""
    snrs = [t["quality"]["snr_db"] for t in lossy if t["quality"]["snr_db"] is not None]
    codecs = sorted({t["codec"].split("+")[0] for t in lossy})
    worst = f", lowest SNR {min(snrs):.1f} dB" if snrs else ""
    return f"\n  lossy: {len(lossy)} tensors ({', '.join(codecs)}){worst}; see inspect for each"


def cmd_pull(args: argparse.Namespace) -> None:
    from shardstore.api import pull
    from shardstore.cli.progress import ProgressBars

    if args.no_weights and args.include:
        raise InvalidInputError("--no-weights and --include exclude each other: --include selects weights to pull")
    with ProgressBars() as bars:
        report = pull(args.ref, args.dest, store=args.store, only=args.include, exclude=args.exclude,
                      weights=not args.no_weights, threads=args.threads,
                      progress=bars if args.progress else None, cache=args.cache, **client_options(args))

    def human() -> str:
        return (
            f"pulled {report.ref} into {report.dest}: {report.tensors} tensors, {report.files} files, "
            f"{human_bytes(report.raw_bytes)} of weights\n"
            f"  transferred {human_bytes(report.transferred_bytes)} in {report.shards_fetched} shards "
            f"({report.shards_cached} from cache), {report.seconds:.2f} s"
        )

    emit(args, report.to_json(), human)


def cmd_snapshot(args: argparse.Namespace) -> None:
    from shardstore.api import snapshot_report
    from shardstore.cli.progress import ProgressBars

    with ProgressBars() as bars:
        report = snapshot_report(args.ref, store=args.store, cache=args.cache, threads=args.threads,
                                 progress=bars if args.progress else None, **client_options(args))
    if args.json:
        emit(args, report.to_json(), str)
    elif not args.quiet:
        print(report.path)  # alone on stdout, as `hf download` prints its folder: `cd $(shardstore snapshot REF)`


def _registry(args: argparse.Namespace, location: str | None) -> Registry:
    """The registry at ``location`` (a server URL), else at ``--store``."""
    from shardstore.registry import open_registry

    return open_registry(location if location is not None else args.store, use_cache=False,
                         **client_options(args))


def cmd_ls(args: argparse.Namespace) -> None:
    models: list[dict[str, Any]] = []
    with _registry(args, None) as registry:
        url = registry.url
        for ref, manifest_id in registry.list_refs():
            manifest = registry.get_manifest(manifest_id)
            models.append({"ref": str(ref), "manifest_id": manifest_id, "raw_bytes": manifest.raw_bytes,
                           "stored_bytes": manifest.stored_bytes, "tensors": len(manifest.tensors),
                           "created": manifest.created})

    def human() -> str:
        if not models:
            return f"no models in {url}"
        width = max(len(m["ref"]) for m in models)
        lines = [f"{'REF':<{width}}  MANIFEST      CREATED (UTC)     TENSORS        RAW     STORED"]
        lines += [
            f"{m['ref']:<{width}}  {m['manifest_id'][:12]}  {_created_text(m['created']):<16}  {m['tensors']:>7}  "
            f"{human_bytes(m['raw_bytes']):>9}  {human_bytes(m['stored_bytes']):>9}"
            for m in models
        ]
        return "\n".join(lines)

    emit(args, {"store": url, "models": models}, human)


def _created_text(created: str | None) -> str:
    """``2026-01-31 12:00`` for the ls table; ``-`` for manifests made before they carried a time."""
    return created[:16].replace("T", " ") if created else "-"


def cmd_inspect(args: argparse.Namespace) -> None:
    from shardstore.registry import locate
    from shardstore.repo.inspect import describe
    from shardstore.repo.repository import resolve_ref_text

    location, ref_text = locate(args.ref, args.store)
    with _registry(args, location if isinstance(location, str) else None) as registry:
        ref, manifest_id, manifest = resolve_ref_text(registry, ref_text)
    info = describe(manifest, str(ref), manifest_id)

    def human() -> str:
        width = max((len(n) for n in info["tensors"]), default=4)
        created = f"  created {_created_text(info['created'])} UTC" if info["created"] else ""
        lines = [f"{info['ref']}  manifest {manifest_id}{created}",
                 f"{'TENSOR':<{width}}  {'DTYPE':<7} {'SHAPE':<16} {'RAW':>10} {'STORED':>10} {'RATIO':>6}  "
                 f"{'SNR dB':>6}  {'CODEC':<34} SHARDS"]
        for name, t in info["tensors"].items():
            shape = "x".join(map(str, t["shape"])) or "scalar"
            lines.append(
                f"{name:<{width}}  {t['dtype']:<7} {shape:<16} {human_bytes(t['raw_bytes']):>10} "
                f"{human_bytes(t['stored_bytes']):>10} {t['ratio']:>6.3f}  {_snr_text(t):>6}  {t['codec']:<34} "
                f"{len(t['shards'])}"
            )
        lines.append(
            f"total: {len(info['tensors'])} tensors, {human_bytes(info['raw_bytes'])} raw, "
            f"{human_bytes(info['stored_bytes'])} stored in {info['shards']} shards (ratio {info['ratio']:.4f}), "
            f"{len(info['files'])} files"
        )
        return "\n".join(lines)

    emit(args, info, human)


def cmd_diff(args: argparse.Namespace) -> None:
    from shardstore.errors import InvalidInputError
    from shardstore.repo.diff import diff_refs
    from shardstore.repo.repository import Repository
    from shardstore.rpc import is_grpc_url
    from shardstore.store import open_store

    for ref in (args.a, args.b):
        if is_grpc_url(ref):
            raise InvalidInputError(f"diff {ref}: diff reads a store (--store); a server shows the same figures "
                                    "on its web view's /compare page")
    report = diff_refs(Repository(open_store(args.store)), args.a, args.b)

    def human() -> str:
        counts = report.to_json()["tensors"]
        lines = [f"{report.a} -> {report.b}: {counts['unchanged']} tensors unchanged, {counts['changed']} changed, "
                 f"{counts['added']} added, {counts['removed']} removed",
                 f"  a client holding {report.a} fetches {human_bytes(report.fetch_bytes)} "
                 f"({report.fetch_shards} shards, {len(report.fetch_files)} files) "
                 f"of {human_bytes(report.full_bytes)}; "
                 f"{report.shared_shards} shards ({human_bytes(report.shared_bytes)}) shared"]
        lines += [f"  changed  {c.name}  {c.codec[0]} -> {c.codec[1]}" if c.codec[0] != c.codec[1]
                  else f"  changed  {c.name}" for c in report.changed]
        lines += [f"  added    {name}" for name in report.added]
        lines += [f"  removed  {name}" for name in report.removed]
        for kind in ("changed", "added", "removed"):
            lines += [f"  file {kind:<8} {path}" for path in report.files[kind]]
        return "\n".join(lines)

    emit(args, report.to_json(), human)


def _snr_text(figures: dict[str, Any]) -> str:
    """A tensor's SNR for the inspect table: '-' when lossless, 'exact' when nothing was lost."""
    quality = figures.get("quality")
    if quality is None:
        return "-"
    return "exact" if quality["snr_db"] is None else f"{quality['snr_db']:.1f}"


def register(commands: Commands) -> None:
    p = commands.add_parser("push", help="push a .safetensors file or a model folder as NAME:TAG (or to grpc://HOST:PORT/NAME:TAG)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("--codec", default=DEFAULT_CODEC_NAME,
                   help=f"lossless codec: {', '.join(codec_names(lossless=True))}")
    p.add_argument("--lossy", action="append", default=[], metavar="[PATTERN=]CODEC[:OPTS]",
                   help="quantize or prune matching tensors, e.g. '*.weight=int8', 'int4:group=128', 'auto' "
                        "(repeatable, first match wins; norms, biases, 1-D and small tensors stay lossless). "
                        f"Lossy codecs: {', '.join(codec_names(lossless=False))}")
    p.add_argument("--policy", metavar="FILE", default=None, help="per-tensor policy, JSON or YAML (docs/lossy.md)")
    p.add_argument("--min-snr", type=float, default=None, metavar="DB",
                   help="--lossy auto: the smallest codec with at least this SNR, per tensor")
    p.add_argument("--max-ratio", type=float, default=None, metavar="R",
                   help="--lossy auto: the best SNR floor that keeps stored / raw bytes <= R")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help="target raw size of a piece / shard (default 4MiB)")
    p.add_argument("--base", metavar="NAME:TAG", default=None,
                   help="a stored model this one derives from (same store or server): store each piece as its "
                        "XOR with the base's, or the base's own, where smaller; pulls then read the base's shards")
    p.add_argument("--threads", type=int, default=None, help="encoding threads (default: all cores)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="push only the folder's files whose path or name matches, e.g. '*.safetensors' (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="never push the folder's files whose path or name matches, e.g. 'onnx/*' (repeatable)")
    add_common_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_push)

    p = commands.add_parser("pull", help="write NAME:TAG (or grpc://HOST:PORT/NAME:TAG) into folder DEST")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--include", "--only", action="append", default=[], metavar="GLOB", dest="include",
                   help="only tensors whose name (or safetensors file) matches, e.g. 'encoder.layer.2.*' "
                        "(repeatable; --only is the same)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out tensors whose name or file matches, and other files whose path or name "
                        "matches (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="decoding threads (default: all cores)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="shard cache for grpc:// pulls (default: $SHARDSTORE_CACHE, else ~/.cache/shardstore)")
    add_common_options(p)
    add_client_options(p)
    p.add_argument("--no-weights", action="store_true",
                   help="only the other files (config.json, tokenizer, the index...): no tensor is fetched")
    p.set_defaults(func=cmd_pull)

    p = commands.add_parser("snapshot", help="a Hugging Face style folder of NAME:TAG in the cache, written once per "
                                             "manifest and reused; prints its path")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("--threads", type=int, default=None, help="decoding threads (default: all cores)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="where snapshots/ (and the grpc:// shard cache) live (default: $SHARDSTORE_CACHE, "
                        "else ~/.cache/shardstore)")
    add_common_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_snapshot)

    p = commands.add_parser("ls", help="list the models in a store")
    add_common_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_ls)

    p = commands.add_parser("diff", help="what changed from NAME:A to NAME:B and what a client holding A fetches for B")
    p.add_argument("a", metavar="NAME:A")
    p.add_argument("b", metavar="NAME:B")
    add_common_options(p)
    p.set_defaults(func=cmd_diff)

    p = commands.add_parser("inspect", help="show the tensors, sizes and ratios of NAME:TAG")
    p.add_argument("ref", metavar="NAME:TAG")
    add_common_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_inspect)
