"""Who may read what over HTTP: the same token table and scopes as the gRPC side (shardstore/rpc/auth.py).

A request presents its token as ``Authorization: Bearer TOKEN`` (clients, mirrors, curl) or in the
``shardstore_token`` cookie (the web view's sign-in form sets it, HttpOnly), never in the URL: a token
in a URL ends up in proxy and cache logs.
"""

from __future__ import annotations

from aiohttp import web

from shardstore.rpc.auth import AuthenticationError, Grant, PermissionDeniedError, Scope, TokenTable

TOKEN_COOKIE = "shardstore_token"
_OPEN: tuple[Grant, ...] = (Grant(Scope.WRITE),)  # a server without tokens lets everyone read everything


def request_token(request: web.Request) -> str | None:
    """The bearer token of ``request``: the Authorization header first, else the sign-in cookie."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(TOKEN_COOKIE) or None


def request_grants(request: web.Request, tokens: TokenTable | None) -> tuple[Grant, ...]:
    """The grants of the request's token; everything on an open server; () for no or an unknown token."""
    if tokens is None:
        return _OPEN
    try:
        return tokens.grants(request_token(request))
    except AuthenticationError:
        return ()


def may_read(grants: tuple[Grant, ...], name: str | None) -> bool:
    """Whether ``grants`` allow reading model ``name`` (None: a content-addressed object)."""
    return any(g.covers(Scope.READ, name) for g in grants)


def require_read(request: web.Request, tokens: TokenTable | None, name: str | None = None) -> None:
    """Raise 401 (no or unknown token) or 403 (token without read on ``name``) unless the request may read."""
    if tokens is None:
        return
    try:
        tokens.authorize(request_token(request), Scope.READ, name)
    except AuthenticationError as exc:
        raise web.HTTPUnauthorized(text=f"{exc}\n", headers={"WWW-Authenticate": 'Bearer realm="shardstore"'}) from None
    except PermissionDeniedError as exc:
        raise web.HTTPForbidden(text=f"{exc}\n") from None
