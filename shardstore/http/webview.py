"""The read-only web view of the registry (issue 17 fills this in)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the web view's routes on ``app``."""
