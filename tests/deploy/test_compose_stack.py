"""deploy/compose.yaml end to end, without a container engine: its own commands, as written, on real processes.

What is read from compose.yaml and run: the `certs` one-shot's script (with the image's openssl), the
servers' environment (TLS, tokens, store, cache), their healthcheck, and the `push` and `pull` commands with
their tokens. What stands in for the containers: MinIO is moto's server on 127.0.0.1 (with the compose
credentials), each service's volume paths are folders here, and the names the clients dial
(`shardstore-1:50051`) are the servers' loopback ports; the certificate is checked to hold those names, so
the TLS the test runs is the TLS the containers would run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from cryptography import x509
from helpers import serve_from_env as serve
from helpers import tree_snapshot

from shardstore.rpc import is_tls_url, split_grpc_url

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose_services() -> dict[str, Any]:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert isinstance(services, dict)
    return services


def interpolate(value: object) -> str:
    """Compose's own substitution for what the file uses: ${VAR:-default} (VAR unset here) and $$."""
    return _DEFAULTED.sub(lambda m: m.group(2), str(value)).replace("$$", "$")


class Paths:
    """Container paths (volume mounts, the example image's model) to folders of this test."""

    def __init__(self, mapping: dict[str, Path]) -> None:
        self.mapping = mapping

    def __call__(self, text: str) -> str:
        for inside, outside in self.mapping.items():
            text = text.replace(inside, str(outside))
        return text


def environment_of(service: dict[str, Any], paths: Paths) -> dict[str, str]:
    return {name: paths(interpolate(value)) for name, value in (service.get("environment") or {}).items()}


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SHARDSTORE_", "AWS_"))}


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def dialed(command: list[str]) -> str:
    """The HOST:PORT a compose client command dials; it must be TLS (a token never crosses in clear)."""
    url = next(arg for arg in command if arg.startswith(("grpc://", "grpcs://")))
    assert is_tls_url(url) or "--tls-ca" in command, f"{url}: a token would cross the network in clear"
    return split_grpc_url(url)[0]


def test_the_compose_stack_runs_as_written(minilm_dir: Path, s3_endpoint: str, tmp_path: Path) -> None:
    services = compose_services()
    certs_dir, pulled = tmp_path / "certs", tmp_path / "pulled"
    certs_dir.mkdir()
    paths = Paths({"/certs": certs_dir, "/opt/minilm": minilm_dir, "/tmp/minilm": pulled})

    # 1. The certs one-shot: its script, its environment, its openssl.
    certs = services["certs"]
    assert certs["entrypoint"] == ["/bin/sh", "-c"]
    script = interpolate(certs["command"][0])
    made = run(["/bin/sh", "-c", script], {**base_env(), **environment_of(certs, paths)})
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in certs_dir.iterdir()) == ["ca.pem", "server.key", "server.pem"]  # no CA key left
    again = run(["/bin/sh", "-c", script], {**base_env(), **environment_of(certs, paths)})
    assert again.returncode == 0 and "already" in again.stdout  # a restart keeps the certificates
    server_cert = x509.load_pem_x509_certificate((certs_dir / "server.pem").read_bytes())
    names = set(server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName))

    # 2. The bucket createbucket makes, on moto instead of MinIO.
    one, two = services["shardstore-1"], services["shardstore-2"]
    env_one = environment_of(one, paths)
    bucket = env_one["SHARDSTORE_SERVE_STORE"].removeprefix("s3://").split("/")[0]
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket=bucket)

    # 3. The two servers with the compose environment; what the image sets, on free loopback ports.
    image_env = {"SHARDSTORE_SERVE_HOST": "127.0.0.1", "SHARDSTORE_SERVE_PORT": "0",
                 "SHARDSTORE_SERVE_METRICS_PORT": "0", "SHARDSTORE_CACHE": str(tmp_path / "cache")}
    with serve({**base_env(), **env_one, "AWS_ENDPOINT_URL": s3_endpoint, **image_env}, tmp_path / "one.log") as a, \
            serve({**base_env(), **environment_of(two, paths), "AWS_ENDPOINT_URL": s3_endpoint, **image_env},
                  tmp_path / "two.log") as b:
        assert a["tls"] is True and b["tls"] is True and a["tokens"] == b["tokens"] == 2
        ports = {"shardstore-1": a["address"].rsplit(":", 1)[1], "shardstore-2": b["address"].rsplit(":", 1)[1]}

        # 4. Each server's own healthcheck command (it dials localhost:50051 inside its container).
        for name, service in (("shardstore-1", one), ("shardstore-2", two)):
            test = [interpolate(arg) for arg in service["healthcheck"]["test"]]
            assert test[0] == "CMD" and test[1] == "shardstore"
            host = dialed(test[2:]).rsplit(":", 1)[0]
            assert host in names
            argv = [paths(arg).replace(f"{host}:50051", f"{host}:{ports[name]}") for arg in test[2:]]
            health = run([sys.executable, "-m", "shardstore", *argv], base_env())
            assert health.returncode == 0, health.stderr

        # 5. push, then pull, exactly as compose runs them, each with its own token.
        outputs = {}
        for name in ("push", "pull"):
            service = services[name]
            command = [interpolate(arg) for arg in service["command"]]
            host, port = dialed(command).rsplit(":", 1)
            assert host in names and port == "50051"  # the certificate names what the client dials
            argv = [paths(arg).replace(f"{host}:{port}", f"localhost:{ports[host]}") for arg in command]
            result = run([sys.executable, "-m", "shardstore", *argv], {**base_env(), **environment_of(service, paths),
                                                                        "SHARDSTORE_CACHE": str(tmp_path / name)})
            assert result.returncode == 0, (name, result.stderr)
            outputs[name] = json.loads(result.stdout)
        assert outputs["pull"]["manifest_id"] == outputs["push"]["manifest_id"]
        assert tree_snapshot(pulled) == tree_snapshot(minilm_dir)

        # The pull's token is read-only: the same command as a push is refused (scopes are as documented).
        read_env = {**base_env(), **environment_of(services["pull"], paths)}
        refused = run([sys.executable, "-m", "shardstore", "push", str(minilm_dir),
                       f"grpcs://localhost:{ports['shardstore-2']}/minilm:v2", "--tls-ca", str(certs_dir / "ca.pem")],
                      read_env)
        assert refused.returncode == 1 and "may not write" in refused.stderr


@pytest.mark.parametrize("service", ["push", "pull"])
def test_compose_clients_would_be_refused_in_clear(service: str) -> None:
    """Why the demo needs TLS: the same command over grpc:// to another host is refused before any call."""
    command = [interpolate(arg) for arg in compose_services()[service]["command"]]
    plain = [re.sub(r"^grpcs://", "grpc://", arg) for arg in command if arg not in ("--tls-ca", "/certs/ca.pem")]
    env = {**base_env(), "SHARDSTORE_TOKEN": "compose-demo-token-0000"}
    result = run([sys.executable, "-m", "shardstore", *plain], env)
    assert result.returncode == 1 and "refusing to send a token in plaintext" in result.stderr
