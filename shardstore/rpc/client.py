"""The gRPC client: a :class:`ModelSource` for pull and open, and a :class:`PushTarget` for push.

Reads:

* every shard received is checked against its id (BLAKE3) before it is cached
  or handed on, and every manifest and blob too (DESIGN invariant 3);
* shards found in the local :class:`~shardstore.store.cache.ShardCache` are not
  fetched at all; fetched ones are kept there;
* a receiver thread drains the stream, verifies and caches, while the caller
  decodes in its threads, so network, hashing and decoding overlap; a small
  bounded queue between them keeps memory bounded (invariant 7);
* ``UNAVAILABLE`` (and ``RESOURCE_EXHAUSTED``) are retried with exponential
  backoff and jitter; a broken shard stream resumes from the first shard not
  yet verified, and the retry budget resets whenever a shard gets through.

Writes ask the server which objects it lacks (FindMissing) and upload only
those; the server verifies each before committing it.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

from shardstore.errors import IntegrityError, StoreError
from shardstore.format.digest import check_object_id, digest
from shardstore.format.manifest import Manifest, parse_manifest
from shardstore.repo.refs import Ref, parse_ref
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc
from shardstore.rpc.server import _MESSAGE_LIMIT, CHUNK_BYTES
from shardstore.rpc.status import RETRYABLE_CODES, error_from_rpc
from shardstore.store.cache import ShardCache

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
# Shards verified and waiting for the decoder; with the decoder's own window
# this bounds what a pull holds in memory to a few shards, whatever the model.
DEFAULT_PREFETCH_SHARDS = 4

_DONE = object()


class GrpcClient:
    """A connection to a shardstore server at ``host:port``. Thread-safe; a context manager."""

    def __init__(
        self,
        address: str,
        *,
        cache: ShardCache | None = None,
        use_cache: bool = True,
        timeout: float = DEFAULT_TIMEOUT_S,
        stream_timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_S,
        prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
    ) -> None:
        self.address = address
        self.cache = (cache or ShardCache()) if use_cache else None
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retries = retries
        self.backoff = backoff
        self.prefetch_shards = max(1, prefetch_shards)
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
            ("grpc.max_send_message_length", _MESSAGE_LIMIT),
        ])
        self._stub = pb_grpc.RegistryStub(self._channel)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._received = 0
        self.cached_shards = 0
        self.fetched_shards = 0
        self.retried = 0

    # -- bookkeeping -------------------------------------------------------------

    @property
    def transferred_bytes(self) -> int:
        """Bytes received from the server (whole protobuf messages, framing included)."""
        return self._received

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self._received += nbytes

    def _sleep_before_retry(self, attempt: int) -> None:
        with self._lock:
            self.retried += 1
        delay = min(MAX_BACKOFF_S, self.backoff * (2**attempt))
        time.sleep(delay * random.uniform(0.5, 1.0))  # jitter: clients that failed together don't retry together

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() in RETRYABLE_CODES and attempt < self.retries:
                    self._sleep_before_retry(attempt)
                    attempt += 1
                    continue
                raise error_from_rpc(exc, f"{what} at {self.address}") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GrpcClient({self.address!r})"

    # -- ModelSource ---------------------------------------------------------------

    def resolve(self, ref: Ref) -> str:
        def call() -> str:
            response = self._stub.ResolveRef(pb.ResolveRefRequest(name=ref.name, tag=ref.tag), timeout=self.timeout)
            self._count(response.ByteSize())
            return str(response.manifest_id)

        return check_object_id(self._retrying(f"resolve {ref}", call), f"manifest id in ref {ref}")

    def get_manifest(self, manifest_id: str) -> Manifest:
        check_object_id(manifest_id, "manifest id")

        def call() -> bytes:
            response = self._stub.GetManifest(pb.GetManifestRequest(manifest_id=manifest_id), timeout=self.timeout)
            self._count(response.ByteSize())
            return bytes(response.manifest)

        # parse_manifest checks the bytes against the id before anything else.
        return parse_manifest(self._retrying(f"get manifest {manifest_id}", call), manifest_id)

    def get_blob(self, blob_id: str) -> bytes:
        check_object_id(blob_id, "blob id")

        def call() -> bytes:
            parts: list[bytes] = []
            for chunk in self._stub.GetBlob(pb.GetBlobRequest(blob_id=blob_id), timeout=self.timeout):
                self._count(chunk.ByteSize())
                parts.append(chunk.data)
            return b"".join(parts)

        data = self._retrying(f"get blob {blob_id}", call)
        if digest(data) != blob_id:
            raise IntegrityError(f"blob {blob_id}: received bytes do not match its id (corrupt or truncated)")
        return data

    def fetch_shards(self, shard_ids: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yield ``(id, bytes)`` for each distinct id, verified: cached ones first, then the rest as they arrive."""
        pending: list[str] = []
        for shard_id in dict.fromkeys(shard_ids):
            check_object_id(shard_id, "shard id")
            data = self.cache.get(shard_id) if self.cache is not None else None
            if data is None:
                pending.append(shard_id)
                continue
            with self._lock:
                self.cached_shards += 1
            yield shard_id, data
        if pending:
            yield from self._pipelined(pending)

    def _pipelined(self, shard_ids: list[str]) -> Iterator[tuple[str, bytes]]:
        """Run :meth:`_receive` in a thread, handing shards over through a bounded queue."""
        handoff: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch_shards)
        stop = threading.Event()
        calls: list[grpc.Call] = []

        def offer(item: object) -> bool:
            while not stop.is_set():
                try:
                    handoff.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def receive() -> None:
            try:
                for item in self._receive(shard_ids, stop, calls):
                    if not offer(item):
                        return
                offer(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                offer(exc)

        worker = threading.Thread(target=receive, name="shardstore-receive", daemon=True)
        worker.start()
        try:
            while True:
                item = handoff.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # The consumer stopped early (error, or it needed no more): cancel the
            # call so the server frees the stream at once, and let the thread end.
            stop.set()
            for call in calls:
                call.cancel()
            worker.join(timeout=10)

    def _receive(self, shard_ids: list[str], stop: threading.Event, calls: list[grpc.Call]
                 ) -> Iterator[tuple[str, bytes]]:
        remaining = list(shard_ids)
        attempt = 0
        while remaining and not stop.is_set():
            stream = self._stub.StreamShards(pb.StreamShardsRequest(shard_ids=remaining), timeout=self.stream_timeout)
            calls[:] = [stream]
            parts: list[bytes] = []
            filled = 0
            try:
                for chunk in stream:
                    self._count(chunk.ByteSize())
                    expected = remaining[0] if remaining else None
                    if chunk.id != expected or chunk.offset != filled:
                        raise IntegrityError(
                            f"shard {expected}: server sent {chunk.id} at offset {chunk.offset}, expected {filled}"
                        )
                    parts.append(chunk.data)
                    filled += len(chunk.data)
                    if filled < chunk.total_size:
                        continue
                    data = b"".join(parts)
                    parts, filled = [], 0
                    if len(data) != chunk.total_size or digest(data) != expected:
                        raise IntegrityError(f"shard {expected}: received bytes do not match its id; refused")
                    if self.cache is not None:
                        self.cache.put(expected, data)
                    with self._lock:
                        self.fetched_shards += 1
                    remaining.pop(0)
                    attempt = 0  # progress: a later failure gets the full retry budget again
                    yield expected, data
                if remaining and not stop.is_set():
                    raise StoreError(f"stream shards at {self.address}: server ended the stream early")
            except grpc.RpcError as exc:
                if stop.is_set():
                    return
                if exc.code() in RETRYABLE_CODES and attempt < self.retries:
                    self._sleep_before_retry(attempt)
                    attempt += 1
                    continue  # resume from the first shard not yet verified
                raise error_from_rpc(exc, f"stream shards at {self.address}") from None

    # -- PushTarget ----------------------------------------------------------------

    def find_missing(self, shard_ids: Iterable[str] = (), blob_ids: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        request = pb.FindMissingRequest(shard_ids=list(shard_ids), blob_ids=list(blob_ids))

        def call() -> tuple[list[str], list[str]]:
            response = self._stub.FindMissing(request, timeout=self.timeout)
            self._count(response.ByteSize())
            return list(response.missing_shard_ids), list(response.missing_blob_ids)

        return self._retrying("find missing objects", call)

    def missing_shards(self, shard_ids: Iterable[str]) -> list[str]:
        return self.find_missing(shard_ids=dict.fromkeys(shard_ids))[0]

    def _upload(self, kind: pb.ObjectKind, object_id: str, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        total = len(view)

        def chunks() -> Iterator[pb.UploadChunk]:
            for start in range(0, max(total, 1), CHUNK_BYTES):
                yield pb.UploadChunk(kind=kind, id=object_id, offset=start, total_size=total,
                                     data=bytes(view[start : start + CHUNK_BYTES]))

        def call() -> None:
            response = self._stub.UploadObjects(chunks(), timeout=self.stream_timeout)
            self._count(response.ByteSize())

        self._retrying(f"upload {object_id}", call)

    def put_shard(self, shard_id: str, data: bytes | memoryview) -> bool:
        """Upload a shard unless the server has it; returns whether bytes were sent."""
        if not self.find_missing(shard_ids=[shard_id])[0]:
            return False
        self._upload(pb.OBJECT_KIND_SHARD, shard_id, data)
        return True

    def put_blob(self, data: bytes) -> tuple[str, bool]:
        blob_id = digest(data)
        if not self.find_missing(blob_ids=[blob_id])[1]:
            return blob_id, False
        self._upload(pb.OBJECT_KIND_BLOB, blob_id, data)
        return blob_id, True

    def put_manifest(self, manifest: Manifest) -> tuple[str, int]:
        data = manifest.to_bytes()

        def call() -> tuple[str, int]:
            response = self._stub.PutManifest(pb.PutManifestRequest(manifest=data), timeout=self.timeout)
            self._count(response.ByteSize())
            return str(response.manifest_id), len(data) if response.written else 0

        return self._retrying("put manifest", call)

    def set_ref(self, ref: Ref, manifest_id: str) -> None:
        """Point ``ref`` at a stored manifest, unconditionally (last step of a push)."""
        self.compare_and_set_ref(ref, manifest_id, None)

    def compare_and_set_ref(self, ref: Ref, manifest_id: str, expected: str | None) -> str:
        """Point ``ref`` at a stored manifest if it points at ``expected`` ("" = must not exist; None = any).

        Returns the manifest id the ref pointed at before ("" when new). A lost
        compare-and-set raises :class:`~shardstore.errors.ConflictError`.
        """
        request = pb.SetRefRequest(name=ref.name, tag=ref.tag, manifest_id=manifest_id)
        if expected is not None:
            request.expected_manifest_id = expected

        def call() -> str:
            response = self._stub.SetRef(request, timeout=self.timeout)
            self._count(response.ByteSize())
            return str(response.previous_manifest_id)

        return self._retrying(f"set ref {ref}", call)

    def list_refs(self, name_prefix: str = "") -> list[tuple[Ref, str]]:
        def call() -> list[tuple[Ref, str]]:
            response = self._stub.ListRefs(pb.ListRefsRequest(name_prefix=name_prefix), timeout=self.timeout)
            self._count(response.ByteSize())
            return [(parse_ref(f"{e.name}:{e.tag}"), str(e.manifest_id)) for e in response.refs]

        return self._retrying("list refs", call)
