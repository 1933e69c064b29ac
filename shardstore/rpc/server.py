"""The gRPC server: the Registry service (``proto/shardstore/v1/registry.proto``) over any :class:`Store`.

:func:`create_server` builds a configured, unstarted server (tests and benches
run it in-process); :func:`serve` runs one until SIGTERM/SIGINT and shuts it
down gracefully. The servicer is thin: it validates requests, runs blocking
store calls in a bounded thread pool, and maps errors to status codes through
:mod:`shardstore.rpc.status`.

Decisions (docs/grpc.md has the prose):

* Object bytes travel in chunks of :data:`CHUNK_BYTES` (1 MiB): big enough that
  per-message cost is noise, small enough that a shard of any size never makes
  a large message and a slow client never pins much memory.
* Message limits are explicit: :data:`MAX_MESSAGE_BYTES` (64 MiB) fits the
  largest manifest we accept over the wire; every other message is ~1 MiB.
* Every shard read from the store is checked against its id before it is sent
  or cached (DESIGN invariant 3), and every uploaded object before it is
  committed; a hot-shard LRU bounded in bytes spares repeated store reads.
* While one shard is being sent the next is already being read, so a slow
  store (S3) and the network overlap.
* Every write check (a manifest names only stored objects, compare-and-set of
  refs) is the :class:`Repository`'s own: the servicer validates and delegates.

What the client shares with us is in :mod:`shardstore.rpc.wire`; the server
that tests and benches run on a thread is :mod:`shardstore.rpc.background`,
the link pacing of benches :mod:`shardstore.rpc.pacing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import blake3
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardstore.buffers import held_bytes
from shardstore.errors import FormatError, IntegrityError, InvalidInputError, ShardstoreError
from shardstore.format.digest import check_object_id
from shardstore.format.manifest import parse_manifest
from shardstore.http.app import HttpContext, HttpListener, create_http_app
from shardstore.repo.content_index import IndexEntry
from shardstore.repo.leases import WriteLease
from shardstore.repo.refs import DEFAULT_TAG, Ref, parse_ref
from shardstore.repo.registry import ShardData
from shardstore.repo.repository import Repository, blob_key, shard_key
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc
from shardstore.rpc.auth import TokenTable
from shardstore.rpc.chunks import encode_chunk, serialize_chunk
from shardstore.rpc.guard import DEFAULT_SEND_TIMEOUT_S, CallGuard, CallLimits
from shardstore.rpc.logs import RequestObserver, log_request
from shardstore.rpc.metrics import ServerMetrics
from shardstore.rpc.pacing import Pacer
from shardstore.rpc.status import code_for, error_metadata
from shardstore.rpc.tls import ServerTls
from shardstore.rpc.wire import CHUNK_BYTES, MAX_IDS_PER_REQUEST, MAX_MESSAGE_BYTES, MAX_OBJECT_BYTES, MESSAGE_LIMIT
from shardstore.store.base import ObjectWriter, Store

log = logging.getLogger("shardstore.rpc.server")

T = TypeVar("T")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Registry"].full_name
DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_MAX_CONCURRENT_RPCS = 256
DEFAULT_IO_THREADS = 8
DEFAULT_GRACE_S = 10.0
# Signed URLs live long enough for a client to fetch a batch over a slow link, short enough that
# a URL copied out of a log is soon useless. Clients ask for URLs batch by batch, just before use.
DEFAULT_SIGNED_URL_TTL_S = 900
# Ping a client after 60 s without traffic and drop it if the ping is not answered in 20 s: a
# vanished peer (host down, cable cut, NAT forgot us) frees its calls instead of holding them.
# Clients may ping every 10 s or more, even between calls (their keepalive is 30 s).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


# What remote clients read in place of the store's URL, folder or bucket (RegistryServicer.public_message).
_STORE_LABEL = "the server's store"


class HotShardCache:
    """An LRU of verified shard bytes, bounded in bytes. Called from the event loop thread only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ShardData] = OrderedDict()
        self.size = 0
        self.hits = 0
        self.misses = 0

    def get(self, shard_id: str) -> ShardData | None:
        data = self._items.get(shard_id)
        if data is None:
            self.misses += 1
            return None
        self._items.move_to_end(shard_id)
        self.hits += 1
        return data

    def put(self, shard_id: str, data: ShardData) -> None:
        # Counted by the memory it keeps (a shard read into a pooled buffer pins all of that buffer).
        held = held_bytes(data)
        # A shard larger than a quarter of the cache would evict most of it for one reader.
        if held > self.max_bytes // 4 or shard_id in self._items:
            return
        self._items[shard_id] = data
        self.size += held
        while self.size > self.max_bytes:
            _old, evicted = self._items.popitem(last=False)
            self.size -= held_bytes(evicted)


