"""GET of shards and blobs by id, for HTTP caches and mirrors (issue 16 fills this in)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the object read routes on ``app``."""
