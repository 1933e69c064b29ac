"""Access control: bearer tokens with scopes, and which RPC needs which scope.

A token table maps tokens to grants. An entry is ``token:scope[:prefix]``:
``scope`` is ``read``, ``write`` or ``delete`` (each implies the ones before it), ``prefix`` limits the
grant to models whose name starts with it (plain string prefix; end it with
``/`` to mean a namespace). A token may appear in several entries; its grants
add up. Entries come from ``SHARDSTORE_TOKENS`` (comma-separated) or a tokens
file (one entry per line, ``#`` comments), see :func:`load_token_table`.

Tokens are kept only as SHA-256 digests and compared in constant time, so
neither a memory dump nor response timing hands them out. This module is pure
policy (no grpc): :mod:`shardstore.rpc.guard` applies it to every call, and
docs/security.md explains each decision.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shardstore.errors import InvalidInputError, ShardstoreError
from shardstore.rpc.wire import AUTHORIZATION_KEY, BEARER
from shardstore.textfile import read_user_text

TOKENS_ENV = "SHARDSTORE_TOKENS"
# Tokens are opaque; this charset keeps them safe in an env var, a file, an HTTP/2 header.
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")
MIN_TOKEN_LENGTH = 16


class AuthenticationError(ShardstoreError, PermissionError):
    """No token, or a token the server does not know (gRPC ``UNAUTHENTICATED``)."""


class PermissionDeniedError(ShardstoreError, PermissionError):
    """A known token without the scope or model prefix a call needs (gRPC ``PERMISSION_DENIED``)."""


class Scope(enum.IntEnum):
    """Ordered: a grant of a higher scope covers every lower one (delete implies write implies read).

    ``delete`` (removing refs: ``shardstore rm``) is above ``write`` so that the tokens CI pushes
    with cannot drop a model: only a token given that scope on purpose can.
    """

    READ = 1
    WRITE = 2
    DELETE = 3


@dataclass(frozen=True)
class Grant:
    scope: Scope
    prefix: str = ""  # "" = every model

    def covers(self, scope: Scope, name: str | None) -> bool:
        """Whether this grant allows ``scope`` on model ``name`` (None: a content-addressed object, no model)."""
        return self.scope >= scope and (name is None or name.startswith(self.prefix))

    def __str__(self) -> str:
        return f"{self.scope.name.lower()}:{self.prefix}" if self.prefix else self.scope.name.lower()


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_entry(text: str, where: str) -> tuple[str, Grant]:
    """``token:scope[:prefix]`` → (token, grant); ``where`` names the source in the one-line error."""
    token, sep, rest = text.strip().partition(":")
    scope_text, _sep, prefix = rest.partition(":")
    # Never echo the token itself in an error: logs outlive secrets.
    if not sep or not token:
        raise InvalidInputError(f"{where}: expected token:scope[:prefix], got an entry without a scope")
    if len(token) < MIN_TOKEN_LENGTH or not set(token) <= _TOKEN_CHARS:
        raise InvalidInputError(f"{where}: a token must be at least {MIN_TOKEN_LENGTH} characters of "
                                "A-Z a-z 0-9 - . _ ~ + / =")
    try:
        scope = Scope[scope_text.strip().upper()]
    except KeyError:
        raise InvalidInputError(f"{where}: unknown scope {scope_text.strip()!r} "
                                "(expected read, write or delete)") from None
    prefix = prefix.strip()
    if any(c.isspace() or c in ",:" for c in prefix):
        raise InvalidInputError(f"{where}: bad model prefix {prefix!r}")
    return token, Grant(scope, prefix)


def parse_entries(text: str, source: str, *, separator: str | None = None) -> list[tuple[str, Grant]]:
    """Entries separated by ``separator`` (None: lines, with ``#`` comments and blank lines skipped)."""
    parsed: list[tuple[str, Grant]] = []
    parts = text.split(separator) if separator else text.splitlines()
    for number, part in enumerate(parts, 1):
        entry = part if separator else part.split("#", 1)[0]
        if entry.strip():
            parsed.append(parse_entry(entry, f"{source}: entry {number}" if separator else f"{source}:{number}"))
    return parsed


class TokenTable:
    """Tokens (as digests) → grants. Immutable once built; safe to share between threads and tasks."""

    def __init__(self, entries: Iterable[tuple[str, Grant]]) -> None:
        grants: dict[bytes, list[Grant]] = {}
        for token, grant in entries:
            grants.setdefault(_hash(token), []).append(grant)
        self._entries = tuple((digest, tuple(g)) for digest, g in grants.items())

    def __len__(self) -> int:
        return len(self._entries)

    def grants(self, token: str | None) -> tuple[Grant, ...]:
        """The grants of ``token``; :class:`AuthenticationError` when it is missing or unknown."""
        if not token:
            raise AuthenticationError("this server requires a token (--token or $SHARDSTORE_TOKEN)")
        presented = _hash(token)
        found: tuple[Grant, ...] = ()
        # Compare against every entry, not until the first match: the time taken says nothing about the table.
        for digest, grants in self._entries:
            if hmac.compare_digest(digest, presented):
                found = grants
        if not found:
            raise AuthenticationError("unknown token")
        return found

    def authorize(self, token: str | None, scope: Scope, name: str | None = None) -> tuple[Grant, ...]:
        """The token's grants that allow ``scope`` on ``name``; raises when none does."""
        grants = self.grants(token)
        allowed = tuple(g for g in grants if g.covers(scope, name))
        if not allowed:
            held = ", ".join(str(g) for g in grants)
            target = f" model {name!r}" if name is not None else ""
            raise PermissionDeniedError(f"token may not {scope.name.lower()}{target} (it holds: {held})")
        return allowed


def load_token_table(tokens_file: str | os.PathLike[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> TokenTable:
    """Entries from ``tokens_file`` when given, plus those in ``$SHARDSTORE_TOKENS`` (comma-separated)."""
    env = os.environ if environ is None else environ
    entries: list[tuple[str, Grant]] = []
    if tokens_file is not None:
        path = Path(tokens_file)
        text = read_user_text(path, "tokens file")
        entries += parse_entries(text, f"tokens file {path}")
    if env.get(TOKENS_ENV, "").strip():
        entries += parse_entries(env[TOKENS_ENV], f"${TOKENS_ENV}", separator=",")
    return TokenTable(entries)


@dataclass(frozen=True)
class Rule:
    """What one RPC needs."""

    scope: Scope
    # The request field that names a model, checked against the grant's prefix. None: the call
    # names content-addressed objects only (ids), which any grant of the scope may reach.
    name_field: str | None = None
    # The response lists refs: a prefix-limited token sees only those under its prefixes.
    filters_refs: bool = False


# Every RPC of shardstore.v1.Registry. A method missing here is refused (fail closed): a test
# checks that the table covers the proto, so a new RPC cannot ship without a decision.
REGISTRY_RULES: dict[str, Rule] = {
    "ResolveRef": Rule(Scope.READ, name_field="name"),
    "GetManifest": Rule(Scope.READ),
    "GetBlob": Rule(Scope.READ),
    "StreamShards": Rule(Scope.READ),
    # A signed URL reads the same content-addressed objects StreamShards and GetBlob send.
    "SignObjectUrls": Rule(Scope.READ),
    "ListRefs": Rule(Scope.READ, filters_refs=True),
    "FindMissing": Rule(Scope.WRITE),
    "UploadObjects": Rule(Scope.WRITE),
    "PutManifest": Rule(Scope.WRITE),
    "PutIndex": Rule(Scope.WRITE),
    "SetRef": Rule(Scope.WRITE, name_field="name"),
    "DeleteRef": Rule(Scope.DELETE, name_field="name"),
}

# Health stays open so that load balancers and Kubernetes probes need no secret; it tells
# nothing but SERVING / NOT_SERVING. Reflection describes the (public) API to any valid token.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
READ_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})


def rule_for(method: str, registry_service: str) -> Rule | None:
    """The rule for ``/package.Service/Method``; None for open services; raises for anything unknown."""
    service, _sep, name = method.strip("/").partition("/")
    if service in OPEN_SERVICES:
        return None
    if service in READ_SERVICES:
        return Rule(Scope.READ)
    if service == registry_service and name in REGISTRY_RULES:
        return REGISTRY_RULES[name]
    raise PermissionDeniedError(f"no access rule for {method}; refused")


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` header, or None."""
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            if text.startswith(BEARER):
                return text[len(BEARER) :].strip()
            raise AuthenticationError("the authorization header must be 'Bearer TOKEN'")
    return None
