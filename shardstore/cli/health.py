"""``shardstore health``: ask a server's gRPC health service whether it serves (container and probe checks)."""

from __future__ import annotations

import argparse
import os

from shardstore.cli.common import Commands, add_common_options, emit
from shardstore.config import env_name
from shardstore.errors import InvalidInputError, StoreError

DEFAULT_PORT = 50051


def default_address() -> str:
    """The server of this container: 127.0.0.1 on the port ``shardstore serve`` reads from its environment."""
    return f"127.0.0.1:{os.environ.get(env_name('serve', '--port')) or DEFAULT_PORT}"


def check_health(address: str, service: str = "", timeout: float = 5.0) -> str:
    """The status name the server reports for ``service`` ("": the server as a whole); raises if unreachable."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        raise StoreError(f"{address}: {code.name if code else 'error'}: {detail}") from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def cmd_health(args: argparse.Namespace) -> None:
    address = (args.address or default_address()).removeprefix("grpc://").rstrip("/")
    if not address or "/" in address:
        raise InvalidInputError(f"expected HOST:PORT or grpc://HOST:PORT, not {args.address!r}")
    status = check_health(address, args.service, args.timeout)
    if status != "SERVING":
        raise StoreError(f"{address}: {args.service or 'server'} is {status}")
    emit(args, {"address": address, "service": args.service, "status": status},
         lambda: f"grpc://{address}: {status}")


def register(commands: Commands) -> None:
    p = commands.add_parser("health", help="check that a server is up and serving (exit status 0) or not (1)")
    p.add_argument("address", nargs="?", default=None, metavar="grpc://HOST:PORT",
                   help=f"the server (default 127.0.0.1 on ${env_name('serve', '--port')}, else {DEFAULT_PORT})")
    p.add_argument("--service", default="", help="a service name, e.g. shardstore.v1.Registry (default: the server)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    add_common_options(p, store=False)
    p.set_defaults(func=cmd_health)
