"""The Python API, as small as safetensors': push, pull, open."""

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
from shardstore.store import Store, open_store

if TYPE_CHECKING:  # torch is imported only when a model is opened, keeping the CLI quick
    from shardstore.load.view import ModelView


def _repository(store: str | Store | None) -> Repository:
    return Repository(store if isinstance(store, Store) else open_store(store))


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
) -> PullReport:
    """Write the model ``ref`` into the folder ``dest`` (only tensors matching ``only`` globs, if given)."""
    return _pull(_repository(store), ref, dest, only=only, threads=threads, progress=progress)


def open(ref: str, *, store: str | Store | None = None, **options: Any) -> ModelView:
    """A lazy view of a stored model: ``keys()``, ``get_tensor()``, ``get_slice()``, ``state_dict()``."""
    from shardstore.load.view import ModelView

    source = _repository(store)
    parsed = parse_ref(ref)
    manifest_id = source.resolve(parsed)
    return ModelView(source, str(parsed), manifest_id, source.get_manifest(manifest_id), **options)
