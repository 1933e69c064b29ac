"""``open_registry``: a URL (or a store) to the :class:`~shardstore.repo.registry.Registry` behind it.

The one place that knows the kinds of registry, as :func:`shardstore.store.open_store`
is the one place that knows the kinds of store. Everything above it (the API,
the CLI) takes a registry and never asks which kind it holds.

* ``grpc://host:port`` / ``grpcs://host:port`` (a trailing ``/name:tag`` is
  ignored here): a client of that server, with a local shard cache;
* anything else (a folder, ``file://``, ``memory://``, ``s3://``, any fsspec
  URL, a :class:`~shardstore.store.base.Store`, None for the default store):
  a :class:`~shardstore.repo.repository.Repository` over that store.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from shardstore.repo.registry import Registry
from shardstore.repo.repository import Repository
from shardstore.rpc import is_grpc_url, is_tls_url, split_grpc_url
from shardstore.store import Store, open_store

if TYPE_CHECKING:  # grpc is imported only when a server is asked for, keeping the CLI quick
    from shardstore.rpc.tls import ClientTls

def open_registry(location: str | Store | None = None, *, cache: str | os.PathLike[str] | None = None,
                  use_cache: bool = True, token: str | None = None, tls: ClientTls | None = None,
                  timeout: float | None = None, mirror: str | None = None) -> Registry:
    """The registry at ``location``; close it when done (or use it as a context manager).

    ``cache``, ``use_cache``, ``token``, ``tls`` and ``timeout`` concern servers only
    (a store ignores them): the shard cache folder (default ``$SHARDSTORE_CACHE``),
    whether to use one at all, a bearer token, TLS settings (a ``grpcs://`` URL
    alone means TLS with the system's roots), and how long a call waits for an
    answer or a stream for its next message; ``mirror`` an HTTP cache to read shard
    bytes from (default ``$SHARDSTORE_MIRROR``).
    """
    if isinstance(location, str) and is_grpc_url(location):
        from shardstore.rpc.client import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_TIMEOUT_S, GrpcClient
        from shardstore.rpc.tls import ClientTls
        from shardstore.store.cache import ShardCache

        if tls is None and is_tls_url(location):
            tls = ClientTls()
        # A timeout given bounds both a call's answer and a stream's next message; the client checks it.
        return GrpcClient(split_grpc_url(location)[0], cache=ShardCache(cache) if cache is not None else None,
                          use_cache=use_cache, token=token, tls=tls, mirror=mirror,
                          timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout,
                          idle_timeout=DEFAULT_IDLE_TIMEOUT_S if timeout is None else timeout)
    return Repository(open_store(location))


def locate(ref: str, store: str | Store | None) -> tuple[str | Store | None, str]:
    """(where the registry is, ``name:tag``) for a ref given as ``name:tag`` or ``grpc://host:port/name:tag``.

    A ref that is a server URL wins over ``store``; a bare server URL means its ``latest`` model.
    """
    if is_grpc_url(ref):
        return ref, split_grpc_url(ref)[1] or "latest"
    return store, ref
