"""Stores: where objects live. :func:`open_store` turns a URL into one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shardstore.errors import InvalidInputError
from shardstore.store.base import ObjectInfo, Store, StoreCapabilities, check_key
from shardstore.store.local import LocalStore
from shardstore.store.memory import MemoryStore

STORE_ENV = "SHARDSTORE_STORE"


def default_store_url() -> str:
    """``$SHARDSTORE_STORE``, else ``$XDG_DATA_HOME/shardstore`` (``~/.local/share/shardstore``)."""
    configured = os.environ.get(STORE_ENV)
    if configured:
        return configured
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(data_home) / "shardstore")


def open_store(url: str | Store | None = None, **storage_options: Any) -> Store:
    """A store for a URL: a path or ``file://`` (local), ``memory://name``, or any fsspec URL.

    A :class:`Store` is returned as it is, so callers can pass either.
    """
    if isinstance(url, Store):
        return url
    url = url or default_store_url()
    if url.startswith(("grpc://", "grpcs://")):
        source = f" (from ${STORE_ENV})" if url == os.environ.get(STORE_ENV, "").strip() else ""
        raise InvalidInputError(f"{url}{source}: a shardstore server, not a store; this command needs a store "
                                "(a folder, file://, s3://...)")
    if url.startswith("file://"):
        return LocalStore(url[len("file://") :])
    if url.startswith("memory://"):
        return MemoryStore.named(url[len("memory://") :].strip("/"))
    if "://" not in url:
        return LocalStore(url)
    if url.startswith(("s3://", "s3a://")):
        from shardstore.store.s3 import S3Store

        return S3Store(url, **storage_options)
    from shardstore.store.fsspec_store import FsspecStore

    return FsspecStore(url, **storage_options)


__all__ = [
    "STORE_ENV",
    "LocalStore",
    "MemoryStore",
    "ObjectInfo",
    "Store",
    "StoreCapabilities",
    "check_key",
    "default_store_url",
    "open_store",
]
