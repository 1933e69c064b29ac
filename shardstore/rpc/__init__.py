"""gRPC delivery: the wire API (``proto/shardstore/v1``), a server over any store, and a client source.

``_generated`` is produced by ``scripts/gen_proto.py`` and never edited by hand.
This module imports no grpc, so the CLI and the API can parse addresses cheaply.
"""

from __future__ import annotations

from shardstore.errors import InvalidInputError

GRPC_SCHEME = "grpc://"
GRPCS_SCHEME = "grpcs://"  # the same over TLS


def is_grpc_url(text: object) -> bool:
    return isinstance(text, str) and text.startswith((GRPC_SCHEME, GRPCS_SCHEME))


def is_tls_url(text: object) -> bool:
    return isinstance(text, str) and text.startswith(GRPCS_SCHEME)


def split_grpc_url(text: str) -> tuple[str, str | None]:
    """``grpc[s]://host:port/name:tag`` → (``host:port``, ``name:tag``); the ref part is None when absent.

    The model name may itself hold ``/`` (``grpc://h:1/org/model:v1``): everything
    after the first ``/`` following the address is the ref.
    """
    if not is_grpc_url(text):
        raise InvalidInputError(f"not a grpc URL: {text!r} (expected grpc[s]://HOST:PORT/NAME:TAG)")
    rest = text.partition("://")[2]
    address, _sep, ref = rest.partition("/")
    if not is_address(address):
        raise InvalidInputError(f"bad grpc URL {text!r}: the address must be HOST:PORT")
    return address, ref or None


def is_address(address: str) -> bool:
    """``HOST:PORT`` with a port of 1 to 65535 (gRPC itself would wrap 65536 and above round to a real port)."""
    host, colon, port = address.rpartition(":")
    return bool(colon and host and port.isdigit() and 0 < int(port) < 65536)
