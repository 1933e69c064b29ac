"""A server on its own event loop thread, for tests, benches, examples and the demo.

Kept out of :mod:`shardstore.rpc.server` so that module holds only what ``serve`` runs.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from shardstore.rpc.server import RegistryServer, RegistryServicer, create_server
from shardstore.store.base import Store


class BackgroundServer:
    """A server on its own event loop thread: for tests, benches and the demo. A context manager."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self._args = (store, host, port)
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="shardstore-server", daemon=True)
        self.registry: RegistryServer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        assert self.registry is not None, "server not started"
        return self.registry.address

    @property
    def servicer(self) -> RegistryServicer:
        assert self.registry is not None, "server not started"
        return self.registry.servicer

    def start(self) -> BackgroundServer:
        self._thread.start()

        async def start() -> tuple[RegistryServer, int]:
            registry, port = create_server(*self._args, **self._options)
            await registry.start()
            return registry, port

        self.registry, self.port = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=30)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        if self.registry is not None:
            asyncio.run_coroutine_threadsafe(self.registry.stop(grace), self._loop).result(timeout=60)
            self.registry = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
