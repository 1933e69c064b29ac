"""``shardstore serve``: a store over gRPC until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shardstore.cli.common import Commands, add_common_options, parse_port, parse_seconds, parse_size
from shardstore.config import make_configurable


def cmd_serve(args: argparse.Namespace) -> None:
    import asyncio
    import logging

    from shardstore.rpc.logs import JsonFormatter
    from shardstore.rpc.metrics import ServerMetrics
    from shardstore.rpc.server import RegistryServer, serve
    from shardstore.store import open_store

    store = open_store(args.store)
    from shardstore.errors import StoreMissingError
    from shardstore.store import LocalStore

    # A missing folder is a new store that pushes will fill; a missing bucket is a mistake we cannot fix.
    if not isinstance(store, LocalStore) and not store.root_exists():
        raise StoreMissingError(f"store {store.url} does not exist (create the bucket first)")
    access = access_options(args)  # before anything starts: a bad token or TLS setting stops here
    log_handler = logging.StreamHandler(sys.stderr)
    log_handler.setFormatter(JsonFormatter() if args.log_format == "json"
                             else logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    # Asking for JSON logs is asking for the request log, even when stdout carries the --json ready line.
    quiet_logs = args.quiet or (args.json and args.log_format != "json")
    logging.basicConfig(level=logging.WARNING if quiet_logs else logging.INFO, handlers=[log_handler])
    metrics = ServerMetrics()
    metrics_address = None
    if args.metrics_port is not None:
        bound = metrics.serve_http(args.host, args.metrics_port)
        metrics_address = f"[{args.host}]:{bound}" if ":" in args.host else f"{args.host}:{bound}"

    def ready(registry: RegistryServer) -> None:
        # The bound address (the port, when --port 0) is how scripts and tests find the server.
        address = registry.address
        metrics.readiness = lambda: registry.serving
        ready_state["http_address"] = registry.http_address
        if args.json:
            print(json.dumps({"address": address, "store": store.url, "metrics_address": metrics_address,
                              "http_address": registry_http_address(),
                              "tls": "tls" in options, "tokens": len(options.get("tokens") or ())}), flush=True)
        elif not args.quiet:
            scheme = "grpcs" if "tls" in options else "grpc"
            access = f", {len(options['tokens'])} tokens" if "tokens" in options else ", no tokens: open to all"
            print(f"serving {store.url} on {scheme}://{address}{access} (Ctrl-C to stop)", flush=True)
            if metrics_address:
                print(f"metrics on http://{metrics_address}/metrics", flush=True)
            if registry_http_address():
                print(f"HTTP objects and web view on http://{registry_http_address()}/", flush=True)

    def registry_http_address() -> str | None:
        return ready_state.get("http_address")

    ready_state: dict[str, str | None] = {}
    options: dict[str, Any] = {"cache_bytes": args.cache_size, "metrics": metrics, "http_port": args.http_port,
                               "signed_url_ttl": args.signed_url_ttl, **access}
    from shardstore.rpc.guard import CallLimits

    options["limits"] = CallLimits(max_calls=args.max_calls, max_calls_per_peer=min(args.max_calls_per_peer,
                                                                                    args.max_calls))
    options["max_object_bytes"] = args.max_object_size
    if args.max_rate is not None:
        options["pace_bytes_per_s"] = args.max_rate
    try:
        asyncio.run(serve(store, args.host, args.port, on_ready=ready, grace=args.grace, **options))
    finally:
        metrics.close()


def access_options(args: argparse.Namespace) -> dict[str, Any]:
    """Token table and TLS for the server, from --require-token/--tokens-file/$SHARDSTORE_TOKENS and --tls-*."""
    from shardstore.errors import InvalidInputError
    from shardstore.rpc.auth import TOKENS_ENV, load_token_table
    from shardstore.rpc.tls import ServerTls

    options: dict[str, Any] = {}
    tokens = load_token_table(args.tokens_file)
    # Configured tokens are always enforced: tokens that were set up but silently ignored would be worse than none.
    if args.require_token or len(tokens):
        if not len(tokens):
            raise InvalidInputError(f"--require-token: no tokens (set ${TOKENS_ENV} or --tokens-file)")
        options["tokens"] = tokens
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            raise InvalidInputError("TLS needs both --tls-cert and --tls-key")
        options["tls"] = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca)
        options["tls"].credentials()  # read and check the files now: a bad path is a one-line error, not a crash
    elif args.require_tls:
        raise InvalidInputError("--require-tls: give --tls-cert and --tls-key")
    return options


def register(commands: Commands) -> None:
    p = commands.add_parser("serve", help="serve a store over gRPC")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=parse_port, default=50051,
                   help="port to listen on; 0 picks a free one (default 50051)")
    p.add_argument("--cache-size", type=parse_size, default=256 << 20, metavar="SIZE",
                   help="in-memory cache of hot shards (default 256MiB)")
    p.add_argument("--max-rate", type=parse_size, default=None, metavar="BYTES_PER_S",
                   help="pace all sends to this rate, e.g. 125MB for a 1 Gbit/s link (benchmarks)")
    p.add_argument("--grace", type=parse_seconds, default=10.0,
                   help="seconds calls in flight get on shutdown (default 10)")
    p.add_argument("--metrics-port", type=parse_port, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port (default: off)")
    p.add_argument("--http-port", type=parse_port, default=None, metavar="PORT",
                   help="also serve HTTP GETs of shards and blobs and the web view on HOST:PORT; 0 picks a free port "
                        "(default: off)")
    p.add_argument("--max-calls", type=int, default=256, metavar="N",
                   help="calls served at once; more wait for a retry (default 256). A call counts once its request "
                        "is in, so clients that never send one take nothing (docs/security.md)")
    p.add_argument("--max-calls-per-peer", type=int, default=64, metavar="N",
                   help="calls served at once for one client address, so no client takes all (default 64)")
    p.add_argument("--max-object-size", type=parse_size, default=2 << 30, metavar="SIZE",
                   help="largest shard or blob an upload may declare (default 2GiB); uploads are streamed to the "
                        "store while hashed, so this bounds disk, not memory")
    p.add_argument("--signed-url-ttl", type=int, default=900, metavar="SECONDS",
                   help="when the store can sign URLs (S3), clients read shard bytes straight from it through signed "
                        "URLs valid this long; 0: never sign, stream every byte through this server (default 900)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log as text or as one JSON object per line; either way one line per call (default text)")
    p.add_argument("--require-token", action="store_true",
                   help="every call needs a bearer token (from $SHARDSTORE_TOKENS or --tokens-file); "
                        "refuse to start without one")
    p.add_argument("--tokens-file", metavar="FILE", default=None,
                   help="tokens, one 'token:read|write[:model-prefix]' per line, # comments (docs/security.md)")
    p.add_argument("--tls-cert", metavar="FILE", default=None, help="serve TLS only, with this PEM certificate chain")
    p.add_argument("--tls-key", metavar="FILE", default=None, help="the PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="FILE", default=None,
                   help="mutual TLS: require client certificates signed by this PEM CA")
    p.add_argument("--require-tls", action="store_true", help="refuse to start without --tls-cert/--tls-key")
    add_common_options(p)
    # Last: every option above, and any added later, also reads SHARDSTORE_SERVE_* and --config (docs/operations.md).
    make_configurable(p, "serve")
    p.set_defaults(func=cmd_serve)
