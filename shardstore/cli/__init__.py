"""The ``shardstore`` command: one module per group of subcommands, each with a ``register(commands)``.

Every command takes ``--json`` and then prints exactly one JSON object on
stdout. Mistakes in the input end in one line on stderr and exit status 1 (2
for bad usage); a traceback means a bug in shardstore.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from shardstore.cli import bench, eval, gc, health, load, models, serve, tags, verify
from shardstore.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, CommandParser, human_bytes, parse_size
from shardstore.config import resolve as resolve_settings
from shardstore.errors import InvalidInputError, ShardstoreError

__all__ = ["build_parser", "human_bytes", "main", "parse_size"]

# Order is the order of ``shardstore --help``. A new command group is a module here with ``register``.
COMMAND_MODULES = [models, tags, load, serve, health, verify, gc, eval, bench]


def build_parser() -> argparse.ArgumentParser:
    from shardstore import __version__

    parser = argparse.ArgumentParser(prog="shardstore", description="Store and deliver compressed models.")
    parser.add_argument("--version", action="version", version=f"shardstore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.progress = not (args.json or args.quiet)
    try:
        resolve_settings(args)  # flags > SHARDSTORE_<COMMAND>_* > --config file, for commands that opt in
        _store_from_environment(args)
        options = dict(getattr(args, "storage_options", None) or [])
        if options:
            from shardstore.store import open_store

            if args.store and args.store.startswith(("grpc://", "grpcs://")):
                raise InvalidInputError("--storage-option applies to stores, not to grpc:// servers")
            args.store = open_store(args.store, **options)
        args.func(args)
        sys.stdout.flush()  # inside the try: a reader that went away is seen here, not at interpreter exit
    except BrokenPipeError:
        return _stdout_closed()
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


def _store_from_environment(args: argparse.Namespace) -> None:
    """``SHARDSTORE_STORE=grpc://HOST:PORT`` makes a server the default registry, as ``--store grpc://...`` does.

    Only then is it copied into ``--store``: the client commands route a grpc:// store to the server;
    a store path keeps being resolved where it always was (``open_store``), and commands that need a
    real store (gc, verify, serve) say in one line that a server is not one.
    """
    from shardstore.rpc import is_grpc_url
    from shardstore.store import STORE_ENV

    configured = os.environ.get(STORE_ENV, "").strip()
    if hasattr(args, "store") and args.store is None and is_grpc_url(configured):
        args.store = configured


def _stdout_closed() -> int:
    """``shardstore inspect ... | head``: the reader has what it wanted; end quietly, as unix tools do.

    stdout is pointed at /dev/null so that the interpreter's final flush of what is still
    buffered does not fail again at exit (the recipe in Python's signal module docs).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0
