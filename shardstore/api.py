"""The Python API, as small as safetensors': push, pull, open.

Each takes a ref ``name:tag`` in a store, or ``grpc://host:port/name:tag`` on a server
(``grpcs://`` for TLS; ``token=`` and ``tls=`` when the server asks for them; ``mirror=`` an
HTTP cache to read shard bytes from, default ``$SHARDSTORE_MIRROR``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardstore.codecs import DEFAULT_CODEC_NAME, Codec
from shardstore.extras import require_torch
from shardstore.progress import ProgressCallback
from shardstore.registry import locate, open_registry
from shardstore.repo.chunking import DEFAULT_CHUNK_BYTES
from shardstore.repo.policy import Policy
from shardstore.repo.pull import PullReport
from shardstore.repo.pull import pull as _pull
from shardstore.repo.push import PushReport
from shardstore.repo.push import push as _push
from shardstore.repo.refs import parse_ref
from shardstore.repo.registry import Registry
from shardstore.store import Store

if TYPE_CHECKING:  # torch and grpc are imported only when needed, keeping the CLI quick
    import torch

    from shardstore.load.loader import LoadResult
    from shardstore.load.view import ModelView
    from shardstore.repo.snapshot import SnapshotReport
    from shardstore.rpc.tls import ClientTls


def connect(url: str | Store | None = None, *, token: str | None = None, tls: ClientTls | None = None,
            cache: str | os.PathLike[str] | None = None, timeout: float | None = None,
            mirror: str | None = None) -> Registry:
    """The registry at ``url``: a server (``grpc[s]://host:port[/name:tag]``) or a store. Close it when done.

    ``token``, ``tls``, ``cache``, ``timeout`` and ``mirror`` concern servers (see
    :func:`shardstore.registry.open_registry`).
    """
    return open_registry(url, cache=cache, token=token, tls=tls, timeout=timeout, mirror=mirror)


def push(
    src: str | os.PathLike[str],
    ref: str,
    *,
    store: str | Store | None = None,
    codec: str | Codec = DEFAULT_CODEC_NAME,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    token: str | None = None,
    tls: ClientTls | None = None,
    timeout: float | None = None,
    base: str | None = None,
    policy: Policy | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    mirror: str | None = None,
) -> PushReport:
    """Push a ``.safetensors`` file or a model folder to ``store`` (default: the local store) as ``ref``.

    ``base`` (``name:tag`` in the same store or on the same server) codes each tensor as
    the XOR with the base model's same tensor where that is smaller; pulls then read the
    base's shards too.

    ``policy`` (``shardstore.repo.policy.build_policy``) quantizes tensors by name pattern
    or to an error budget; without one every tensor is stored with ``codec``, losslessly.

    ``include``/``exclude``: globs on the folder's file paths or names; only matching files are
    pushed, excluded ones never. Pickle weights (``pytorch_model.bin``) beside safetensors are
    always left out (``report.skipped_files`` says which and why).
    """
    from shardstore.repo.delta import DeltaBase

    location, ref_text = locate(ref, store)
    # A push reads only the base's shards it codes against: not worth keeping in the shard cache.
    with open_registry(location, use_cache=False, token=token, tls=tls, timeout=timeout,
                       mirror=mirror) as registry:
        return _push(src, parse_ref(ref_text), registry, codec=codec, chunk_bytes=chunk_bytes, threads=threads,
                     progress=progress, base=DeltaBase(registry, parse_ref(base)) if base else None, policy=policy,
                     include=include, exclude=exclude)


def pull(
    ref: str,
    dest: str | os.PathLike[str],
    *,
    store: str | Store | None = None,
    only: Iterable[str] | None = None,
    weights: bool = True,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    cache: str | os.PathLike[str] | None = None,
    token: str | None = None,
    tls: ClientTls | None = None,
    timeout: float | None = None,
    exclude: Iterable[str] | None = None,
    mirror: str | None = None,
) -> PullReport:
    """Write the model ``ref`` into the folder ``dest``.

    ``only`` (the CLI's ``--include``) and ``exclude`` are globs on tensor names or on the paths
    of their safetensors files: only tensors matching ``only`` (all when empty) and not
    ``exclude``. The other files (config, tokenizer) are written unless ``exclude`` matches them.

    ``weights=False``: only the other files (config.json, tokenizer, the index...), no tensor fetched.
    Over gRPC, shards are kept in the local shard cache (``cache``, default
    ``$SHARDSTORE_CACHE`` or ``~/.cache/shardstore``) and fetched only when missing there.
    """
    location, ref_text = locate(ref, store)
    with open_registry(location, cache=cache, token=token, tls=tls, timeout=timeout, mirror=mirror) as registry:
        return _pull(registry, ref_text, dest, only=only, exclude=exclude, weights=weights, threads=threads,
                     progress=progress)


def snapshot(ref: str, *, store: str | Store | None = None, cache: str | os.PathLike[str] | None = None,
             token: str | None = None, tls: ClientTls | None = None, timeout: float | None = None,
             threads: int | None = None, progress: ProgressCallback | None = None, mirror: str | None = None) -> Path:
    """A Hugging Face style folder of ``ref`` (``*.safetensors``, index, config, tokenizer), for tools that take one.

    Written once per manifest under ``cache`` (default ``$SHARDSTORE_CACHE`` or
    ``~/.cache/shardstore``) in ``snapshots/<manifest id>``, atomically, and reused:
    a second call only asks which manifest the ref names, and fetches and writes nothing.
    """
    return Path(snapshot_report(ref, store=store, cache=cache, token=token, tls=tls, timeout=timeout,
                                threads=threads, progress=progress, mirror=mirror).path)


def snapshot_report(ref: str, *, store: str | Store | None = None, cache: str | os.PathLike[str] | None = None,
                    token: str | None = None, tls: ClientTls | None = None, timeout: float | None = None,
                    threads: int | None = None, progress: ProgressCallback | None = None,
                    mirror: str | None = None) -> SnapshotReport:
    """:func:`snapshot` with its figures: the path, whether it was reused, bytes received and written."""
    from shardstore.repo.snapshot import snapshot as _snapshot
    from shardstore.store.cache import default_cache_dir

    root = (Path(cache).expanduser() if cache is not None else default_cache_dir()).absolute()
    location, ref_text = locate(ref, store)
    with open_registry(location, cache=root, token=token, tls=tls, timeout=timeout, mirror=mirror) as registry:
        return _snapshot(registry, ref_text, root, threads=threads, progress=progress)


def open(ref: str, *, store: str | Store | None = None, cache: str | os.PathLike[str] | None = None,
         token: str | None = None, tls: ClientTls | None = None, timeout: float | None = None,
         mirror: str | None = None, **options: Any) -> ModelView:
    """A lazy view of a stored model: ``keys()``, ``get_tensor()``, ``get_slice()``, ``state_dict()``.

    Over gRPC (``grpc://host:port/name:tag``) only the shards holding what is
    asked for are fetched, through the local shard cache; close the view to
    close the connection.
    """
    require_torch("shardstore.open")
    from shardstore.load.view import ModelView

    location, ref_text = locate(ref, store)
    registry = open_registry(location, cache=cache, token=token, tls=tls, timeout=timeout, mirror=mirror)
    try:
        parsed = parse_ref(ref_text)
        manifest_id = registry.resolve(parsed)
        manifest = registry.get_manifest(manifest_id)
    except BaseException:
        registry.close()
        raise
    return ModelView(registry, str(parsed), manifest_id, manifest, **options)


def load_into(module: torch.nn.Module, ref: str, *, store: str | Store | None = None,
              cache: str | os.PathLike[str] | None = None, token: str | None = None,
              tls: ClientTls | None = None, timeout: float | None = None, mirror: str | None = None,
              **options: Any) -> LoadResult:
    """Load the model ``ref`` into ``module`` (``load_state_dict(assign=True)`` semantics; meta modules work).

    ``store``, ``cache``, ``token``, ``tls``, ``timeout`` and ``mirror`` are those of :func:`open`;
    ``options`` are those of :meth:`ModelView.load_into`: ``device``, ``device_map``, ``max_memory``,
    ``tp_rank``/``tp_size``/``tp_plan``, ``strict``, ``threads``, ``group``.
    """
    with open(ref, store=store, cache=cache, token=token, tls=tls, timeout=timeout, mirror=mirror) as view:
        return view.load_into(module, **options)


def from_pretrained(ref: str, cls: Any = None, *, device_map: Any = None, torch_dtype: Any = None, dtype: Any = None,
                    config: Any = None, store: str | Store | None = None, cache: str | os.PathLike[str] | None = None,
                    token: str | None = None, tls: ClientTls | None = None, timeout: float | None = None,
                    mirror: str | None = None, **kwargs: Any) -> Any:
    """A transformers model of class ``cls`` (default ``transformers.AutoModel``) loaded from ``ref``; no folder.

    ``shardstore.from_pretrained("grpc://registry:50051/org/model:v1", cls=AutoModelForCausalLM,
    device_map="auto", torch_dtype=torch.bfloat16)``: the config comes from the stored
    config.json, the model is built on the meta device and the weights stream in
    through the lazy view onto their devices; what the checkpoint lacks (non-persistent
    buffers, a new head) is initialised by transformers as its ``from_pretrained`` does.

    ``dtype`` (or its older name ``torch_dtype``): a ``torch.dtype``, a name, or ``"auto"`` (the
    default: the config's, else the checkpoint's). Keyword arguments that
    :meth:`ModelView.load_into` takes (``max_memory``, ``tp_rank``/``tp_size``/``tp_plan``,
    ``threads``, ``strict``, ...) go to the load; the others update the config or go to the
    model's constructor, as in transformers. ``store``, ``cache``, ``token``, ``tls``, ``timeout``
    and ``mirror`` are those of :func:`open`.
    """
    import inspect

    require_torch("shardstore.from_pretrained")
    from shardstore.load.hf import from_pretrained as _from_pretrained
    from shardstore.load.view import ModelView

    takes = set(inspect.signature(ModelView.load_into).parameters) - {"self", "module", "cast"}
    load_options = {name: kwargs.pop(name) for name in list(kwargs) if name in takes}
    if device_map is not None:
        load_options["device_map"] = device_map
    chosen = dtype if dtype is not None else torch_dtype if torch_dtype is not None else "auto"
    with open(ref, store=store, cache=cache, token=token, tls=tls, timeout=timeout, mirror=mirror) as view:
        return _from_pretrained(view, cls, config=config, dtype=chosen, load_options=load_options, **kwargs)