def _chunks(object_id: str, data: ShardData) -> Iterator[tuple[int, bytes]]:
    """``(payload bytes, serialized ObjectChunk)`` for each chunk of an object, encoded as it is sent."""
    total = len(data)
    view = memoryview(data)
    for start in range(0, max(total, 1), CHUNK_BYTES):  # an empty object is one empty chunk
        part = view[start : start + CHUNK_BYTES]
        yield len(part), encode_chunk(object_id, start, total, part)


def _add_registry(servicer: RegistryServicer, server: grpc.aio.Server) -> None:
    """The generated handlers, but object chunks leave pre-encoded (rpc/chunks.py): one copy instead of three."""
    recorded: dict[str, grpc.RpcMethodHandler] = {}

    class _Recorder:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            recorded.update(handlers)

    pb_grpc.add_RegistryServicer_to_server(servicer, _Recorder())  # type: ignore[no-untyped-call]
    for method in ("GetBlob", "StreamShards"):
        recorded[method] = recorded[method]._replace(response_serializer=serialize_chunk)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, recorded),))
    server.add_registered_method_handlers(SERVICE_NAME, recorded)


class _Upload:
    """One object being received: its writer (to the store) and its running hash."""

    def __init__(self, kind: int, object_id: str, writer: ObjectWriter) -> None:
        self.kind = kind
        self.object_id = object_id
        self.writer = writer
        self.hasher = blake3.blake3()

    def add(self, data: bytes) -> None:
        self.hasher.update(data)
        self.writer.write(data)


