"""``shardstore gc``: delete what no ref reaches, safely beside pushes in flight."""

from __future__ import annotations

import argparse

from shardstore.cli.common import Commands, add_common_options, emit, human_bytes, parse_seconds


def cmd_gc(args: argparse.Namespace) -> None:
    from shardstore.cli.progress import ProgressBars
    from shardstore.repo.gc import collect
    from shardstore.repo.repository import Repository
    from shardstore.store import open_store

    repo = Repository(open_store(args.store))
    with ProgressBars() as bars:
        report = collect(repo, grace=args.grace, dry_run=args.dry_run, progress=bars if args.progress else None)

    def human() -> str:
        verb = "would delete" if args.dry_run else "deleted"
        if report.pushes_in_flight and not args.dry_run:
            return (f"{report.pushes_in_flight} pushes in flight in {report.store}: nothing deleted "
                    "(run gc again when they are done)")
        lines = [
            f"{report.store}: {report.refs} refs reach {report.reachable_manifests} manifests, "
            f"{report.reachable_shards} shards, {report.reachable_blobs} blobs",
            f"{verb} {report.deleted_manifests} manifests, {report.deleted_shards} shards, "
            f"{report.deleted_blobs} blobs ({human_bytes(report.bytes_freed)}); kept {report.kept_young} "
            f"unreachable objects younger than {report.grace_s:g} s",
        ]
        if report.pushes_in_flight:
            lines.append(f"{report.pushes_in_flight} pushes in flight: a real run would delete nothing now")
        return "\n".join(lines)

    emit(args, report.to_json(), human)


def register(commands: Commands) -> None:
    from shardstore.repo.gc import DEFAULT_GRACE_S

    p = commands.add_parser("gc", help="delete the objects no ref reaches (never those of pushes in flight)")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    p.add_argument("--grace", type=parse_seconds, default=DEFAULT_GRACE_S, metavar="SECONDS",
                   help=f"keep unreachable objects younger than this (default {DEFAULT_GRACE_S:g})")
    add_common_options(p)
    p.set_defaults(func=cmd_gc)
