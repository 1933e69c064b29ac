"""``shardstore serve``: a store over gRPC until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shardstore.cli.common import Commands, add_common_options, parse_size


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


def register(commands: Commands) -> None:
    p = commands.add_parser("serve", help="serve a store over gRPC")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default 50051)")
    p.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="SIZE",
                   help="in-memory cache of hot shards (default 256MiB)")
    p.add_argument("--max-rate", type=parse_size, default=None, metavar="BYTES_PER_S",
                   help="pace all sends to this rate, e.g. 125MB for a 1 Gbit/s link (benchmarks)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds calls in flight get on shutdown (default 10)")
    add_common_options(p)
    p.set_defaults(func=cmd_serve)
