"""One aiohttp application on the gRPC server's own event loop, for ``shardstore serve --http-port``.

Why aiohttp: it is already installed with s3fs (aiobotocore), it runs on the asyncio loop the
``grpc.aio`` server uses, so the HTTP and gRPC sides share one process, one store and one set of
metrics without threads between them.

Each group of routes lives in its own module with an ``add_routes(app)`` function, listed in
:data:`ROUTE_GROUPS`: the object read endpoint (:mod:`shardstore.http.objects`) and the web view
(:mod:`shardstore.http.webview`). They reach the server's state through ``app[HTTP_CONTEXT]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from shardstore.errors import InvalidInputError
from shardstore.rpc.auth import TokenTable
from shardstore.rpc.metrics import ServerMetrics
from shardstore.store.base import Store


@dataclass
class HttpContext:
    """What every route group may use: the store, the token table (None: open) and the server's metrics.

    ``grpc_port`` and ``grpc_tls`` say where the gRPC side listens, so pages can show pull commands
    that work (host from the request, since the listener may be bound to 0.0.0.0).
    """

    store: Store
    tokens: TokenTable | None = None
    metrics: ServerMetrics | None = None
    grpc_port: int | None = None
    grpc_tls: bool = False


HTTP_CONTEXT = web.AppKey("shardstore", HttpContext)


def _route_groups() -> list[Callable[[web.Application], None]]:
    # Imported here so that a group's import cost (templates, say) is paid only by servers that listen on HTTP.
    from shardstore.http import objects, webview

    return [objects.add_routes, webview.add_routes]


def create_http_app(context: HttpContext) -> web.Application:
    """The application with every route group registered; unstarted."""
    app = web.Application()
    app[HTTP_CONTEXT] = context
    for add_routes in _route_groups():
        add_routes(app)
    return app


class HttpListener:
    """A started HTTP site; :meth:`start` binds (port 0: a free one) and returns the bound port."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self._host = host
        self._port = port
        self.port = 0

    async def start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise InvalidInputError(f"cannot serve HTTP on {self._host}:{self._port}: {exc.strerror or exc}") from None
        self.port = int(self._runner.addresses[0][1])  # the bound port, also when port 0 was asked for
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()
