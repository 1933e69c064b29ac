"""``shardstore health``: ask a server's gRPC health service whether it serves (container and probe checks)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from shardstore.cli.common import Commands, add_client_options, add_common_options, client_options, emit
from shardstore.config import env_name
from shardstore.errors import InvalidInputError, StoreError

if TYPE_CHECKING:
    from shardstore.rpc.tls import ClientTls

DEFAULT_PORT = 50051
DEFAULT_TIMEOUT_S = 5.0  # a probe: a server that needs longer to answer is not healthy


def default_address() -> str:
    """The server of this container: 127.0.0.1 on the port ``shardstore serve`` reads from its environment."""
    return f"127.0.0.1:{os.environ.get(env_name('serve', '--port')) or DEFAULT_PORT}"


def check_health(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_S, tls: ClientTls | None = None
                 ) -> str:
    """The status name the server reports for ``service`` ("": the server as a whole); raises if unreachable.

    ``tls``: connect with TLS (a ``grpcs://`` server), trusting its CA (None in it: the system's roots).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        channel = grpc.secure_channel(address, tls.credentials()) if tls else grpc.insecure_channel(address)
        with channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        raise StoreError(f"{address}: {code.name if code else 'error'}: {detail}") from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def cmd_health(args: argparse.Namespace) -> None:
    from shardstore.rpc import is_address, is_tls_url

    text = args.address or default_address()
    address = text.removeprefix("grpcs://").removeprefix("grpc://").rstrip("/")
    if not is_address(address):
        raise InvalidInputError(f"expected HOST:PORT (a port of 1 to 65535), grpc://HOST:PORT or grpcs://HOST:PORT, "
                                f"not {text!r}")
    # The health service is open (docs/security.md): --token is accepted like on every client command but not
    # sent, since a secret the call does not need would only travel further.
    tls = client_options(args)["tls"]
    if tls is None and is_tls_url(text):
        from shardstore.rpc.tls import ClientTls

        tls = ClientTls()
    status = check_health(address, args.service, args.timeout or DEFAULT_TIMEOUT_S, tls)
    if status != "SERVING":
        raise StoreError(f"{address}: {args.service or 'server'} is {status}")
    scheme = "grpcs" if tls else "grpc"
    emit(args, {"address": address, "service": args.service, "status": status, "tls": tls is not None},
         lambda: f"{scheme}://{address}: {status}")


def register(commands: Commands) -> None:
    p = commands.add_parser("health", help="check that a server is up and serving (exit status 0) or not (1)")
    p.add_argument("address", nargs="?", default=None, metavar="grpc[s]://HOST:PORT",
                   help=f"the server (default 127.0.0.1 on ${env_name('serve', '--port')}, else {DEFAULT_PORT})")
    p.add_argument("--service", default="", help="a service name, e.g. shardstore.v1.Registry (default: the server)")
    add_common_options(p, store=False)
    add_client_options(p, default_timeout=DEFAULT_TIMEOUT_S)
    p.set_defaults(func=cmd_health)
