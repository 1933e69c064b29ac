"""S3 and S3-compatible object stores (MinIO, Ceph RGW, R2...) through s3fs.

What S3 adds over the generic fsspec store:

* **Conditional writes.** Immutable objects are created with ``If-None-Match: *`` and refs
  are replaced with ``If-Match: <etag>``, so two pushes racing on one bucket never clobber
  each other's ref silently. Engines without conditional writes are opened with the storage
  option ``conditional_writes=false`` and refs become last-writer-wins (docs/design.md).
* **Retries.** Transient failures (503 SlowDown, throttling, resets, timeouts) are retried by
  botocore's ``standard`` mode and s3fs with bounded exponential backoff; permanent ones
  (missing bucket, access denied) surface at once as one-line errors naming the key.
* **No silent bucket creation.** A missing bucket is an error, never created by a write.

Endpoint, credentials and region come from the usual AWS environment variables and config
files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_REGION``...), and
from storage options (``--storage-option endpoint_url=http://...``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec

from shardstore.errors import InvalidInputError, NotFoundError, StoreError
from shardstore.store.base import StoreCapabilities
from shardstore.store.fsspec_store import FsspecStore, modified_time

T = TypeVar("T")

# Concurrent requests one store issues for bulk reads and writes (pull prefetch, push).
DEFAULT_S3_CONCURRENCY = 8
DEFAULT_MAX_ATTEMPTS = 6
# botocore waits 60 s for a TCP connection by default; an endpoint that takes longer is down.
CONNECT_TIMEOUT_S = 10
# The first request of a store (_contact): no retries, and this long at most to connect and to answer.
PROBE_TIMEOUT_S = 5


def _error_code(exc: BaseException) -> str:
    """The S3 error code inside whatever s3fs/botocore wrapped it in."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
        current = current.__cause__ or current.__context__
    return ""


