"""The gRPC client: the :class:`~shardstore.repo.registry.Registry` of a server.

Reads:

* every shard received is checked against its id (BLAKE3) before it is cached
  or handed on, and every manifest and blob too (DESIGN invariant 3); the check
  runs in the shared workers, not in the receive thread;
* received chunks are copied into one buffer of the shard's announced size;
* cache writes are write-behind (:class:`~shardstore.store.cache.CacheWriter`,
  bounded), never on the receive or decode path;
* shards found in the local :class:`~shardstore.store.cache.ShardCache` are not
  fetched at all; fetched ones are kept there;
* a receiver thread drains the stream, verifies and caches, while the caller
  decodes in its threads, so network, hashing and decoding overlap; a small
  bounded queue between them keeps memory bounded (invariant 7);
* ``UNAVAILABLE`` (and ``RESOURCE_EXHAUSTED``) are retried with exponential
  backoff and jitter; a broken shard stream resumes from the first shard not
  yet verified, and the retry budget resets whenever a shard gets through.

Shard and blob bytes may come by plain HTTP instead (:mod:`shardstore.rpc.http_fetch`): from a
``mirror`` (an HTTP cache in front of the server's ``--http-port``; default ``$SHARDSTORE_MIRROR``),
else from short-lived signed URLs into the server's bucket (SignObjectUrls) when its store can
sign. Each object is checked against its id; a miss, a failure or a wrong byte fetches that
object through the gRPC stream instead. Refs and manifests always come from the server.

Writes ask the server which objects it lacks (FindMissing) and upload only
those; the server verifies each before committing it.

Nothing waits forever: unary calls have a deadline (``timeout``); a stream is
cancelled when no message moves for ``idle_timeout`` seconds (a whole-stream
deadline would have to grow with the model); keepalive pings find a peer that
vanished without closing the connection. A bearer ``token`` (default
``$SHARDSTORE_TOKEN``) goes with every call; ``tls`` (or a ``grpcs://`` URL)
selects TLS, with a client certificate for mutual TLS.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from shardstore.buffers import READ_BUFFERS
from shardstore.errors import FormatError, IntegrityError, InvalidInputError, StoreError
from shardstore.format.digest import check_object_id, digest, matches
from shardstore.format.manifest import Manifest, parse_manifest
from shardstore.format.safetensors_io import MAX_HEADER_BYTES
from shardstore.repo.content_index import IndexEntry
from shardstore.repo.pool import default_threads, ordered_map
from shardstore.repo.refs import Ref, parse_ref
from shardstore.repo.registry import ShardData
from shardstore.rpc._generated import registry_pb2 as pb
from shardstore.rpc._generated import registry_pb2_grpc as pb_grpc
from shardstore.rpc.chunks import decode_chunk
from shardstore.rpc.http_fetch import HttpObjectFetcher, default_mirror
from shardstore.rpc.status import RETRYABLE_CODES, error_from_rpc
from shardstore.rpc.tls import ClientTls
from shardstore.rpc.wire import (
    AUTHORIZATION_KEY,
    BEARER,
    CHUNK_BYTES,
    CLIENT_TOKEN_ENV,
    MAX_OBJECT_BYTES,
    MESSAGE_LIMIT,
)
from shardstore.store.cache import CacheWriter, ShardCache

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
# A stream that moves no message for this long is cancelled (and resumed, within the retry budget).
DEFAULT_IDLE_TIMEOUT_S = 60.0
# Ping after 30 s without traffic, give up on the connection when a ping goes unanswered for 10 s.
DEFAULT_KEEPALIVE_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0
# Sending a token in plaintext to another host hands it to anyone on the path; refused unless this is "1".
ALLOW_PLAINTEXT_TOKEN_ENV = "SHARDSTORE_ALLOW_PLAINTEXT_TOKEN"
# Retries stop at whichever comes first: this many, or the resume timeout after the first failure
# in a row. The time is what matters: a server restarting (a rollout, a crash) takes seconds, not tries.
DEFAULT_RETRIES = 50
DEFAULT_RESUME_TIMEOUT_S = 30.0
RESUME_TIMEOUT_ENV = "SHARDSTORE_RESUME_TIMEOUT"
DEFAULT_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
# Shards verified and waiting for the decoder; with the decoder's own window
# this bounds what a pull holds in memory to a few shards, whatever the model.
DEFAULT_PREFETCH_SHARDS = 4
# Content-index keys per FindMissing (the server takes 100000 ids; an entry answer is ~300 bytes a
# piece, so this keeps the answer well inside the message limit). A 4 MiB-chunked model under 80 GB
# is one call.
INDEX_KEYS_PER_REQUEST = 20_000

# Signed URLs are asked for this many shards at a time, just before they are fetched, so that
# none expires while earlier batches download and a request stays small.
SIGN_BATCH = 64
# Blobs smaller than this (config, tokenizer, README; and safetensors headers, whose size no
# manifest gives) always come through the server: a signed URL would cost a round trip to sign and
# another to the bucket where the server's stream costs one, to save the server a few KB.
SIGNED_BLOB_MIN_BYTES = 1 << 20

_DONE = object()
# A safetensors header blob: its 8-byte length, then at most MAX_HEADER_BYTES of JSON.
_HEADER_BLOB_LIMIT = 8 + MAX_HEADER_BYTES

log = logging.getLogger("shardstore.rpc.client")


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _IdleWatchdog:
    """Cancels a call when no message has moved for ``idle_s`` seconds (None: never). A context manager."""

    def __init__(self, idle_s: float | None) -> None:
        self._call: Any = None
        self._idle_s = idle_s
        self._last = time.monotonic()
        self._closed = threading.Event()
        self.fired = False

    def watch(self, call: Any) -> _IdleWatchdog:
        """Start watching ``call`` (anything with ``cancel()``)."""
        self._call = call
        self._last = time.monotonic()
        if self._idle_s is not None:
            threading.Thread(target=self._watch, name="shardstore-watchdog", daemon=True).start()
        return self

    def tick(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        assert self._idle_s is not None
        while not self._closed.wait(max(0.01, self._last + self._idle_s - time.monotonic())):
            if time.monotonic() - self._last >= self._idle_s:
                self.fired = True
                self._call.cancel()
                return

    def __enter__(self) -> _IdleWatchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()

    def stalled(self, where: str) -> StoreError:
        return StoreError(f"{where}: no data for {self._idle_s:g} s (server too slow or silent); gave up")


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
        resume_timeout: float | None = None,
        prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
        token: str | None = None,
        tls: ClientTls | None = None,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT_S,
        keepalive: float = DEFAULT_KEEPALIVE_S,
        mirror: str | None = None,
        signed_urls: bool = True,
    ) -> None:
        self.address = address
        self.cache = (cache or ShardCache()) if use_cache else None
        self._cache_writer = CacheWriter(self.cache) if self.cache is not None else None
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retries = retries
        self.backoff = backoff
        # How long after a failure the client keeps retrying (with backoff) for a server to come back.
        if resume_timeout is None:
            configured = os.environ.get(RESUME_TIMEOUT_ENV)
            try:
                resume_timeout = float(configured) if configured else DEFAULT_RESUME_TIMEOUT_S
            except ValueError:
                raise InvalidInputError(f"${RESUME_TIMEOUT_ENV}: expected seconds, not {configured!r}") from None
        self.resume_timeout = resume_timeout
        self.prefetch_shards = max(1, prefetch_shards)
        if idle_timeout is not None and not (math.isfinite(idle_timeout) and idle_timeout > 0):
            raise InvalidInputError(f"the timeout must be more than 0 seconds, not {idle_timeout!r}")
        self.idle_timeout = idle_timeout
        self.tls = tls
        token = token if token is not None else os.environ.get(CLIENT_TOKEN_ENV) or None
        if token is not None:
            token = token.strip() or None  # a token file saved with a newline or CRLF at its end
        if token is not None and not all("!" <= ch <= "~" for ch in token):
            # grpc would refuse the header only at the first call, with lines from its C core.
            raise InvalidInputError("the token (--token or $SHARDSTORE_TOKEN) has a character an HTTP header cannot "
                                    "carry: a token is printable ASCII without spaces")
        if token is not None and tls is None and not _is_loopback(address) \
                and os.environ.get(ALLOW_PLAINTEXT_TOKEN_ENV) != "1":
            raise InvalidInputError(f"refusing to send a token in plaintext to {address}: use grpcs:// or --tls-ca "
                                    f"(or set {ALLOW_PLAINTEXT_TOKEN_ENV}=1 behind a TLS-terminating proxy)")
        self._metadata: tuple[tuple[str, str], ...] = ((AUTHORIZATION_KEY, f"{BEARER}{token}"),) if token else ()
        mirror = (mirror if mirror is not None else default_mirror() or "").rstrip("/") or None
        if mirror is not None and not mirror.startswith(("http://", "https://")):
            raise InvalidInputError(f"mirror {mirror}: expected an http:// or https:// URL")
        self.mirror = mirror
        # A mirror gets the token only where the gRPC side would send it: over TLS or on this host.
        mirror_token = token if mirror is not None and (
            mirror.startswith("https://") or _is_loopback(mirror.split("://", 1)[1].split("/", 1)[0])
            or os.environ.get(ALLOW_PLAINTEXT_TOKEN_ENV) == "1") else None
        self._mirror_http = (HttpObjectFetcher(headers={"Authorization": f"{BEARER}{mirror_token}"}
                                               if mirror_token else None, timeout=idle_timeout or DEFAULT_TIMEOUT_S)
                             if mirror is not None else None)
        # Signed URLs carry their own credential; the server says whether its store can sign.
        self._signed_http = HttpObjectFetcher(timeout=idle_timeout or DEFAULT_TIMEOUT_S) if signed_urls else None
        self._can_sign = signed_urls
        # Asked as soon as a manifest is known, answered while headers and files are fetched: whether
        # the server can sign at all (a server over a local folder cannot). See _probe_signing.
        self._sign_probe: grpc.Future | None = None
        self._signing_known = False  # a server that says in ResolveRef whether it signs is not probed
        options = [
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
            ("grpc.max_send_message_length", MESSAGE_LIMIT),
            ("grpc.keepalive_time_ms", int(keepalive * 1000)),
            ("grpc.keepalive_timeout_ms", int(min(keepalive, KEEPALIVE_TIMEOUT_S) * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        self._channel = (grpc.secure_channel(address, tls.credentials(), options=options) if tls is not None
                         else grpc.insecure_channel(address, options=options))
        self._stub = pb_grpc.RegistryStub(self._channel)  # type: ignore[no-untyped-call]
        # Shard chunks parsed by hand into views of the message, not copied (rpc/chunks.py).
        self._stream_shards = self._channel.unary_stream(
            f"/{pb.DESCRIPTOR.services_by_name['Registry'].full_name}/StreamShards",
            request_serializer=pb.StreamShardsRequest.SerializeToString, response_deserializer=decode_chunk,
            _registered_method=True)
        self._lock = threading.Lock()
        # The size each object must have, from the manifests this client fetched (exact), or a cap
        # (safetensors headers): a server's stream is never believed past what was asked for.
        self._expected_sizes: dict[str, tuple[int, bool]] = {}
        # The manifest the last resolve brought along (id, bytes): one, so it is bounded by one message.
        self._resolved_manifest: tuple[str, bytes] = ("", b"")
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

    def _may_retry(self, attempt: int, failing_since: float) -> bool:
        """Whether another try is allowed: within the retry count and the resume timeout of the first failure."""
        return attempt < self.retries and time.monotonic() - failing_since < self.resume_timeout

    def _sleep_before_retry(self, attempt: int, failing_since: float | None = None) -> None:
        with self._lock:
            self.retried += 1
        delay = min(MAX_BACKOFF_S, self.backoff * (2**attempt))
        delay *= random.uniform(0.5, 1.0)  # jitter: clients that failed together don't retry together
        if failing_since is not None:  # the last try comes at the deadline, not after it
            delay = min(delay, max(0.0, failing_since + self.resume_timeout - time.monotonic()))
        time.sleep(delay)

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, tried again while the server is busy or unreachable; then a one-line error naming ``what``."""
        try:
            return self._with_retries(call)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"{what} at {self.address}", self._hint(exc)) from None

    def _with_retries(self, call: Callable[[], T]) -> T:
        """``call()``, tried again on a retryable status with backoff; the last ``grpc.RpcError`` otherwise."""
        attempt = 0
        failing_since = 0.0
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if attempt == 0:
                    failing_since = time.monotonic()
                if exc.code() in RETRYABLE_CODES and self._may_retry(attempt, failing_since):
                    self._sleep_before_retry(attempt, failing_since)
                    attempt += 1
                    continue
                raise

    @property
    def _unary_options(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "metadata": self._metadata}

    def _hint(self, exc: grpc.RpcError) -> str:
        """What the user may have got wrong when a connection fails: the commonest TLS mix-ups."""
        if exc.code() is not grpc.StatusCode.UNAVAILABLE:
            return ""
        details = exc.details() or ""
        if self.tls is None:
            return "if the server uses TLS, connect with grpcs:// or --tls-ca"
        if "WRONG_VERSION_NUMBER" in details:
            return "the server does not speak TLS: connect with grpc://"
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return "the server's certificate is not signed by a CA this client trusts: pass that CA with --tls-ca"
        return "with TLS: check --tls-ca, and --tls-cert/--tls-key if the server requires a client certificate"

    @property
    def mirror_bytes(self) -> int:
        """Object bytes read from the mirror (verified)."""
        return self._mirror_http.figures.bytes if self._mirror_http is not None else 0

    @property
    def signed_url_bytes(self) -> int:
        """Object bytes read through signed URLs, straight from object storage (verified)."""
        return self._signed_http.figures.bytes if self._signed_http is not None else 0

    @property
    def concurrency(self) -> int:
        return 1  # one connection; uploads are sequential calls on it

    def push_lease(self, note: str) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()  # the server holds a write lease for the pushes it serves

    @property
    def url(self) -> str:
        return f"{'grpcs' if self.tls is not None else 'grpc'}://{self.address}"

    def close(self) -> None:
        self._channel.close()
        for fetcher in (self._mirror_http, self._signed_http):
            if fetcher is not None:
                fetcher.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GrpcClient({self.address!r})"

    # -- reads (ModelSource) ---------------------------------------------------------------

    def resolve(self, ref: Ref, *, with_manifest: bool = True) -> str:
        """The ref's manifest id; ``with_manifest``, the manifest comes in the same answer and waits for
        :meth:`get_manifest` (one round trip where there were two)."""
        def call() -> pb.ResolveRefResponse:
            request = pb.ResolveRefRequest(name=ref.name, tag=ref.tag, with_manifest=with_manifest)
            response: pb.ResolveRefResponse = self._stub.ResolveRef(request, **self._unary_options)
            self._count(response.ByteSize())
            return response

        response = self._retrying(f"resolve {ref}", call)
        manifest_id = check_object_id(str(response.manifest_id), f"manifest id in ref {ref}")
        with self._lock:
            if with_manifest and response.manifest:
                self._resolved_manifest = (manifest_id, bytes(response.manifest))
            if response.HasField("signs_urls"):
                # The server said whether it signs: no probe needed (see _probe_signing).
                self._signing_known = True
                self._can_sign = self._can_sign and response.signs_urls
        return manifest_id

    def get_manifest(self, manifest_id: str) -> Manifest:
        check_object_id(manifest_id, "manifest id")
        with self._lock:
            # Taken, not kept: the bytes are used once, and bytes that fail their check are not met again.
            held_id, data = self._resolved_manifest
            if held_id == manifest_id:
                self._resolved_manifest = ("", b"")
        if held_id != manifest_id:
            def call() -> bytes:
                response = self._stub.GetManifest(pb.GetManifestRequest(manifest_id=manifest_id),
                                                  **self._unary_options)
                self._count(response.ByteSize())
                return bytes(response.manifest)

            data = self._retrying(f"get manifest {manifest_id}", call)
        # parse_manifest checks the bytes against the id before anything else, wherever they came from.
        manifest = parse_manifest(data, manifest_id)
        self._expect(manifest)
        self._probe_signing(manifest)
        return manifest

    def _expect(self, manifest: Manifest) -> None:
        """Remember the sizes a verified manifest gives its objects: they bound what the server may send."""
        with self._lock:
            for shard_id, size in manifest.shards.items():
                self._expected_sizes[shard_id] = (size, True)
            for blob in manifest.blobs.values():
                self._expected_sizes[blob.id] = (blob.size, True)
            for record in manifest.files:
                self._expected_sizes.setdefault(record.header, (_HEADER_BLOB_LIMIT, False))

    def _size_limit(self, object_id: str) -> int:
        """The most bytes ``object_id`` may have: its manifest's size, else a cap."""
        with self._lock:
            return self._expected_sizes.get(object_id, (MAX_OBJECT_BYTES, False))[0]

    def _known_large(self, blob_id: str) -> bool:
        """Whether a verified manifest says ``blob_id`` has at least SIGNED_BLOB_MIN_BYTES."""
        with self._lock:
            size, exact = self._expected_sizes.get(blob_id, (0, False))
        return exact and size >= SIGNED_BLOB_MIN_BYTES

    def _bound(self, label: str, object_id: str, declared: int, received: int) -> None:
        """Refuse a stream that declares or sends more than the object may have (exact when a manifest said)."""
        with self._lock:
            limit, exact = self._expected_sizes.get(object_id, (MAX_OBJECT_BYTES, False))
        if (exact and declared != limit) or declared > limit:
            what = "the manifest says" if exact else "the limit is"
            raise IntegrityError(f"{label} {object_id}: server declared {declared} bytes, {what} {limit}; refused")
        if received > declared:
            raise IntegrityError(f"{label} {object_id}: server sent over the {declared} bytes it declared; refused")

    def get_blob(self, blob_id: str) -> bytes:
        check_object_id(blob_id, "blob id")
        data = self._blob_over_http(blob_id)
        if data is not None:
            return data

        def call() -> bytes:
            parts: list[bytes] = []
            received = 0
            request = pb.GetBlobRequest(blob_id=blob_id)
            stream = self._stub.GetBlob(request, **self._unary_options)
            try:
                for chunk in stream:
                    self._count(chunk.ByteSize())
                    received += len(chunk.data)
                    self._bound("blob", blob_id, chunk.total_size, received)
                    parts.append(chunk.data)
            finally:
                stream.cancel()  # a refused stream is ended now, not when the server tires
            return b"".join(parts)

        data = self._retrying(f"get blob {blob_id}", call)
        if digest(data) != blob_id:
            raise IntegrityError(f"blob {blob_id}: received bytes do not match its id (corrupt or truncated)")
        return data

    def fetch_shards(self, shard_ids: Iterable[str]) -> Iterator[tuple[str, ShardData]]:
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
            try:
                yield from self._fetch_missing(pending)
            finally:
                if self._cache_writer is not None:
                    self._cache_writer.flush()  # a finished fetch leaves a complete cache

    # -- shard and blob bytes over HTTP, then over gRPC --------------------------------

    def _fetch_missing(self, shard_ids: list[str]) -> Iterator[tuple[str, ShardData]]:
        """The mirror, then signed URLs, then the gRPC stream: each takes what the one before could not give."""
        remaining = shard_ids
        if self._mirror_http is not None:
            mirror = self.mirror
            remaining = yield from self._over_http(
                remaining, self._mirror_http, lambda ids: [f"{mirror}/v1/shards/{i}" for i in ids])
        if remaining and self._signed_http is not None and self._can_sign:
            remaining = yield from self._over_http(remaining, self._signed_http, self._sign_shards)
        if remaining:
            # Checking each shard against its id (and handing it to the cache writer) runs in
            # the shared workers, so the receive thread never waits on a hash or a disk.
            yield from ordered_map(self._accept, self._pipelined(remaining), default_threads())

    def _accept(self, item: tuple[str, ShardData]) -> tuple[str, ShardData]:
        shard_id, data = item
        if not matches(data, shard_id):
            raise IntegrityError(f"shard {shard_id}: received bytes do not match its id; refused")
        if self._cache_writer is not None:
            self._cache_writer.submit(shard_id, data)
        with self._lock:
            self.fetched_shards += 1
        return item

    def _over_http(self, shard_ids: list[str], fetcher: HttpObjectFetcher,
                   urls_for: Callable[[list[str]], list[str] | None]
                   ) -> Generator[tuple[str, bytes], None, list[str]]:
        """Yield the shards ``fetcher`` gets right, batch by batch; return the ids left for the next source."""
        left: list[str] = []
        for start in range(0, len(shard_ids), SIGN_BATCH):
            batch = shard_ids[start : start + SIGN_BATCH]
            urls = urls_for(batch)
            if urls is None:  # this source cannot serve: everything not yet fetched goes on
                return left + shard_ids[start:]
            failed_before = fetcher.figures.failed
            got = 0
            for shard_id, data in fetcher.get_many(zip(batch, urls, strict=True), limit_of=self._size_limit):
                if data is None:
                    left.append(shard_id)
                    continue
                got += 1
                self._count(len(data))
                if self._cache_writer is not None:
                    self._cache_writer.submit(shard_id, data)
                with self._lock:
                    self.fetched_shards += 1
                yield shard_id, data
            if not got and fetcher.figures.failed - failed_before == len(batch):
                # Not one answer: the mirror is down or the bucket's endpoint unreachable from here. Stop
                # paying a failed request per shard; the next source takes the rest.
                log.warning("no shard of %d came over HTTP; using the server for the rest", len(batch))
                return left + shard_ids[start + len(batch) :]
        return left

    def _probe_signing(self, manifest: Manifest) -> None:
        """Ask, without waiting, for one shard's URL: the first shard fetch then knows whether to sign.

        Without it a pull from a server that cannot sign spends a whole round trip, just before its
        shards, learning so; the probe's round trip runs while headers and files are fetched. A
        server that said in its ResolveRef answer whether it signs (``signs_urls``) is not probed:
        then the shard stream need not wait even for the probe.
        """
        first = next(iter(manifest.shards), None)
        with self._lock:
            if first is None or self._sign_probe is not None or not self._can_sign or self._signed_http is None \
                    or self._signing_known:
                return
            self._sign_probe = self._stub.SignObjectUrls.future(
                pb.SignObjectUrlsRequest(kind=pb.OBJECT_KIND_SHARD, ids=[first]), timeout=self._sign_deadline,
                metadata=self._metadata)

    @property
    def _sign_deadline(self) -> float:
        # Signing is a shortcut: a server slow to sign is not waited for longer than a stalled stream would be.
        return min(self.timeout, self.idle_timeout or self.timeout)

    def _probe_says_it_can(self, probe: grpc.Future) -> bool:
        """The probe's answer: True when it got a URL, or when it only met a busy server (then ask anyway)."""
        try:
            answer = probe.result()
        except grpc.RpcError as exc:
            if exc.code() in RETRYABLE_CODES:
                return True
            raise
        self._count(answer.ByteSize())
        return len(answer.urls) == 1

    def _sign(self, kind: pb.ObjectKind, ids: list[str]) -> list[str] | None:
        """Signed URLs for ``ids`` (same order), or None when the server cannot or will not sign."""
        with self._lock:
            probe, self._sign_probe = self._sign_probe, None

        def ask() -> pb.SignObjectUrlsResponse:
            answer: pb.SignObjectUrlsResponse = self._stub.SignObjectUrls(
                pb.SignObjectUrlsRequest(kind=kind, ids=ids), timeout=self._sign_deadline, metadata=self._metadata)
            return answer

        try:
            if probe is not None and not self._probe_says_it_can(probe):
                self._stop_signing()  # the store cannot sign: don't ask at all
                return None
            # A busy server is asked again, as for any other call: busy is not "cannot sign".
            response = self._with_retries(ask)
        except grpc.RpcError as exc:
            # UNIMPLEMENTED: a server older than SignObjectUrls. Anything else, the stream reports properly (or
            # works); either way this client streams from now on instead of asking again for every batch.
            self._stop_signing()
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                log.info("sign object urls at %s: %s; streaming instead", self.address, exc.code().name)
            return None
        self._count(response.ByteSize())
        if len(response.urls) != len(ids):
            self._stop_signing()  # the store cannot sign: don't ask again
            return None
        return list(response.urls)

    def _stop_signing(self) -> None:
        with self._lock:  # resolve() also writes it
            self._can_sign = False

    def _sign_shards(self, ids: list[str]) -> list[str] | None:
        return self._sign(pb.OBJECT_KIND_SHARD, ids)

    def _blob_over_http(self, blob_id: str) -> bytes | None:
        """A blob from the mirror or a signed URL, verified; None to fetch it through the server."""
        data = None
        if self._mirror_http is not None:
            data = self._mirror_http.get(blob_id, f"{self.mirror}/v1/blobs/{blob_id}", "blob",
                                         self._size_limit(blob_id))
        if data is None and self._signed_http is not None and self._can_sign and self._known_large(blob_id):
            urls = self._sign(pb.OBJECT_KIND_BLOB, [blob_id])
            data = self._signed_http.get(blob_id, urls[0], "blob", self._size_limit(blob_id)) if urls else None
        if data is not None:
            self._count(len(data))
        return data

    def _pipelined(self, shard_ids: list[str]) -> Iterator[tuple[str, ShardData]]:
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
                 ) -> Iterator[tuple[str, ShardData]]:
        """Receive the shards' bytes, not yet checked: the receive thread only receives."""
        remaining = list(shard_ids)
        attempt = 0
        failing_since = 0.0
        while remaining and not stop.is_set():
            stream = self._stream_shards(pb.StreamShardsRequest(shard_ids=remaining), timeout=self.stream_timeout,
                                         metadata=self._metadata)
            calls[:] = [stream]
            buffer = memoryview(b"")
            filled = 0
            watchdog = _IdleWatchdog(self.idle_timeout).watch(stream)
            try:
                for chunk in stream:
                    watchdog.tick()
                    self._count(chunk.wire_bytes)
                    expected = remaining[0] if remaining else ""
                    if chunk.malformed:
                        raise IntegrityError(f"shard {expected}: server sent a message that is not an ObjectChunk")
                    if not expected or chunk.id != expected or chunk.offset != filled:
                        raise IntegrityError(
                            f"shard {expected}: server sent {chunk.id} at offset {chunk.offset}, expected {filled}"
                        )
                    # Bounded before a byte is kept: the manifest's size, else the object limit.
                    self._bound("shard", expected, chunk.total_size, filled + len(chunk.data))
                    if filled == 0:
                        # One buffer of the declared size, filled in place: no list of parts to join,
                        # and a pooled one, already faulted in (shardstore.buffers).
                        buffer = READ_BUFFERS.take(chunk.total_size)
                    elif chunk.total_size != len(buffer):
                        raise IntegrityError(f"shard {expected}: server changed its size from {len(buffer)} to "
                                             f"{chunk.total_size} bytes mid-stream")
                    end = filled + len(chunk.data)
                    buffer[filled:end] = chunk.data
                    filled = end
                    if filled < len(buffer):
                        continue
                    data, buffer, filled = buffer, memoryview(b""), 0
                    remaining.pop(0)
                    attempt = 0  # progress: a later failure gets the full retry budget again
                    # Checked against its id by the consumer's workers (_accept), off this thread.
                    yield expected, data
                if remaining and not stop.is_set():
                    raise StoreError(f"stream shards at {self.address}: server ended the stream early")
            except grpc.RpcError as exc:
                if stop.is_set():
                    return
                # A stalled stream is resumed like a broken one: the next try may reach a live server.
                if attempt == 0:
                    failing_since = time.monotonic()
                if (watchdog.fired or exc.code() in RETRYABLE_CODES) and self._may_retry(attempt, failing_since):
                    self._sleep_before_retry(attempt, failing_since)
                    attempt += 1
                    continue  # resume from the first shard not yet verified
                if watchdog.fired:
                    raise watchdog.stalled(f"stream shards at {self.address}") from None
                raise error_from_rpc(exc, f"stream shards at {self.address}", self._hint(exc)) from None
            finally:
                watchdog.__exit__()

    # -- writes (PushTarget) ----------------------------------------------------------------

    def find_missing(self, shard_ids: Iterable[str] = (), blob_ids: Iterable[str] = (), *,
                     shard_sizes: Sequence[int] = (), blob_sizes: Sequence[int] = ()) -> tuple[list[str], list[str]]:
        """The ids the server lacks; with sizes, also those it holds at another size (truncated: sent again)."""
        request = pb.FindMissingRequest(shard_ids=list(shard_ids), blob_ids=list(blob_ids),
                                        shard_sizes=list(shard_sizes), blob_sizes=list(blob_sizes))

        def call() -> tuple[list[str], list[str]]:
            response = self._stub.FindMissing(request, **self._unary_options)
            self._count(response.ByteSize())
            return list(response.missing_shard_ids), list(response.missing_blob_ids)

        return self._retrying("find missing objects", call)

    def missing_shards(self, shard_ids: Iterable[str]) -> list[str]:
        return self.find_missing(shard_ids=dict.fromkeys(shard_ids))[0]

    def find_indexed(self, keys: Sequence[str]) -> dict[str, IndexEntry]:
        """Content-index entries whose shard the server holds at the right size: one FindMissing per push.

        (Split only past the server's per-request id limit.) The server checks the
        shard; each entry must also answer a key asked for, or it is ignored.
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, IndexEntry] = {}
        for start in range(0, len(wanted), INDEX_KEYS_PER_REQUEST):
            batch = wanted[start : start + INDEX_KEYS_PER_REQUEST]
            request = pb.FindMissingRequest(index_keys=batch)

            def call(request: pb.FindMissingRequest = request) -> list[bytes]:
                response = self._stub.FindMissing(request, **self._unary_options)
                self._count(response.ByteSize())
                return list(response.index_entries)

            asked = set(batch)
            for data in self._retrying("look up the content index", call):
                try:
                    entry = IndexEntry.parse(data, None)
                except FormatError:
                    continue
                if entry.key in asked:
                    found[entry.key] = entry
        return found

    def put_index(self, entries: Sequence[IndexEntry]) -> int:
        """Send index entries for shards already uploaded; the server keeps those the shards bear out."""
        written = 0
        for start in range(0, len(entries), INDEX_KEYS_PER_REQUEST):
            batch = entries[start : start + INDEX_KEYS_PER_REQUEST]
            request = pb.PutIndexRequest(entries=[e.to_bytes() for e in batch])

            def call(request: pb.PutIndexRequest = request) -> int:
                response = self._stub.PutIndex(request, **self._unary_options)
                self._count(response.ByteSize())
                return int(response.written)

            written += self._retrying("write the content index", call)
        return written

    def _upload(self, kind: pb.ObjectKind, object_id: str, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        total = len(view)

        def chunks(watchdog: _IdleWatchdog) -> Iterator[pb.UploadChunk]:
            for start in range(0, max(total, 1), CHUNK_BYTES):
                watchdog.tick()  # grpc asks for the next chunk only once the last one is on its way
                yield pb.UploadChunk(kind=kind, id=object_id, offset=start, total_size=total,
                                     data=bytes(view[start : start + CHUNK_BYTES]))

        def call() -> None:
            watchdog = _IdleWatchdog(self.idle_timeout)
            future = self._stub.UploadObjects.future(chunks(watchdog), timeout=self.stream_timeout,
                                                     metadata=self._metadata)
            with watchdog.watch(future):
                try:
                    response = future.result()
                except grpc.RpcError:
                    if watchdog.fired:
                        raise watchdog.stalled(f"upload {object_id} to {self.address}") from None
                    raise
            self._count(response.ByteSize())

        self._retrying(f"upload {object_id}", call)

    def check_writable(self) -> None:
        """Nothing to do here: the server checks its own store's format on every write call and answers
        FAILED_PRECONDITION (an :class:`~shardstore.errors.UnsupportedFormatError`) when it may not write it."""

    def put_shard(self, shard_id: str, data: bytes | memoryview) -> bool:
        """Upload a shard unless the server has it; returns whether bytes were sent."""
        if not self.find_missing(shard_ids=[shard_id], shard_sizes=[len(memoryview(data))])[0]:
            return False
        self._upload(pb.OBJECT_KIND_SHARD, shard_id, data)
        return True

    def put_blob(self, data: bytes) -> tuple[str, bool]:
        blob_id = digest(data)
        if not self.find_missing(blob_ids=[blob_id], blob_sizes=[len(data)])[1]:
            return blob_id, False
        self._upload(pb.OBJECT_KIND_BLOB, blob_id, data)
        return blob_id, True

    def put_manifest(self, manifest: Manifest) -> tuple[str, int]:
        data = manifest.to_bytes()

        def call() -> tuple[str, int]:
            response = self._stub.PutManifest(pb.PutManifestRequest(manifest=data), **self._unary_options)
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
            response = self._stub.SetRef(request, **self._unary_options)
            self._count(response.ByteSize())
            return str(response.previous_manifest_id)

        return self._retrying(f"set ref {ref}", call)

    def delete_ref(self, ref: Ref) -> str:
        """Remove ``ref`` on the server (``delete`` scope); returns the manifest id it pointed at."""
        request = pb.DeleteRefRequest(name=ref.name, tag=ref.tag)

        def call() -> str:
            response = self._stub.DeleteRef(request, **self._unary_options)
            self._count(response.ByteSize())
            return str(response.manifest_id)

        return check_object_id(self._retrying(f"remove {ref}", call), f"manifest id of {ref}")

    def tag(self, src: Ref, dst: Ref) -> str:
        """Point ``dst`` at the manifest ``src`` points at: ResolveRef (read) then SetRef (write)."""
        manifest_id = self.resolve(src, with_manifest=False)
        self.compare_and_set_ref(dst, manifest_id, None)
        return manifest_id

    def list_refs(self, name_prefix: str = "") -> list[tuple[Ref, str]]:
        def call() -> list[tuple[Ref, str]]:
            response = self._stub.ListRefs(pb.ListRefsRequest(name_prefix=name_prefix), **self._unary_options)
            self._count(response.ByteSize())
            return [(parse_ref(f"{e.name}:{e.tag}"), str(e.manifest_id)) for e in response.refs]

        return self._retrying("list refs", call)
