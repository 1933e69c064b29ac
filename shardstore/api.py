"""The Python API, as small as safetensors': push, pull, open.

Each takes a ref ``name:tag`` in a store, or ``grpc://host:port/name:tag`` on a server.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from shardstore.codecs import DEFAULT_CODEC_NAME, Codec
from shardstore.repo.chunking import DEFAULT_CHUNK_BYTES
from shardstore.repo.pull import PullReport
from shardstore.repo.pull import pull as _pull
from shardstore.repo.push import PushReport
from shardstore.repo.push import push as _push
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.rpc import is_grpc_url, split_grpc_url
from shardstore.store import Store, open_store

if TYPE_CHECKING:  # torch and grpc are imported only when needed, keeping the CLI quick
    from shardstore.load.view import ModelView
    from shardstore.rpc.client import GrpcClient


def _repository(store: str | Store | None) -> Repository:
    return Repository(open_store(store))


def _grpc_target(ref: str, store: str | Store | None) -> tuple[str, str] | None:
    """(address, ``name:tag``) when ``ref`` is ``grpc://host:port/name:tag`` or ``store`` is ``grpc://host:port``."""
    if is_grpc_url(ref):
        address, ref_text = split_grpc_url(ref)
        return address, ref_text or "latest"
    if isinstance(store, str) and is_grpc_url(store):
        return split_grpc_url(store)[0], ref
    return None


def _grpc_client(address: str, cache: str | os.PathLike[str] | None, use_cache: bool = True) -> GrpcClient:
    from shardstore.rpc.client import GrpcClient
    from shardstore.store.cache import ShardCache

    return GrpcClient(address, cache=ShardCache(cache) if cache is not None else None, use_cache=use_cache)


def push(
    src: str | os.PathLike[str],
    ref: str,
    *,
    store: str | Store | None = None,
    codec: str | Codec = DEFAULT_CODEC_NAME,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: bool = False,
) -> PushReport:
    """Push a ``.safetensors`` file or a model folder to ``store`` (default: the local store) as ``ref``."""
    remote = _grpc_target(ref, store)
    if remote is not None:
        with _grpc_client(remote[0], None, use_cache=False) as client:
            return _push(src, parse_ref(remote[1]), client, codec=codec, chunk_bytes=chunk_bytes, threads=threads,
                         progress=progress)
    return _push(src, parse_ref(ref), _repository(store), codec=codec, chunk_bytes=chunk_bytes,
                 threads=threads, progress=progress)


def pull(
    ref: str,
    dest: str | os.PathLike[str],
    *,
    store: str | Store | None = None,
    only: Iterable[str] | None = None,
    threads: int | None = None,
    progress: bool = False,
    cache: str | os.PathLike[str] | None = None,
) -> PullReport:
    """Write the model ``ref`` into the folder ``dest`` (only tensors matching ``only`` globs, if given).

    Over gRPC, shards are kept in the local shard cache (``cache``, default
    ``$SHARDSTORE_CACHE`` or ``~/.cache/shardstore``) and fetched only when missing there.
    """
    remote = _grpc_target(ref, store)
    if remote is not None:
        with _grpc_client(remote[0], cache) as client:
            return _pull(client, remote[1], dest, only=only, threads=threads, progress=progress)
    return _pull(_repository(store), ref, dest, only=only, threads=threads, progress=progress)


def open(ref: str, *, store: str | Store | None = None, cache: str | os.PathLike[str] | None = None,
         **options: Any) -> ModelView:
    """A lazy view of a stored model: ``keys()``, ``get_tensor()``, ``get_slice()``, ``state_dict()``.

    Over gRPC (``grpc://host:port/name:tag``) only the shards holding what is
    asked for are fetched, through the local shard cache; close the view to
    close the connection.
    """
    from shardstore.load.view import ModelView

    remote = _grpc_target(ref, store)
    if remote is None:
        source: Any = _repository(store)
        ref_text = ref
    else:
        source, ref_text = _grpc_client(remote[0], cache), remote[1]
    try:
        parsed = parse_ref(ref_text)
        manifest_id = source.resolve(parsed)
        manifest = source.get_manifest(manifest_id)
    except BaseException:
        if remote is not None:
            source.close()
        raise
    return ModelView(source, str(parsed), manifest_id, manifest, owns_source=remote is not None, **options)
