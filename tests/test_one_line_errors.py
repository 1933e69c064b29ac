"""Failures users meet on day one end in one line on stderr, a non-zero exit and no traceback, quickly.

Real processes: the CLI as a child, a real listener holding a port, moto's real S3 server, a closed port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rpc.grpc_helpers import write_small_model

# Everything the S3 client could read credentials or an endpoint from, so each case controls its own.
_AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
# A bound, not a benchmark: botocore's default retries took 27 s on a refused connection.
FAST_S = 15.0


def run(*args: str | Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "shardstore", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=120)
    return result, time.monotonic() - started


def one_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shardstore {command}: error: "), result.stderr
    return lines[0]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def aws_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _AWS_KEYS}
    # No credentials files and no instance metadata: what is set below is all the client has.
    env |= {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}
    return env | values


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
def test_serve_on_a_busy_port(flag: str, held_port: int, tmp_path: Path) -> None:
    ports = {"--port": "0", flag: str(held_port)}
    args = [item for pair in ports.items() for item in pair]
    result, _seconds = run("serve", "--store", tmp_path / "store", *args, env=dict(os.environ))
    line = one_line(result, "serve")
    assert f"127.0.0.1:{held_port}" in line and "in use" in line, line


def test_s3_without_credentials(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    env = aws_env(AWS_ENDPOINT_URL=s3_endpoint)
    model = write_small_model(tmp_path / "model")
    for command in (("ls", "--store", f"s3://{s3_bucket}/m"), ("push", model, "m:v1", "--store", f"s3://{s3_bucket}/m")):
        result, seconds = run(*command, env=env)
        line = one_line(result, str(command[0]))
        assert "no S3 credentials found" in line and "AWS_ACCESS_KEY_ID" in line, line
        assert seconds < FAST_S


def test_s3_with_a_wrong_endpoint(closed_port: int, tmp_path: Path) -> None:
    env = aws_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port}")
    for command in (("ls", "--store", "s3://models/m"), ("pull", "m:v1", tmp_path / "out", "--store", "s3://models/m")):
        result, seconds = run(*command, env=env)
        line = one_line(result, str(command[0]))
        assert "cannot reach the S3 endpoint" in line and f"127.0.0.1:{closed_port}" in line, line
        assert "no endpoint is set" not in line
        assert seconds < FAST_S


def test_s3_without_an_endpoint_names_the_setting(closed_port: int) -> None:
    # No endpoint: the client goes to AWS. The proxy, a closed local port, keeps the test off the internet.
    env = aws_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  HTTPS_PROXY=f"http://127.0.0.1:{closed_port}", HTTP_PROXY=f"http://127.0.0.1:{closed_port}")
    result, seconds = run("ls", "--store", "s3://models/m", env=env)
    line = one_line(result, "ls")
    assert "cannot reach the S3 endpoint" in line and "set AWS_ENDPOINT_URL or -o endpoint_url=" in line, line
    assert seconds < FAST_S


def test_s3_that_answers_works_after_the_first_contact_tag_and_rm_included(s3_endpoint: str, s3_bucket: str,
                                                             tmp_path: Path) -> None:
    env = aws_env(AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    model = write_small_model(tmp_path / "model")
    pushed, _seconds = run("push", model, "m:v1", "--store", f"s3://{s3_bucket}/m", "--quiet", env=env)
    assert pushed.returncode == 0, pushed.stderr
    pulled, _seconds = run("pull", "m:v1", tmp_path / "out", "--store", f"s3://{s3_bucket}/m", "--quiet", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    # tag and rm on S3 too: refs move and go through the same Repository API as on a folder.
    store = ["--store", f"s3://{s3_bucket}/m"]
    assert run("tag", "m:v1", "m:v2", *store, env=env)[0].returncode == 0
    assert run("rm", "m:v1", *store, env=env)[0].returncode == 0
    listed, _seconds = run("ls", *store, "--json", env=env)
    assert [m["ref"] for m in json.loads(listed.stdout)["models"]] == ["m:v2"]
    gone = one_line(run("pull", "m:v1", tmp_path / "gone", *store, env=env)[0], "pull")
    assert gone.endswith("tags of 'm': v2"), gone