class S3Store(FsspecStore):
    def __init__(self, url: str, *, conditional_writes: bool | str = True, concurrency: int | str | None = None,
                 **storage_options: Any) -> None:
        config = dict(storage_options.pop("config_kwargs", {}) or {})
        config.setdefault("retries", {"max_attempts": DEFAULT_MAX_ATTEMPTS, "mode": "standard"})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        super().__init__(url, config_kwargs=config, **storage_options)
        # The first contact goes through a twin without retries: see _contact.
        self._probe_options = {**storage_options, "skip_instance_cache": True,
                               "config_kwargs": {**config, "retries": {"max_attempts": 1, "mode": "standard"},
                                                 "connect_timeout": PROBE_TIMEOUT_S, "read_timeout": PROBE_TIMEOUT_S}}
        self._endpoint_configured = bool(storage_options.get("endpoint_url")
                                         or (storage_options.get("client_kwargs") or {}).get("endpoint_url")
                                         or os.environ.get("AWS_ENDPOINT_URL")
                                         or os.environ.get("AWS_ENDPOINT_URL_S3"))
        self._contacted = False
        self._contact_lock = threading.Lock()
        self.bucket = self.root.split("/", 1)[0]
        self.conditional_writes = str(conditional_writes).lower() not in ("false", "0", "no")
        self.capabilities = StoreCapabilities(atomic_compare_and_set=self.conditional_writes, shared=True)
        self.concurrency = max(1, int(concurrency or DEFAULT_S3_CONCURRENCY))
        self._bucket_checked = False

    # -- first contact -------------------------------------------------------------

    def _contact(self) -> None:
        """Once per store, before its first request: one HEAD of the bucket with no retries and short timeouts.

        botocore retries a refused connection with backoff (6 attempts: ~27 s) and waits 60 s for a
        connection by default; that is right for a store that answered before and hiccups, and wrong
        for a wrong endpoint, a missing endpoint or missing credentials, which no retry fixes. So the
        first request is made alone and fails in seconds with one line; every later one is retried.
        Anything the endpoint *answers* (even 403 or 404) passes: those are reported where they matter.
        """
        if self._contacted:
            return
        with self._contact_lock:
            if self._contacted:
                return
            try:
                probe, _root = fsspec.core.url_to_fs(self.url, **self._probe_options)
                probe.retries = 1  # s3fs's own retry loop, on top of botocore's
                probe.call_s3("head_bucket", Bucket=self.bucket)
            except Exception as exc:
                if _unreachable(exc):
                    raise self._no_contact(exc) from None
                if isinstance(exc, TypeError | ValueError):
                    # An unknown storage option (-o endpoint=...), a malformed endpoint URL: raised while
                    # the client is made, before any request, and every later request would raise it again.
                    reason = " ".join(str(exc).split()) or type(exc).__name__
                    raise InvalidInputError(f"{self.url}: bad S3 settings (the -o storage options or the AWS_* "
                                            f"environment): {reason}") from None
            self._contacted = True

    def _no_contact(self, exc: BaseException) -> StoreError:
        import botocore.exceptions as errors  # type: ignore[import-untyped]

        if isinstance(exc, errors.NoCredentialsError | errors.PartialCredentialsError):
            return StoreError(f"{self.url}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(or AWS_PROFILE), or pass -o key=... -o secret=...")
        hint = "" if self._endpoint_configured else (" (no endpoint is set: for MinIO or another S3-compatible "
                                                     "store set AWS_ENDPOINT_URL or -o endpoint_url=...)")
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return StoreError(f"{self.url}: cannot reach the S3 endpoint: {reason}{hint}")

    # -- errors --------------------------------------------------------------------

    def _fail(self, key: str, action: str, exc: BaseException) -> StoreError:
        code = _error_code(exc)
        if isinstance(exc, PermissionError) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(f"{key}: access denied to {self.url} ({code or exc})")
        if code == "NoSuchBucket" or (isinstance(exc, FileNotFoundError) and not self._bucket_exists()):
            return StoreError(f"{key}: bucket {self.bucket!r} does not exist ({self.url})")
        return StoreError(f"{key}: cannot {action} {self.url}: {code or exc}")

    def _bucket_exists(self) -> bool:
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except Exception:  # any failure to see the bucket means we cannot use it
            return False
        return True

    def _guard(self, key: str, action: str, call: Callable[[], T]) -> T:
        self._contact()
        try:
            return call()
        except FileNotFoundError as exc:
            if _error_code(exc) != "NoSuchBucket" and self._bucket_exists():
                raise NotFoundError(f"{key}: not in store {self.url}") from None
            raise self._fail(key, action, exc) from None
        except OSError as exc:
            raise self._fail(key, action, exc) from None

    # -- primitives ----------------------------------------------------------------

    def get(self, key: str) -> bytes:
        path = self._path(key)
        return self._guard(key, "read from", lambda: bytes(self.fs.cat_file(path)))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:  # no HTTP range expresses it ("bytes=0--1" is ignored: the whole object comes back)
            self.size(key)
            return b""
        path = self._path(key)
        return self._guard(key, "read from", lambda: bytes(self.fs.cat_file(path, start=start, end=end)))

    def size(self, key: str) -> int:
        return self._guard(key, "stat in", lambda: int(self._info(key)["size"]))

    def modified(self, key: str) -> float | None:
        return self._guard(key, "stat in", lambda: modified_time(self._info(key)))

    def _info(self, key: str) -> dict[str, Any]:
        self._contact()
        return super()._info(key)

    def _find(self, prefix: str) -> dict[str, dict[str, Any]]:
        self._contact()
        return super()._find(prefix)

    def delete(self, key: str) -> None:
        self._contact()
        super().delete(key)

    def exists(self, key: str) -> bool:
        return self.stored_size(key) is not None

    def root_exists(self) -> bool:
        """Whether the bucket exists; an endpoint that cannot be reached or refuses us is an error, not "missing"."""
        self._contact()  # no endpoint, no credentials, bad settings: each its own one-line error
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _error_code(exc) == "NoSuchBucket":
                return False
            raise self._fail(self.bucket, "look up the bucket in", exc) from None
        return True

    def stored_size(self, key: str) -> int | None:
        try:
            return int(self._info(key)["size"])
        except FileNotFoundError:
            if not self._bucket_checked:
                if not self._bucket_exists():
                    raise self._fail(key, "look up", FileNotFoundError(self.bucket)) from None
                self._bucket_checked = True
            return None
        except OSError as exc:
            raise self._fail(key, "look up", exc) from None

    def _put_object(self, key: str, data: bytes | memoryview | IO[bytes], **conditions: str) -> bool:
        """PutObject, optionally conditional; False when the precondition failed (412).

        ``data`` may be an open file: botocore then reads it in pieces (one PUT, up to 5 GiB).
        """
        self._contact()
        body = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._path(key).split("/", 1)[1],
                            Body=body, **conditions)
        except Exception as exc:  # s3fs re-raises ClientErrors as OSError subclasses
            if _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            if isinstance(exc, OSError) or _error_code(exc):
                raise self._fail(key, "write to", exc) from None
            raise
        finally:
            self.fs.invalidate_cache(self._path(key))
        return True

    def put(self, key: str, data: bytes | memoryview) -> None:
        self._put_object(key, data)

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        return self._put_if_absent(key, data, len(memoryview(data)))

    def put_file_if_absent(self, key: str, file: IO[bytes], size: int) -> bool:
        file.seek(0)
        return self._put_if_absent(key, file, size)

    def _put_if_absent(self, key: str, data: bytes | memoryview | IO[bytes], size: int) -> bool:
        # HEAD first: shards are large, and most already-present objects are found here
        # without sending their bytes. If-None-Match then closes the race window.
        stored = self.stored_size(key)
        if stored == size:
            return False
        if stored is not None or not self.conditional_writes:
            # Absent without conditional writes; or there but truncated: written again, unconditionally.
            self._put_object(key, data)
            return True
        return self._put_object(key, data, IfNoneMatch="*")

    def compare_and_set(self, key: str, expected: bytes | None, new: bytes) -> bool:
        if not self.conditional_writes:
            return super().compare_and_set(key, expected, new)
        if expected is None:
            return self._put_object(key, new, IfNoneMatch="*")
        try:
            response = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self._path(key).split("/", 1)[1])
            current, etag = response["Body"], response["ETag"]
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._fail(key, "read from", exc) from None
        if _read_body(self.fs, current) != expected:
            return False
        return self._put_object(key, new, IfMatch=etag)


def _unreachable(exc: BaseException) -> bool:
    """Whether a failed request never got an answer from S3: no credentials to sign it, no connection, no reply."""
    import botocore.exceptions as errors

    # ConnectionError covers refused and timed-out connections, to the endpoint or to a proxy.
    unanswered = (errors.NoCredentialsError, errors.PartialCredentialsError, errors.ConnectionError,
                  errors.HTTPClientError, errors.InvalidEndpointConfigurationError, TimeoutError)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, unanswered):
            return True
        current = current.__cause__ or current.__context__
    return False


def _read_body(fs: Any, body: Any) -> bytes:
    """Read an aiobotocore streaming body on s3fs's event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return bytes(await stream.read())

    return bytes(sync(fs.loop, read))
