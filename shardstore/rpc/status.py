"""shardstore errors ↔ gRPC status codes, in one place, both ways.

The server turns each :class:`~shardstore.errors.ShardstoreError` into a status
code plus the trailing metadata key ``shardstore-error`` naming the class; the
client turns them back into the same class, so a CLI on the far side of a wire
prints the same one line it would print against a local store.
"""

from __future__ import annotations

import grpc

from shardstore.errors import (
    CodecError,
    ConflictError,
    FormatError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ShardstoreError,
    StoreError,
    UnsupportedFormatError,
)
from shardstore.rpc.auth import AuthenticationError, PermissionDeniedError

ERROR_METADATA_KEY = "shardstore-error"

# Most specific first: the first class an exception is an instance of wins.
_TO_CODE: tuple[tuple[type[ShardstoreError], grpc.StatusCode], ...] = (
    # Access control: no or unknown token vs a known token without the right (docs/security.md).
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    # A store of a newer format: the request was fine, the server's store is not one it may touch.
    (UnsupportedFormatError, grpc.StatusCode.FAILED_PRECONDITION),
    (FormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (ConflictError, grpc.StatusCode.ABORTED),
    # A backend failure (network, throttling, full disk) is usually transient:
    # UNAVAILABLE tells the client a bounded retry is worth it.
    (StoreError, grpc.StatusCode.UNAVAILABLE),
)

_BY_NAME: dict[str, type[ShardstoreError]] = {cls.__name__: cls for cls, _code in _TO_CODE}

# Used when the peer did not name a class (another implementation, a proxy, grpc itself).
_FROM_CODE: dict[grpc.StatusCode, type[ShardstoreError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidInputError,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}

# Codes a client may retry: the request never reached a handler, or the server
# is shedding load / shutting down. Everything else is an answer.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def code_for(exc: ShardstoreError) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_metadata(exc: ShardstoreError) -> tuple[tuple[str, str], ...]:
    for cls, _code in _TO_CODE:
        if isinstance(exc, cls):
            return ((ERROR_METADATA_KEY, cls.__name__),)
    return ()


def error_from_rpc(exc: grpc.RpcError, where: str, hint: str = "") -> ShardstoreError:
    """The shardstore error a failed call stands for.

    Only transport faults get ``where`` in front and ``hint`` (what the user may have got wrong) behind.
    """
    code: grpc.StatusCode = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details: str = (exc.details() if hasattr(exc, "details") else None) or str(code)
    named: str | None = None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_METADATA_KEY:
            named = value if isinstance(value, str) else value.decode("ascii", "replace")
    cls = _BY_NAME.get(named or "") or _FROM_CODE.get(code)
    if cls is not None:
        return cls(details)
    # Transport-level trouble (UNAVAILABLE after retries, DEADLINE_EXCEEDED,
    # CANCELLED, INTERNAL...): a StoreError, the error a failing store raises.
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        details = "no answer within the deadline (server too slow, silent, or not a gRPC server)"
    return StoreError(f"{where}: {code.name.lower()}: {details}{f' ({hint})' if hint else ''}")
