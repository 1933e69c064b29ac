"""Prometheus metrics of one server, served over HTTP for scraping.

Each server has its own :class:`ServerMetrics` with its own registry (tests and
benches run several servers in one process; the global default registry would
mix them). Two sources feed it:

* per call, a :class:`~shardstore.rpc.logs.RequestRecord` from the request
  observer: calls by method and status code, errors by code, call duration;
* at scrape time, the servicer's own counters (bytes sent and received, hot
  cache hits, misses and size, open streams), read rather than duplicated.

Shard fetch latency (a store read plus the id check, on a cache miss) is timed
by the servicer itself through :meth:`ServerMetrics.time_shard_fetch`.

The same HTTP port answers the probes of orchestrators that speak HTTP but not
gRPC over TLS (Kubernetes' gRPC probe is plaintext only): ``/healthz`` (the
process answers: liveness) and ``/readyz`` (the gRPC server has started and is
not shutting down: readiness, 503 otherwise). Any other path is 404, so a probe
aimed at a wrong path fails instead of reading metrics text as "healthy".
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shardstore.errors import InvalidInputError

if TYPE_CHECKING:
    from shardstore.rpc.logs import RequestRecord

# A shard read takes from ~1 ms (local disk, small shard) to seconds (a large shard from remote S3).
SHARD_FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A call lasts from ~1 ms (ResolveRef from the cache) to minutes (a whole model over a slow link).
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class _HotCache(Protocol):
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...


class Watched(Protocol):
    """What the scrape reads from a servicer (:class:`~shardstore.rpc.server.RegistryServicer`)."""

    @property
    def sent_bytes(self) -> int: ...
    @property
    def sent_shard_bytes(self) -> int: ...
    @property
    def signed_urls(self) -> int: ...
    @property
    def received_bytes(self) -> int: ...
    @property
    def active_streams(self) -> int: ...
    @property
    def cache(self) -> _HotCache: ...


class _ServicerCollector(Collector):
    """The servicer's counters as metrics, read at each scrape."""

    def __init__(self, servicer: Watched) -> None:
        self.servicer = servicer

    def collect(self) -> Iterable[Metric]:
        s = self.servicer
        yield CounterMetricFamily("shardstore_sent_bytes", "Object bytes served (shards and blobs)",
                                  value=s.sent_bytes)
        yield CounterMetricFamily("shardstore_sent_shard_bytes", "Shard bytes served over gRPC (part of sent_bytes)",
                                  value=s.sent_shard_bytes)
        yield CounterMetricFamily("shardstore_signed_urls", "Signed URLs handed out (object bytes read from the store)",
                                  value=s.signed_urls)
        yield CounterMetricFamily("shardstore_received_bytes", "Object bytes uploaded to this server",
                                  value=s.received_bytes)
        yield CounterMetricFamily("shardstore_cache_hits", "Shards served from the hot-shard memory cache",
                                  value=s.cache.hits)
        yield CounterMetricFamily("shardstore_cache_misses", "Shards read from the store (not in the cache)",
                                  value=s.cache.misses)
        yield GaugeMetricFamily("shardstore_cache_bytes", "Bytes held by the hot-shard cache", value=s.cache.size)
        yield GaugeMetricFamily("shardstore_cache_capacity_bytes", "Bound of the hot-shard cache (--cache-size)",
                                value=s.cache.max_bytes)
        yield GaugeMetricFamily("shardstore_active_streams", "Shard streams open now", value=s.active_streams)


