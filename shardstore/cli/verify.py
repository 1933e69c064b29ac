"""``shardstore verify``: is every ref, manifest, shard and blob of a store sound?"""

from __future__ import annotations

import argparse

from shardstore.cli.common import EXIT_ERROR, Commands, add_common_options, emit


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

    emit(args, report.to_json(), human)
    if not report.healthy:
        raise SystemExit(EXIT_ERROR)


def register(commands: Commands) -> None:
    p = commands.add_parser("verify", help="check that every ref, manifest, shard and blob of a store is sound")
    p.add_argument("--read-data", action="store_true",
                   help="also read every object, check its digest and decode every stream against its checksum")
    add_common_options(p)
    p.set_defaults(func=cmd_verify)
