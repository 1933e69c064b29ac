"""Commands on refs alone: ``tag SRC DST`` and ``rm NAME:TAG``. No object is copied or deleted here (gc does that)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from shardstore.cli.common import Commands, add_client_options, add_common_options, emit
from shardstore.errors import InvalidInputError
from shardstore.repo.refs import Ref, parse_ref

if TYPE_CHECKING:
    from shardstore.repo.registry import Registry


def _open(args: argparse.Namespace, *texts: str) -> tuple[Registry, list[Ref], str]:
    """The registry the refs live in (a store, or the one server their URLs name) and the parsed refs.

    A ref is ``name:tag`` in ``--store`` (which may be ``grpc://HOST:PORT``) or ``grpc[s]://HOST:PORT/name:tag``;
    a tag never copies between registries, so every URL must name the same server.
    """
    from shardstore.cli.models import _registry
    from shardstore.rpc import is_grpc_url, split_grpc_url

    urls = [t for t in texts if is_grpc_url(t)]
    servers = {split_grpc_url(u)[0] for u in urls}
    if len(servers) > 1:
        raise InvalidInputError(f"{' and '.join(urls)}: refs on two servers; a tag stays within one registry")
    url = urls[0] if urls else args.store if isinstance(args.store, str) else None
    refs = [parse_ref((split_grpc_url(t)[1] or "latest") if is_grpc_url(t) else t) for t in texts]
    registry = _registry(args, url)
    where = registry.url
    return registry, refs, where.split("/", 3)[2] if is_grpc_url(where) else where


def cmd_tag(args: argparse.Namespace) -> None:
    registry, (src, dst), where = _open(args, args.src, args.dst)
    with registry:
        manifest_id = registry.tag(src, dst)
    emit(args, {"source": str(src), "ref": str(dst), "manifest_id": manifest_id, "registry": where},
         lambda: f"tagged {src} as {dst} (manifest {manifest_id[:12]}) in {where}")


def cmd_rm(args: argparse.Namespace) -> None:
    registry, refs, where = _open(args, *args.refs)
    refs = list(dict.fromkeys(refs))  # a ref named twice is removed once
    removed: list[dict[str, str]] = []
    with registry:
        # Every ref is looked up before any is removed: a mistyped one stops the command with
        # nothing removed, rather than after the refs before it are gone and unreported.
        for ref in refs:
            registry.resolve(ref, with_manifest=False)
        for ref in refs:
            removed.append({"ref": str(ref), "manifest_id": registry.delete_ref(ref)})

    def human() -> str:
        lines = [f"removed {r['ref']} (manifest {r['manifest_id'][:12]})" for r in removed]
        return "\n".join([*lines, f"objects no other ref uses are freed by the next 'shardstore gc' of {where}"])

    emit(args, {"removed": removed, "registry": where}, human)


def register(commands: Commands) -> None:
    p = commands.add_parser("tag", help="point DST at the model SRC points at (like docker tag; nothing is copied)")
    p.add_argument("src", metavar="SRC", help="NAME:TAG, or grpc://HOST:PORT/NAME:TAG")
    p.add_argument("dst", metavar="DST", help="NAME:TAG (created, or moved if it exists) in the same registry")
    add_common_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_tag)

    p = commands.add_parser("rm", aliases=["untag"],
                            help="remove refs NAME:TAG (the model's objects are freed by gc if no other ref uses them)")
    p.add_argument("refs", nargs="+", metavar="NAME:TAG", help="NAME:TAG, or grpc://HOST:PORT/NAME:TAG")
    add_common_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_rm)
