"""GET of shards and blobs by id, for HTTP caches, CDNs and mirrors (``shardstore serve --http-port``).

Layout::

    GET|HEAD /v1/shards/{id}     one shard's stored bytes
    GET|HEAD /v1/blobs/{id}      one blob's bytes
    GET|HEAD /v1/auth            204 when the request's token may read; for a cache's auth_request

The URL carries only the object's id, so every client, every model and every version that
shares a shard shares one cache entry (docs/operations.md). Decisions:

* ``ETag`` is the id (quoted, as RFC 9110 wants) and ``Cache-Control`` is ``public,
  max-age=31536000, immutable``: the bytes behind a URL can never change, so a cache may keep
  them forever and never revalidate. ``If-None-Match`` with the id answers 304.
* ``Range`` (one range; RFC 9110 lets a server ignore multi-range requests and answer 200 with
  the whole object) answers 206, and 416 outside the object. Caches and P2P systems such as
  Dragonfly fetch large objects in ranges.
* Every object is checked against its id before any byte of it is sent (DESIGN invariant 3);
  a corrupt object answers 500 naming it, never its bytes. A HEAD only asks the store for the
  size.
* Access is the gRPC side's: with tokens, a read grant (any prefix: objects belong to no model,
  as for StreamShards) via ``Authorization: Bearer`` or the sign-in cookie (access.py).
* Each response is counted in the server's metrics (requests by kind and status, body bytes by
  kind), so an operator and the tests see how much a cache in front really spared the server.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from shardstore.errors import IntegrityError, InvalidInputError, NotFoundError, ShardstoreError
from shardstore.format.digest import check_object_id
from shardstore.http.access import require_read
from shardstore.http.app import HTTP_CONTEXT, HttpContext
from shardstore.repo.repository import Repository, blob_key, shard_key

log = logging.getLogger("shardstore.http.objects")

CACHE_CONTROL = "public, max-age=31536000, immutable"
SHARD_PATH = "/v1/shards/{id}"
BLOB_PATH = "/v1/blobs/{id}"
AUTH_PATH = "/v1/auth"


def object_path(kind: str, object_id: str) -> str:
    """The path of an object under a server's or mirror's base URL (``kind``: shard or blob)."""
    return (SHARD_PATH if kind == "shard" else BLOB_PATH).format(id=object_id)


def _headers(object_id: str) -> dict[str, str]:
    return {"ETag": f'"{object_id}"', "Cache-Control": CACHE_CONTROL, "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream"}


def _etag_matches(request: web.Request, object_id: str) -> bool:
    header = request.headers.get("If-None-Match", "")
    tags = [tag.strip().removeprefix("W/").strip('"') for tag in header.split(",") if tag.strip()]
    return any(tag in (object_id, "*") for tag in tags)


def _range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The one byte range asked for as [start, stop) within ``size``; None for the whole object."""
    if "Range" not in request.headers or "," in request.headers["Range"]:
        return None
    try:
        wanted = request.http_range
    except ValueError:
        return None  # a malformed Range is ignored, as RFC 9110 allows
    start, stop = wanted.start, wanted.stop
    if start is None and stop is None:
        return None
    if start is None:
        start = 0
    if start < 0:  # bytes=-N: the last N bytes
        start = max(0, size + start)
        stop = size
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, stop


class _ObjectRoutes:
    def __init__(self, context: HttpContext) -> None:
        self.context = context
        self.repo = Repository(context.store)

    def _count(self, kind: str, status: int, body: int) -> None:
        if self.context.metrics is not None:
            self.context.metrics.observe_http(kind, status, body)

    async def shard(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "shard")

    async def blob(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "blob")

    async def auth(self, request: web.Request) -> web.StreamResponse:
        require_read(request, self.context.tokens)
        return web.Response(status=204)

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            response = await self._respond(request, kind)
        except web.HTTPException as exc:
            self._count(kind, exc.status, 0)
            raise
        body = response.body if isinstance(response, web.Response) and request.method == "GET" else None
        self._count(kind, response.status, len(body) if isinstance(body, bytes) else 0)
        return response

    async def _respond(self, request: web.Request, kind: str) -> web.Response:
        require_read(request, self.context.tokens)
        try:
            object_id = check_object_id(request.match_info["id"], f"{kind} id")
        except InvalidInputError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        headers = _headers(object_id)
        if _etag_matches(request, object_id):
            return web.Response(status=304, headers=headers)
        key = shard_key(object_id) if kind == "shard" else blob_key(object_id)
        loop = asyncio.get_running_loop()
        try:
            if request.method == "HEAD":
                size = await loop.run_in_executor(None, self.repo.store.size, key)
                return web.Response(status=200, headers={**headers, "Content-Length": str(size)})
            read = self.repo.get_shard_bytes if kind == "shard" else self.repo.get_blob
            # Checked against its id. As bytes: aiohttp sends a view through a payload that warns
            # for every body over 1 MiB.
            data = bytes(await loop.run_in_executor(None, read, object_id))
        except NotFoundError:
            raise web.HTTPNotFound(text=f"{kind} {object_id}: not in this store\n") from None
        except IntegrityError as exc:
            log.error("%s", exc)
            raise web.HTTPInternalServerError(text=f"{exc}\n") from None
        except ShardstoreError as exc:
            log.warning("store failure: %s", exc)
            raise web.HTTPServiceUnavailable(text=f"{kind} {object_id}: store unavailable\n") from None
        wanted = _range(request, len(data))
        if wanted is None:
            return web.Response(body=data, headers=headers)
        start, stop = wanted
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        return web.Response(status=206, body=data[start:stop], headers=headers)


def add_routes(app: web.Application) -> None:
    """Register the object read routes on ``app``."""
    routes = _ObjectRoutes(app[HTTP_CONTEXT])
    app.router.add_get(SHARD_PATH, routes.shard)
    app.router.add_get(BLOB_PATH, routes.blob)
    app.router.add_get(AUTH_PATH, routes.auth)
