"""`shardstore health`: the image's HEALTHCHECK command, against a real server and a port where none listens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.server import SERVICE_NAME
from shardstore.store import LocalStore


def health(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardstore", "health", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_health_defaults_to_the_port_serve_reads_and_fails_in_one_line(tmp_path: Path) -> None:
    with BackgroundServer(LocalStore(tmp_path / "store")) as server:
        env = {**os.environ, "SHARDSTORE_SERVE_PORT": str(server.port)}
        # No address: 127.0.0.1 on $SHARDSTORE_SERVE_PORT, as in the container.
        result = health("--json", "--service", SERVICE_NAME, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"address": f"127.0.0.1:{server.port}", "service": SERVICE_NAME,
                                             "status": "SERVING", "tls": False}
        quiet = health(f"grpc://{server.address}", "--quiet", env=env)
        assert quiet.returncode == 0 and quiet.stdout == ""
        unknown = health(f"grpc://{server.address}", "--service", "no.such.Service", env=env)
        assert unknown.returncode == 1
        assert unknown.stderr.startswith("shardstore health: error: ") and "NOT_FOUND" in unknown.stderr
    # The server is gone: exit 1, one line naming the address, no traceback.
    gone = health(f"grpc://127.0.0.1:{server.port}", "--timeout", "2", env=env)
    assert gone.returncode == 1
    lines = gone.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{server.port}: UNAVAILABLE" in lines[0], gone.stderr
    bad = health("grpc://host:1/extra", env=env)
    assert bad.returncode == 1 and "expected HOST:PORT" in bad.stderr
