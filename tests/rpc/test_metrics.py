"""Prometheus metrics on a real HTTP port and the per-call log, while the real MiniLM is pulled over gRPC."""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import shardstore
from rpc.grpc_helpers import Served
from shardstore.errors import InvalidInputError, NotFoundError
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.logs import REQUEST_LOG, JsonFormatter
from shardstore.rpc.metrics import ServerMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample served at /metrics, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """A call is recorded just after its status went out: the client may see an error a moment before."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not recorded in time"
        time.sleep(0.02)


@pytest.fixture
def metered(minilm_served: Served) -> Iterator[tuple[BackgroundServer, int]]:
    """A second server over the store that holds MiniLM, with fresh metrics served on a free HTTP port."""
    metrics = ServerMetrics()
    with BackgroundServer(minilm_served.store, metrics=metrics) as server:
        port = metrics.serve_http("127.0.0.1", 0)
        try:
            yield server, port
        finally:
            metrics.close()


@pytest.fixture
def request_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(REQUEST_LOG)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def test_counters_move_during_a_pull(metered: tuple[BackgroundServer, int], minilm_served: Served,
                                     tmp_path: Path) -> None:
    server, port = metered
    shards = minilm_served.push.shards_total
    before = scrape(port)
    assert value(before, "shardstore_sent_bytes_total") == 0
    assert value(before, "shardstore_requests_total", method="StreamShards", code="OK") == 0

    url = f"grpc://{server.address}/minilm:v1"
    shardstore.pull(url, tmp_path / "first", cache=str(tmp_path / "cache1"))
    first = scrape(port)
    assert value(first, "shardstore_requests_total", method="ResolveRef", code="OK") == 1
    assert value(first, "shardstore_requests_total", method="StreamShards", code="OK") >= 1
    # Every shard came from the store once, each fetch timed; what was sent is the servicer's own count.
    assert value(first, "shardstore_cache_misses_total") == shards
    assert value(first, "shardstore_cache_hits_total") == 0
    assert value(first, "shardstore_shard_fetch_duration_seconds_count") == shards
    assert value(first, "shardstore_shard_fetch_duration_seconds_sum") > 0
    assert value(first, "shardstore_sent_bytes_total") == server.servicer.sent_bytes
    assert value(first, "shardstore_sent_bytes_total") >= minilm_served.push.stored_bytes
    assert 0 < value(first, "shardstore_cache_bytes") <= value(first, "shardstore_cache_capacity_bytes")
    assert value(first, "shardstore_active_streams") == 0

    # A second client (empty cache): every shard now comes from the server's hot cache.
    shardstore.pull(url, tmp_path / "second", cache=str(tmp_path / "cache2"))
    second = scrape(port)
    assert value(second, "shardstore_cache_hits_total") == shards
    assert value(second, "shardstore_cache_misses_total") == shards
    assert value(second, "shardstore_shard_fetch_duration_seconds_count") == shards
    assert value(second, "shardstore_sent_bytes_total") >= 2 * minilm_served.push.stored_bytes
    assert value(second, "shardstore_requests_total", method="ResolveRef", code="OK") == 2
    assert value(second, "shardstore_errors_total", method="ResolveRef", code="NOT_FOUND") == 0

    with pytest.raises(NotFoundError):
        shardstore.pull(f"grpc://{server.address}/no-such-model:v1", tmp_path / "none")
    eventually(lambda: value(scrape(port), "shardstore_requests_total", method="ResolveRef", code="NOT_FOUND") > 0)
    after_error = scrape(port)
    assert value(after_error, "shardstore_errors_total", method="ResolveRef", code="NOT_FOUND") == 1
    assert value(after_error, "shardstore_requests_total", method="ResolveRef", code="NOT_FOUND") == 1


def test_one_json_log_line_per_call(metered: tuple[BackgroundServer, int], minilm_served: Served,
                                    request_log: io.StringIO, tmp_path: Path) -> None:
    server, _port = metered
    with shardstore.open(f"grpc://{server.address}/minilm:v1", cache=str(tmp_path / "c")) as view:
        view.get_tensor("encoder.layer.2.output.dense.weight")
    with pytest.raises(NotFoundError):
        shardstore.open(f"grpc://{server.address}/missing:v2", cache=str(tmp_path / "c"))
    eventually(lambda: "missing:v2" in request_log.getvalue())
    entries = [json.loads(line) for line in request_log.getvalue().splitlines()]
    assert entries, "no request log lines"
    assert {e["logger"] for e in entries} == {REQUEST_LOG}
    resolved = [e for e in entries if e["method"] == "ResolveRef"]
    assert [(e["ref"], e["code"], e["level"]) for e in resolved] == [
        ("minilm:v1", "OK", "info"), ("missing:v2", "NOT_FOUND", "warning")]
    assert "no such model" in resolved[1]["error"]
    # The manifest came with the ref (docs/design.md, "Round trips of a pull"): no GetManifest call.
    manifest = minilm_served.store.root / "manifests" / f"{minilm_served.push.manifest_id}.json"
    manifest_bytes = len(manifest.read_bytes())
    assert resolved[0]["sent_bytes"] > manifest_bytes > 1000
    assert not [e for e in entries if e["method"] == "GetManifest"]
    streams = [e for e in entries if e["method"] == "StreamShards"]
    assert streams and all(e["code"] == "OK" and e["shards"] >= 1 and e["sent_bytes"] > 0 for e in streams)
    for entry in entries:
        assert entry["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:")) and entry["seconds"] >= 0
        assert set(entry) >= {"time", "level", "message", "method", "code", "seconds", "peer", "sent_bytes"}


def test_each_server_has_its_own_registry_and_a_port_in_use_is_a_clear_error(minilm_served: Served) -> None:
    first, second = ServerMetrics(), ServerMetrics()
    with BackgroundServer(minilm_served.store, metrics=first), BackgroundServer(minilm_served.store, metrics=second):
        port = first.serve_http("127.0.0.1", 0)
        try:
            with pytest.raises(InvalidInputError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                second.serve_http("127.0.0.1", port)
        finally:
            first.close()
    assert first.registry is not second.registry
    with pytest.raises(ValueError, match="already watch"):
        first.watch(minilm_served.server.servicer)


def test_calls_refused_for_a_missing_token_are_counted(minilm_served: Served, tmp_path: Path) -> None:
    from shardstore.rpc.auth import AuthenticationError, load_token_table

    metrics = ServerMetrics()
    tokens = load_token_table(environ={"SHARDSTORE_TOKENS": "metrics-test-token-0001:read"})
    with BackgroundServer(minilm_served.store, metrics=metrics, tokens=tokens) as server:
        with pytest.raises(AuthenticationError):
            shardstore.pull(f"grpc://{server.address}/minilm:v1", tmp_path / "out", cache=str(tmp_path / "c"))
        port = metrics.serve_http("127.0.0.1", 0)
        try:
            eventually(lambda: value(scrape(port), "shardstore_requests_total", method="ResolveRef",
                                     code="UNAUTHENTICATED") > 0)
            samples = scrape(port)
        finally:
            metrics.close()
    assert value(samples, "shardstore_errors_total", method="ResolveRef", code="UNAUTHENTICATED") == 1
    assert value(samples, "shardstore_sent_bytes_total") == 0
