"""What compose and Kubernetes run, without a container engine: two `shardstore serve` processes on one S3 endpoint.

One server is configured the compose way (SHARDSTORE_SERVE_* variables), the other the Kubernetes way
(a YAML config file named by SHARDSTORE_SERVE_CONFIG). A model pushed through the first is resolved to the
same manifest and pulled bit for bit through either; both answer health checks and count what they served.
(tests/store/test_s3.py covers two in-process servers; this is the deployed form: processes and settings.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import serve_from_env, tree_snapshot
from prometheus_client.parser import text_string_to_metric_families

from shardstore.repo.refs import parse_ref
from shardstore.rpc.client import GrpcClient


@dataclass
class ServerProcess:
    address: str
    metrics_address: str
    log: Path

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def shardstore(*args: str | Path, env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-m", "shardstore", *map(str, args), "--json"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert isinstance(figures, dict)
    return figures


@contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[ServerProcess]:
    with serve_from_env(env, log) as ready:
        yield ServerProcess(ready["address"], ready["metrics_address"], log)


def test_two_servers_on_one_s3_endpoint_serve_the_same_model(
    minilm_bf16_dir: Path, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store_url = f"s3://{s3_bucket}/models"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSTORE_")}
    # compose: settings in the environment
    # Both servers stream every byte (no signed URLs): this test follows shards through the servers;
    # tests/rpc/test_signed_urls.py covers clients reading the bucket directly.
    compose_env = {**base, "SHARDSTORE_SERVE_STORE": store_url, "SHARDSTORE_SERVE_PORT": "0",
                   "SHARDSTORE_SERVE_METRICS_PORT": "0", "SHARDSTORE_SERVE_LOG_FORMAT": "json",
                   "SHARDSTORE_SERVE_SIGNED_URL_TTL": "0"}
    # Kubernetes: a config file from a ConfigMap, the endpoint as a storage option
    config = tmp_path / "serve.yaml"
    config.write_text(f"store: {store_url}\nport: 0\nmetrics_port: 0\nlog_format: json\ncache_size: 64MiB\n"
                      "signed_url_ttl: 0\n"
                      f"storage_option:\n  endpoint_url: {s3_endpoint}\n")
    k8s_env = {**{k: v for k, v in base.items() if k != "AWS_ENDPOINT_URL"}, "SHARDSTORE_SERVE_CONFIG": str(config)}

    with serve(compose_env, tmp_path / "one.log") as one, serve(k8s_env, tmp_path / "two.log") as two:
        for server in (one, two):
            health = shardstore("health", f"grpc://{server.address}", env=base)
            assert health["status"] == "SERVING"

        pushed = shardstore("push", minilm_bf16_dir, f"grpc://{one.address}/minilm:v1", env=base)
        # Shards and blobs went through UploadObjects (the manifest through PutManifest).
        received = one.metric("shardstore_received_bytes_total")
        assert pushed["stored_bytes"] <= received <= pushed["uploaded_bytes"]  # type: ignore[operator]

        # The same ref resolves to the same manifest on either server: the ref lives in the bucket.
        ref = parse_ref("minilm:v1")
        with GrpcClient(one.address) as client_one, GrpcClient(two.address) as client_two:
            assert client_one.resolve(ref) == client_two.resolve(ref) == pushed["manifest_id"]

        for name, server in (("via-one", one), ("via-two", two)):
            pulled = shardstore("pull", f"grpc://{server.address}/minilm:v1", tmp_path / name,
                                "--cache", tmp_path / f"cache-{name}", env=base)
            assert pulled["shards_fetched"] == pushed["shards_total"] and pulled["shards_cached"] == 0
            assert tree_snapshot(tmp_path / name) == tree_snapshot(minilm_bf16_dir)
            assert server.metric("shardstore_requests_total", method="StreamShards", code="OK") >= 1
            assert server.metric("shardstore_sent_bytes_total") >= pushed["stored_bytes"]  # type: ignore[operator]
        # Server two had never seen a shard: each came from the bucket, each fetch was timed.
        assert two.metric("shardstore_cache_misses_total") == pushed["shards_total"]
        assert two.metric("shardstore_shard_fetch_duration_seconds_count") == pushed["shards_total"]

    # JSON request logs, one object per call, on each server's stderr.
    for server, methods in ((one, {"FindMissing", "UploadObjects", "PutManifest", "SetRef", "StreamShards"}),
                            (two, {"ResolveRef", "GetBlob", "StreamShards"})):
        entries = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
        calls = {e["method"] for e in entries if e["logger"] == "shardstore.rpc.requests"}
        assert methods <= calls, (methods - calls, server.log.read_text()[-2000:])
        if server is two:  # the pulls' manifests came with their refs: never asked for on their own
            assert "GetManifest" not in calls
