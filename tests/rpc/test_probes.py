"""The metrics port answers HTTP probes: /healthz, /readyz (503 unless serving), /metrics unchanged, 404 elsewhere."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from rpc.access_helpers import env_with, serve_process
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.metrics import ServerMetrics
from shardstore.store import LocalStore


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_readyz_follows_the_server_and_unknown_paths_are_404(tmp_path: Path) -> None:
    metrics = ServerMetrics()
    base = f"http://127.0.0.1:{metrics.serve_http('127.0.0.1', 0)}"
    try:
        assert get(f"{base}/healthz")[::2] == (200, "ok\n")
        assert get(f"{base}/readyz")[0] == 503  # no server yet
        server = BackgroundServer(LocalStore(tmp_path / "store"), metrics=metrics).start()
        registry = server.registry
        assert registry is not None
        metrics.readiness = lambda: registry.serving
        assert get(f"{base}/readyz")[::2] == (200, "ready\n")
        server.stop()
        assert get(f"{base}/readyz")[0] == 503  # shut down: endpoints must drop this pod
        assert get(f"{base}/healthz")[0] == 200  # ...but the process is alive: no restart
        for path in ("/", "/health", "/metrics/extra", "/favicon.ico", "/readyz/"):
            assert get(f"{base}{path}")[0] == 404, path
    finally:
        metrics.close()


def test_serve_answers_probes_and_metrics_on_its_metrics_port(tmp_path: Path) -> None:
    with serve_process(tmp_path / "store", "--metrics-port", "0", env=env_with()) as served:
        base = f"http://{served.ready['metrics_address']}"
        assert get(f"{base}/healthz")[::2] == (200, "ok\n")
        assert get(f"{base}/readyz")[::2] == (200, "ready\n")
        status, content_type, body = get(f"{base}/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        names = {family.name for family in text_string_to_metric_families(body)}
        assert {"shardstore_requests", "shardstore_cache_hits", "shardstore_sent_bytes"} <= names
        assert get(f"{base}/nope")[0] == 404