class ServerMetrics:
    """The metrics of one server; optionally served on an HTTP port (``/metrics``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("shardstore_requests", "Registry calls finished, by method and status code",
                                ["method", "code"], registry=self.registry)
        self.errors = Counter("shardstore_errors", "Registry calls that ended in an error, by method and status code",
                              ["method", "code"], registry=self.registry)
        self.request_seconds = Histogram("shardstore_request_duration_seconds", "Duration of Registry calls",
                                         ["method"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.shard_fetch_seconds = Histogram(
            "shardstore_shard_fetch_duration_seconds",
            "Store read and id check of one shard, on a hot-cache miss", buckets=SHARD_FETCH_BUCKETS,
            registry=self.registry,
        )
        # The HTTP object endpoint (shardstore/http/objects.py) counts here, beside the gRPC figures, so one
        # scrape says how many shard bytes left this server by either door.
        self.http_requests = Counter("shardstore_http_requests", "HTTP object requests answered, by kind and status",
                                     ["kind", "status"], registry=self.registry)
        self.http_sent_bytes = Counter("shardstore_http_sent_bytes", "Object bytes sent in HTTP bodies, by kind",
                                       ["kind"], registry=self.registry)
        self._watched = False
        self._http: Any = None
        self._http_thread: Any = None
        # Whether the server takes calls now (/readyz); set by whoever runs the server (cli/serve.py).
        self.readiness: Callable[[], bool] = lambda: False

    def watch(self, servicer: Watched) -> None:
        """Export ``servicer``'s counters. One servicer per metrics object: two would sum into one series."""
        if self._watched:
            raise ValueError("these metrics already watch a servicer; give each server its own ServerMetrics")
        self.registry.register(_ServicerCollector(servicer))
        self._watched = True

    def observe(self, record: RequestRecord) -> None:
        """Count one finished call (the request observer's sink)."""
        self.requests.labels(record.method, record.code).inc()
        self.request_seconds.labels(record.method).observe(record.seconds)
        if record.code != "OK":
            self.errors.labels(record.method, record.code).inc()

    def observe_http(self, kind: str, status: int, body_bytes: int) -> None:
        """Count one HTTP object response (``kind``: shard or blob) and the object bytes in its body."""
        self.http_requests.labels(kind, str(status)).inc()
        if body_bytes:
            self.http_sent_bytes.labels(kind).inc(body_bytes)

    def http_figures(self, kind: str) -> tuple[int, int]:
        """(requests answered, body bytes sent) over HTTP for ``kind``: what tests and benches compare."""
        requests = sum(sample.value for metric in self.http_requests.collect() for sample in metric.samples
                       if sample.name.endswith("_total") and sample.labels.get("kind") == kind)
        sent = self.registry.get_sample_value("shardstore_http_sent_bytes_total", {"kind": kind}) or 0.0
        return int(requests), int(sent)

    @contextmanager
    def time_shard_fetch(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        # Only fetches that succeeded: a failure is counted by its call's error code instead.
        self.shard_fetch_seconds.observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        """The text that ``/metrics`` serves."""
        return generate_latest(self.registry)

    def serve_http(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a daemon thread; returns the bound port."""
        if self._http is not None:
            raise ValueError("metrics are already served")
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        class Server(socketserver.ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """Probes come every few seconds: no access log (the gRPC request log is the one that counts)."""

        try:
            self._http = make_server(host.strip("[]"), port, self._wsgi_app(), Server, handler_class=QuietHandler)
        except OSError as exc:
            raise InvalidInputError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._http_thread = threading.Thread(target=self._http.serve_forever, name="shardstore-metrics", daemon=True)
        self._http_thread.start()
        return int(self._http.server_port)

    def _wsgi_app(self) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
        """``/metrics`` exactly as prometheus_client serves it, ``/healthz``, ``/readyz``, 404 for the rest."""
        metrics = make_wsgi_app(self.registry)

        def answer(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
            body = (text + "\n").encode()
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
            return [body]

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics(environ, start_response)  # type: ignore[no-any-return]
            if path == "/healthz":
                return answer(start_response, "200 OK", "ok")
            if path == "/readyz":
                if self.readiness():
                    return answer(start_response, "200 OK", "ready")
                return answer(start_response, "503 Service Unavailable", "not serving (starting or shutting down)")
            return answer(start_response, "404 Not Found", "not found: /metrics, /healthz, /readyz")

        return app

    def close(self) -> None:
        """Stop serving HTTP (if started); the counters stay readable."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http_thread.join(timeout=5)
            self._http = None
