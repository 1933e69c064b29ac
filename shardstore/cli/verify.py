"""``shardstore verify``: is every ref, manifest, shard and blob sound? ``--repair`` fixes what it safely can."""

from __future__ import annotations

import argparse
from pathlib import Path

from shardstore.cli.common import EXIT_ERROR, Commands, add_common_options, emit
from shardstore.errors import InvalidInputError


def cmd_verify(args: argparse.Namespace) -> None:
    from shardstore.cli.progress import ProgressBars
    from shardstore.repo.repository import Repository
    from shardstore.repo.verify import verify
    from shardstore.store import open_store
    from shardstore.store.cache import ShardCache

    repo = Repository(open_store(args.store))
    if args.cache is not None and not Path(args.cache).is_dir():  # named, so meant: not "0 entries, healthy"
        raise InvalidInputError(f"--cache {args.cache}: no such shard cache folder")
    # The client's shard cache is checked when named, and always by --repair (the default one).
    cache = ShardCache(args.cache) if args.cache is not None or args.repair else None
    with ProgressBars() as bars:
        report = verify(repo, read_data=args.read_data, repair=args.repair, cache=cache,
                        progress=bars if args.progress else None)

    def human() -> str:
        depth = "every byte read and decoded" if args.read_data else "structure and sizes"
        layout = f"format version {report.store_version}" + (
            "" if report.has_config else " (made before the store config existed: the next push writes it)")
        lines = [f"checked {repo.store.url}, {layout} ({depth}): {report.refs} refs, {report.manifests} manifests, "
                 f"{report.shards} shards, {report.blobs} blobs, {report.unreferenced} unreferenced objects"
                 + (f", {report.cache_entries} cache entries in {cache.root}" if cache is not None else "")
                 + f" in {report.seconds:.2f} s"]
        lines += [f"  repaired: {r}" for r in report.repaired]
        lines += [f"  problem: {p}" for p in report.problems]
        lines.append("healthy" if report.healthy else f"{len(report.problems)} problems")
        return "\n".join(lines)

    emit(args, report.to_json(), human)
    if not report.healthy:
        raise SystemExit(EXIT_ERROR)


def register(commands: Commands) -> None:
    p = commands.add_parser("verify", help="check that every ref, manifest, shard and blob of a store is sound")
    p.add_argument("--read-data", action="store_true",
                   help="also read every object, check its digest and decode every stream against its checksum")
    p.add_argument("--repair", action="store_true",
                   help="delete corrupt cache entries and corrupt objects nothing references; rewrite corrupt "
                        "referenced shards from an intact cached copy; never delete a referenced object")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="also check this shard cache (default with --repair: $SHARDSTORE_CACHE, else "
                        "~/.cache/shardstore)")
    add_common_options(p)
    p.set_defaults(func=cmd_verify)
