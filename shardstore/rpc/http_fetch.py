"""Object bytes over plain HTTP, beside the gRPC stream: from a mirror, or from signed object-store URLs.

Shards and blobs are immutable and named by their content, so any HTTP server may carry them:

* a **mirror** is an HTTP cache (nginx, a CDN, Dragonfly's proxy) in front of a server's
  ``--http-port`` endpoint; a shard lives at ``{mirror}/v1/shards/{id}`` (objects.py);
* a **signed URL** is a short-lived link into the server's bucket that the server hands out
  (SignObjectUrls), so the bytes come from object storage and the server moves only manifests.

Either way the server stays the control plane (refs, manifests, access) and nothing here is
trusted: every object is checked against its id before it is used or cached; a failed request
or a wrong byte makes the caller fetch that object through the server instead, so a stale,
broken or hostile cache can cost time, never correctness.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3

from shardstore.format.digest import digest
from shardstore.repo.pool import ordered_map

log = logging.getLogger("shardstore.rpc.http_fetch")

MIRROR_ENV = "SHARDSTORE_MIRROR"
# Object stores and caches answer each GET after a round trip: keep many in flight.
DEFAULT_HTTP_CONCURRENCY = 16
DEFAULT_HTTP_TIMEOUT_S = 60.0


def default_mirror() -> str | None:
    """``$SHARDSTORE_MIRROR`` when set, else None."""
    return os.environ.get(MIRROR_ENV, "").strip() or None


def redacted(url: str) -> str:
    """``url`` without its query: a signed URL's query is a credential and must not reach a log."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass
class HttpFigures:
    """What the fetches of one client did; read by pull reports, tests and benches."""

    objects: int = 0  # objects fetched and verified
    bytes: int = 0  # their bytes
    refused: int = 0  # answered, but with bytes that do not match the id
    failed: int = 0  # no answer, or an error status


class HttpObjectFetcher:
    """GETs objects by URL with a pool of keep-alive connections; each body is checked against its id.

    Thread-safe. ``headers`` go with every request (a bearer token for a mirror; never with a signed
    URL, whose query is its credential: S3 refuses a request that carries both).
    """

    def __init__(self, *, concurrency: int = DEFAULT_HTTP_CONCURRENCY, timeout: float = DEFAULT_HTTP_TIMEOUT_S,
                 headers: Mapping[str, str] | None = None) -> None:
        self.concurrency = max(1, concurrency)
        self._headers = dict(headers or {})
        # One retry on a dropped connection (a keep-alive socket the peer closed); anything else
        # falls back to the server at once rather than waiting here.
        self._pool = urllib3.PoolManager(
            maxsize=self.concurrency, block=False,
            retries=urllib3.Retry(total=1, connect=1, read=1, status=0, redirect=2, raise_on_status=False),
            timeout=urllib3.Timeout(connect=min(10.0, timeout), read=timeout),
        )
        self.figures = HttpFigures()
        self._lock = threading.Lock()

    def get(self, object_id: str, url: str, what: str = "object", limit: int | None = None) -> bytes | None:
        """The bytes at ``url`` if they match ``object_id``; None (logged) when the request fails or they don't.

        ``limit``: the most bytes the object may have (from its manifest); a longer body is cut off and
        refused as it arrives, so an endless or oversized answer costs at most ``limit`` bytes of memory.
        """
        try:
            response = self._pool.request("GET", url, headers=self._headers, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            self._note_failure(f"{what} {object_id} from {redacted(url)}: {type(exc).__name__}; "
                               "fetching it from the server", failed=True)
            return None
        try:
            if response.status != 200:
                self._note_failure(f"{what} {object_id} from {redacted(url)}: HTTP {response.status}; "
                                   "fetching it from the server", failed=True, quiet=response.status == 404)
                return None
            parts: list[bytes] = []
            received = 0
            for piece in response.stream(1 << 20):
                received += len(piece)
                if limit is not None and received > limit:
                    response.close()  # drop the connection: reading the rest could take forever
                    self._note_failure(f"{what} {object_id} from {redacted(url)}: more than its {limit} bytes; "
                                       "refused, fetching it from the server", failed=False)
                    return None
                parts.append(piece)
        except urllib3.exceptions.HTTPError as exc:
            self._note_failure(f"{what} {object_id} from {redacted(url)}: {type(exc).__name__}; "
                               "fetching it from the server", failed=True)
            return None
        finally:
            response.release_conn()
        data = b"".join(parts)
        if digest(data) != object_id:
            self._note_failure(f"{what} {object_id} from {redacted(url)}: bytes do not match its id; refused, "
                               "fetching it from the server", failed=False)
            return None
        with self._lock:
            self.figures.objects += 1
            self.figures.bytes += len(data)
        return data

    def get_many(self, items: Iterable[tuple[str, str]], what: str = "shard",
                 limit_of: Callable[[str], int | None] | None = None) -> Iterator[tuple[str, bytes | None]]:
        """``(id, bytes or None)`` for each ``(id, url)``, in order, ``concurrency`` requests in flight."""
        def one(item: tuple[str, str]) -> tuple[str, bytes | None]:
            return item[0], self.get(item[0], item[1], what, limit_of(item[0]) if limit_of else None)

        yield from ordered_map(one, items, self.concurrency, window=self.concurrency)

    def _note_failure(self, message: str, *, failed: bool, quiet: bool = False) -> None:
        with self._lock:
            if failed:
                self.figures.failed += 1
            else:
                self.figures.refused += 1
        # A miss in a mirror (404) is ordinary; a wrong byte or a broken link is worth a warning.
        log.log(logging.DEBUG if quiet else logging.WARNING, "%s", message)

    def close(self) -> None:
        self._pool.clear()