class RegistryServicer(pb_grpc.RegistryServicer):
    """The Registry service over one repository. Subclass to inject faults in tests."""

    def __init__(self, store: Store, *, cache_bytes: int = DEFAULT_CACHE_BYTES, pace_bytes_per_s: float | None = None,
                 io_threads: int = DEFAULT_IO_THREADS, metrics: ServerMetrics | None = None,
                 max_object_bytes: int = MAX_OBJECT_BYTES,
                 signed_url_ttl: int | None = DEFAULT_SIGNED_URL_TTL_S) -> None:
        self.repo = Repository(store)
        # A store of a newer format is refused when the server starts, not on a client's first call.
        # A store that does not exist yet is served empty (pushes create it); `serve` refuses a missing bucket.
        self.repo.check_readable(must_exist=False)
        self.max_object_bytes = max_object_bytes  # the largest object an upload may declare
        # None or 0: never hand out signed URLs, even when the store could sign (clients then stream).
        self.signed_url_ttl = signed_url_ttl or None
        self._signs: bool | None = None  # whether the store can sign, learnt once (see _signs_urls)
        self.cache = HotShardCache(cache_bytes)
        self.pacer = Pacer(pace_bytes_per_s) if pace_bytes_per_s else None
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="shardstore-io")
        # Streams currently open; tests use it to prove cancellation frees resources.
        self.active_streams = 0
        self.sent_shard_bytes = 0  # shard bytes sent over gRPC
        self.sent_blob_bytes = 0  # blob bytes sent over gRPC
        self.signed_urls = 0  # signed URLs handed out (their bytes never pass through here)
        self.received_bytes = 0  # object bytes uploaded to us
        self.metrics = metrics or ServerMetrics()  # Prometheus; served over HTTP by whoever runs the server
        self.metrics.watch(self)
        # Held while write calls keep coming, so gc never deletes what a client was told we have.
        self.write_lease = WriteLease(store)

    def _begin_write(self) -> None:
        """Every write call starts here: the store's format checked for writing (config written if absent)."""
        self.repo.check_writable()
        self.write_lease.hold()

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)
        self.write_lease.release()

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, func, *args)

    def public_message(self, exc: ShardstoreError) -> str:
        """The error as a remote client may read it: where the store lives (a path, a bucket) is the operator's.

        Store errors name the store's URL, root folder or bucket; clients get "the server's store"
        instead, and the server's own log keeps the full message.
        """
        text = str(exc)
        store = self.repo.store
        private = [store.url, str(getattr(store, "root", "") or ""), str(getattr(store, "bucket", "") or "")]
        for secret in sorted({p for p in private if len(p) > 1}, key=len, reverse=True):
            text = text.replace(secret, _STORE_LABEL)
        return text

    async def _abort(self, context: grpc.aio.ServicerContext, exc: ShardstoreError) -> None:
        code = code_for(exc)
        if code is grpc.StatusCode.UNAVAILABLE:
            log.warning("store failure: %s", exc)
        context.set_trailing_metadata(error_metadata(exc))
        await context.abort(code, self.public_message(exc))

    @staticmethod
    def _check_deadline(context: grpc.aio.ServicerContext) -> None:
        # grpc cancels a handler whose deadline passes; this also refuses work
        # that arrives with no time left, before any store call starts.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise asyncio.CancelledError

    async def _load_shard(self, shard_id: str) -> ShardData:
        data = self.cache.get(shard_id)
        if data is None:
            # Repository.get_shard_bytes checks the bytes against the id (invariant 3).
            with self.metrics.time_shard_fetch():
                data = await self._run(self.repo.get_shard_bytes, shard_id)
            self.cache.put(shard_id, data)
        return data

    @property
    def sent_bytes(self) -> int:
        """Object bytes sent over gRPC, shards and blobs."""
        return self.sent_shard_bytes + self.sent_blob_bytes

    async def _send(self, chunk: tuple[int, bytes], *, shard: bool) -> bytes:
        size, message = chunk
        if self.pacer is not None:
            await self.pacer.send(size)
        if shard:
            self.sent_shard_bytes += size
        else:
            self.sent_blob_bytes += size
        return message

    # -- reads -------------------------------------------------------------------

    async def ResolveRef(self, request: pb.ResolveRefRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ResolveRefResponse:
        try:
            ref = parse_ref(f"{request.name}:{request.tag or DEFAULT_TAG}")
            return await self._run(self._resolve, ref, request.with_manifest)
        except ShardstoreError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    def _signs_urls(self) -> bool | None:
        """Whether SignObjectUrls hands out URLs here: configured to, and the store can sign (no request made).

        None when that cannot be told now (signing failed, e.g. no credentials yet): the answer then
        leaves it unset and the client asks SignObjectUrls itself, which reports the error as before.
        """
        if self._signs is None:
            if self.signed_url_ttl is None:
                self._signs = False
            else:
                try:
                    self._signs = self.repo.store.signed_url(shard_key("0" * 64), self.signed_url_ttl) is not None
                except Exception as exc:  # a store's signer may raise anything; ResolveRef must still answer
                    log.debug("cannot tell whether the store signs URLs: %s", exc)
                    return None
        return self._signs

    def _resolve(self, ref: Ref, with_manifest: bool) -> pb.ResolveRefResponse:
        """The ref's manifest id, whether we sign URLs, and when asked the manifest's bytes (if they can come along)."""
        answer = pb.ResolveRefResponse(manifest_id=self.repo.resolve(ref))
        signs = self._signs_urls()
        if signs is not None:
            answer.signs_urls = signs
        if with_manifest:
            try:
                data = self.repo.get_manifest_bytes(answer.manifest_id)
            except ShardstoreError:
                # The ref is answered either way; the client's GetManifest then names what is wrong.
                return answer
            if len(data) <= MAX_MESSAGE_BYTES:
                answer.manifest = data
        return answer

    async def GetManifest(self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
                          ) -> pb.GetManifestResponse:
        try:
            manifest_id = check_object_id(request.manifest_id, "manifest id")
            data = await self._run(self.repo.get_manifest_bytes, manifest_id)
            if len(data) > MAX_MESSAGE_BYTES:
                raise InvalidInputError(f"manifest {manifest_id}: {len(data)} bytes, over the wire limit")
            return pb.GetManifestResponse(manifest=data)
        except ShardstoreError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def GetBlob(self, request: pb.GetBlobRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[bytes]:
        try:
            blob_id = check_object_id(request.blob_id, "blob id")
            data = await self._run(self.repo.get_blob, blob_id)
        except ShardstoreError as exc:
            await self._abort(context, exc)
            return
        for chunk in _chunks(blob_id, data):
            yield await self._send(chunk, shard=False)

    async def StreamShards(self, request: pb.StreamShardsRequest, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[bytes]:
        ids = list(dict.fromkeys(request.shard_ids))
        self.active_streams += 1
        upcoming: asyncio.Future[ShardData] | None = None
        try:
            if len(ids) > MAX_IDS_PER_REQUEST:
                raise InvalidInputError(f"at most {MAX_IDS_PER_REQUEST} shard ids per request, not {len(ids)}")
            for shard_id in ids:
                check_object_id(shard_id, "shard id")
            self._check_deadline(context)
            if ids:
                upcoming = asyncio.ensure_future(self._load_shard(ids[0]))
            for index, shard_id in enumerate(ids):
                assert upcoming is not None
                data = await upcoming
                # Read the next shard while this one is on the wire.
                upcoming = asyncio.ensure_future(self._load_shard(ids[index + 1])) if index + 1 < len(ids) else None
                for chunk in _chunks(shard_id, data):
                    yield await self._send(chunk, shard=True)
        except ShardstoreError as exc:
            await self._abort(context, exc)
        finally:
            self.active_streams -= 1
            if upcoming is not None:
                upcoming.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.shield(upcoming) if not upcoming.done() else upcoming.exception()

    async def SignObjectUrls(self, request: pb.SignObjectUrlsRequest, context: grpc.aio.ServicerContext
                             ) -> pb.SignObjectUrlsResponse:
        try:
            if request.kind not in (pb.OBJECT_KIND_SHARD, pb.OBJECT_KIND_BLOB):
                raise InvalidInputError(f"sign object urls: unknown object kind {request.kind}")
            if len(request.ids) > MAX_IDS_PER_REQUEST:
                raise InvalidInputError(f"at most {MAX_IDS_PER_REQUEST} ids per request, not {len(request.ids)}")
            ids = [check_object_id(i, "object id") for i in request.ids]
            ttl = self.signed_url_ttl
            key = shard_key if request.kind == pb.OBJECT_KIND_SHARD else blob_key

            def sign() -> list[str] | None:
                assert ttl is not None
                urls: list[str] = []
                for object_id in ids:
                    url = self.repo.store.signed_url(key(object_id), ttl)
                    if url is None:
                        return None  # the store cannot sign: all or nothing, the client streams
                    urls.append(url)
                return urls

            urls = await self._run(sign) if ttl is not None and ids else None
            if urls is None:
                return pb.SignObjectUrlsResponse()
            self.signed_urls += len(urls)
            return pb.SignObjectUrlsResponse(urls=urls, expires_in_seconds=ttl)
        except ShardstoreError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def ListRefs(self, request: pb.ListRefsRequest, context: grpc.aio.ServicerContext) -> pb.ListRefsResponse:
        try:
            refs = await self._run(self.repo.list_refs)
        except ShardstoreError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None
        entries = [
            pb.RefEntry(name=ref.name, tag=ref.tag, manifest_id=manifest_id)
            for ref, manifest_id in sorted(refs, key=lambda item: (item[0].name, item[0].tag))
            if ref.name.startswith(request.name_prefix)
        ]
        return pb.ListRefsResponse(refs=entries)

    # -- writes ------------------------------------------------------------------

    async def FindMissing(self, request: pb.FindMissingRequest, context: grpc.aio.ServicerContext
                          ) -> pb.FindMissingResponse:
        try:
            if len(request.shard_ids) + len(request.blob_ids) + len(request.index_keys) > MAX_IDS_PER_REQUEST:
                raise InvalidInputError(f"at most {MAX_IDS_PER_REQUEST} ids per request")
            shards = [check_object_id(s, "shard id") for s in request.shard_ids]
            blobs = [check_object_id(b, "blob id") for b in request.blob_ids]
            index_keys = [check_object_id(k, "index key") for k in request.index_keys]

            def missing() -> tuple[list[str], list[str], list[bytes]]:
                self._begin_write()  # "already have it" is a promise until the client's ref is set
                indexed = self.repo.find_indexed(index_keys) if index_keys else {}
                return (self.repo.missing_shards(shards, list(request.shard_sizes)),
                        self.repo.missing_blobs(blobs, list(request.blob_sizes)),
                        [entry.to_bytes() for entry in indexed.values()])

            missing_shards, missing_blobs, entries = await self._run(missing)
            return pb.FindMissingResponse(missing_shard_ids=missing_shards, missing_blob_ids=missing_blobs,
                                          index_entries=entries)
        except ShardstoreError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def UploadObjects(self, request_iterator: AsyncIterator[pb.UploadChunk],
                            context: grpc.aio.ServicerContext) -> pb.UploadObjectsResponse:
        """Each object is hashed and written to the store as its chunks arrive: memory per call is one chunk.

        The object is checked against its id once its last chunk is in and only then committed (a
        local store renames its temporary file; others store the spooled copy), so nothing
        unverified is ever visible under an object's key.
        """
        committed: list[str] = []
        existing: list[str] = []
        received = 0
        current: _Upload | None = None
        try:
            async for chunk in request_iterator:
                if chunk.kind not in (pb.OBJECT_KIND_SHARD, pb.OBJECT_KIND_BLOB):
                    raise InvalidInputError(f"upload of {chunk.id!r}: unknown object kind {chunk.kind}")
                if chunk.total_size > self.max_object_bytes:
                    raise InvalidInputError(f"upload of {chunk.id}: {chunk.total_size} bytes is over the limit of "
                                            f"{self.max_object_bytes}")
                if current is None or chunk.offset == 0:
                    if current is not None:
                        raise InvalidInputError(f"upload of {current.object_id}: stream moved on before the object "
                                                "ended")
                    current = await self._run(self._start_upload, chunk)
                if chunk.id != current.object_id or chunk.offset != current.writer.size or chunk.kind != current.kind:
                    raise InvalidInputError(f"upload of {current.object_id}: chunks out of order")
                if current.writer.size + len(chunk.data) > chunk.total_size:
                    raise InvalidInputError(f"upload of {current.object_id}: more bytes than its declared size")
                await self._run(current.add, chunk.data)
                received += len(chunk.data)
                self.received_bytes += len(chunk.data)
                if current.writer.size == chunk.total_size:
                    upload, current = current, None
                    (committed if await self._run(self._commit_upload, upload) else existing).append(upload.object_id)
            if current is not None:
                raise InvalidInputError(f"upload of {current.object_id}: stream ended before the object did")
        except ShardstoreError as exc:
            await self._abort(context, exc)
        finally:
            if current is not None:
                await self._run(current.writer.discard)
        return pb.UploadObjectsResponse(committed_ids=committed, existing_ids=existing, received_bytes=received)

    def _start_upload(self, chunk: pb.UploadChunk) -> _Upload:
        object_id = check_object_id(chunk.id, "object id")
        self._begin_write()
        key = shard_key(object_id) if chunk.kind == pb.OBJECT_KIND_SHARD else blob_key(object_id)
        return _Upload(chunk.kind, object_id, self.repo.store.writer(key))

    def _commit_upload(self, upload: _Upload) -> bool:
        self._begin_write()
        if upload.hasher.hexdigest() != upload.object_id:
            upload.writer.discard()
            label = "shard" if upload.kind == pb.OBJECT_KIND_SHARD else "blob"
            raise IntegrityError(f"uploaded {label} {upload.object_id}: content does not match its id; not stored")
        return upload.writer.commit()

    async def PutManifest(self, request: pb.PutManifestRequest, context: grpc.aio.ServicerContext
                          ) -> pb.PutManifestResponse:
        try:
            manifest = await self._run(parse_manifest, request.manifest)

            def check_and_put() -> tuple[str, int]:
                self._begin_write()
                return self.repo.put_manifest(manifest, check_complete=True)  # invariant 2

            manifest_id, written = await self._run(check_and_put)
            return pb.PutManifestResponse(manifest_id=manifest_id, written=written > 0)
        except ShardstoreError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def PutIndex(self, request: pb.PutIndexRequest, context: grpc.aio.ServicerContext
                       ) -> pb.PutIndexResponse:
        try:
            if len(request.entries) > MAX_IDS_PER_REQUEST:
                raise InvalidInputError(f"at most {MAX_IDS_PER_REQUEST} index entries per request")

            def put() -> int:
                self._begin_write()
                entries = []
                for data in request.entries:
                    try:
                        entries.append(IndexEntry.parse(data, None))
                    except FormatError:
                        continue  # a cache entry that does not parse is dropped, never stored
                # Clients are not trusted to say what a shard holds: each entry is checked against it.
                return self.repo.put_index(entries, check=True)

            return pb.PutIndexResponse(written=await self._run(put))
        except ShardstoreError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def SetRef(self, request: pb.SetRefRequest, context: grpc.aio.ServicerContext) -> pb.SetRefResponse:
        try:
            ref = parse_ref(f"{request.name}:{request.tag or DEFAULT_TAG}")
            manifest_id = check_object_id(request.manifest_id, "manifest id")
            expected = request.expected_manifest_id if request.HasField("expected_manifest_id") else None

            def set_ref() -> str:
                self._begin_write()
                return self.repo.compare_and_set_ref(ref, manifest_id, expected)

            return pb.SetRefResponse(previous_manifest_id=await self._run(set_ref))
        except ShardstoreError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def DeleteRef(self, request: pb.DeleteRefRequest, context: grpc.aio.ServicerContext
                        ) -> pb.DeleteRefResponse:
        try:
            ref = parse_ref(f"{request.name}:{request.tag or DEFAULT_TAG}")
            manifest_id = await self._run(self.repo.delete_ref, ref)
            log.info("removed ref %s (was %s)", ref, manifest_id)
            return pb.DeleteRefResponse(manifest_id=manifest_id)
        except ShardstoreError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None


class RegistryServer:
    """A configured gRPC server with its servicer and health service; see :func:`create_server`."""

    def __init__(self, server: grpc.aio.Server, servicer: RegistryServicer, health_servicer: Any,
                 address: str, guard: CallGuard | None = None, http: HttpListener | None = None) -> None:
        self.server = server
        self.http = http  # the --http-port listener (shardstore/http/), on this same event loop
        self.http_address: str | None = None
        self.guard = guard  # access control, send timeouts, in-flight count (shardstore/rpc/guard.py)
        self.servicer = servicer
        self.health = health_servicer
        self.address = address
        self.serving = False  # started and not shutting down: what /readyz on the metrics port answers

    async def start(self) -> None:
        await self.server.start()
        if self.http is not None:
            try:
                port = await self.http.start()
            except BaseException:
                await self.server.stop(None)  # a half-started server would outlive the error and its event loop
                self.servicer.close()
                raise
            self.http_address = f"{self.address.rsplit(':', 1)[0]}:{port}"
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True

    async def stop(self, grace: float | None = DEFAULT_GRACE_S) -> None:
        """Graceful shutdown: report NOT_SERVING, refuse new calls, let calls in flight finish within ``grace``."""
        self.serving = False
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        self.servicer.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def _check_can_listen(host: str, port: int) -> None:
    """Fail with the OS's reason (port in use, address not ours) before grpc logs its own error on stderr.

    A probe socket with SO_REUSEADDR, as servers bind: only a socket already listening there refuses
    it. grpc's own bind still decides (this is a check, not a reservation).
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise InvalidInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def create_server(
    store: Store,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    pace_bytes_per_s: float | None = None,
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    limits: CallLimits | None = None,
    max_object_bytes: int = MAX_OBJECT_BYTES,
    servicer: RegistryServicer | None = None,
    tokens: TokenTable | None = None,
    tls: ServerTls | None = None,
    send_timeout: float | None = DEFAULT_SEND_TIMEOUT_S,
    metrics: ServerMetrics | None = None,
    http_port: int | None = None,
    signed_url_ttl: int | None = DEFAULT_SIGNED_URL_TTL_S,
) -> tuple[RegistryServer, int]:
    """An unstarted server bound to ``host:port`` (0: any free port) and the port it got. Call inside an event loop.

    ``tokens``: every call needs a bearer token with the right scope (None: open). ``tls``: TLS only, no
    plaintext port. ``send_timeout``: a stream whose client takes no message for that long is ended.
    ``http_port``: also listen for HTTP GETs and the web view on ``host:http_port`` (0: a free port; None: off).
    ``limits``: calls at once, per client address, waiting for their request (:class:`CallLimits`);
    ``max_concurrent_rpcs`` is the shorthand for its ``max_calls``.
    ``signed_url_ttl``: lifetime of the signed URLs handed out when the store can sign (None or 0: never sign).
    """
    options = [
        ("grpc.max_send_message_length", MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", MESSAGE_LIMIT),
        # Two servers must never share a port by accident (tests bind port 0 in parallel).
        ("grpc.so_reuseport", 0),
        *KEEPALIVE_OPTIONS,
    ]
    if limits is None:
        limits = CallLimits(max_calls=max_concurrent_rpcs,
                            max_calls_per_peer=min(CallLimits.max_calls_per_peer, max_concurrent_rpcs))
    guard = CallGuard(SERVICE_NAME, tokens, send_timeout, limits)
    servicer = servicer or RegistryServicer(store, cache_bytes=cache_bytes, pace_bytes_per_s=pace_bytes_per_s,
                                            metrics=metrics, max_object_bytes=max_object_bytes,
                                            signed_url_ttl=signed_url_ttl)
    # The observer goes first (outermost): calls the guard refuses are counted and logged too.
    observer = RequestObserver([servicer.metrics.observe, log_request])
    # The guard does the limiting (it counts a call only once its request is in: rpc/guard.py); grpc's own
    # limit, which counts calls from their headers on, is only a ceiling far above it.
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=limits.grpc_ceiling,
                             interceptors=[observer, guard])
    _add_registry(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    _check_can_listen(host, port)
    try:
        bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError:  # grpc >= 1.5x raises where older versions returned 0
        bound = 0
    if bound == 0:
        # grpc says no more than "failed to bind"; these are the two reasons a user can act on.
        raise InvalidInputError(f"cannot listen on {host}:{port}: the port is in use, or {host} is not an address "
                                "of this machine")
    display_host = f"[{host}]" if ":" in host else host
    http = None
    if http_port is not None:
        http = HttpListener(create_http_app(HttpContext(store, tokens, servicer.metrics, grpc_port=bound,
                                                             grpc_tls=tls is not None)), host, http_port)
    return RegistryServer(server, servicer, health_servicer, f"{display_host}:{bound}", guard, http), bound


async def serve(
    store: Store,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_ready: Callable[[RegistryServer], None] | None = None,
    grace: float = DEFAULT_GRACE_S,
    **options: Any,
) -> None:
    """Run a server until SIGTERM or SIGINT, then shut it down gracefully."""
    registry, _bound = create_server(store, host, port, **options)
    await registry.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(registry)
    try:
        await stop.wait()
    finally:
        log.info("shutting down (grace %.1f s)", grace)
        await registry.stop(grace)
