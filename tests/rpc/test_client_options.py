"""Every client command takes the same client options; sizes and the store come from the environment too.

Real `shardstore serve` processes (TLS and tokens), the real CLI in child processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rpc.access_helpers import READ_TOKEN, Certs, cli, env_with, make_certs, one_line_error, serve_process
from rpc.grpc_helpers import push_small_model


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store, _model = push_small_model(tmp_path_factory.mktemp("opts"))
    return store.root


def test_load_and_health_take_token_tls_and_timeout(small_store: Path, certs: Certs) -> None:
    env = env_with(SHARDSTORE_TOKENS=f"{READ_TOKEN}:read")
    tls = ["--tls-cert", certs("server.pem"), "--tls-key", certs("server.key")]
    with serve_process(small_store, *tls, env=env) as served:
        url = f"grpcs://{served.address}"
        client = ["--token", READ_TOKEN, "--tls-ca", certs("ca.pem"), "--timeout", "30"]
        loaded = cli("load", f"{url}/small:v1", "--json", *client, env=env_with())
        assert loaded.returncode == 0, loaded.stderr
        assert json.loads(loaded.stdout)["tensors"] == 5
        # Without the token: one line that names the flag the command now has.
        line = one_line_error(cli("load", f"{url}/small:v1", "--tls-ca", certs("ca.pem"), env=env_with()), "load")
        assert "requires a token" in line and "--token" in line

        health = cli("health", url, "--tls-ca", certs("ca.pem"), "--json", env=env_with())
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout) == {"address": served.address, "service": "", "status": "SERVING",
                                             "tls": True}
        # grpcs:// alone trusts the system's roots (here grpc's roots file is the test CA).
        roots = env_with(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=certs("ca.pem"))
        assert cli("health", url, "--quiet", env=roots).returncode == 0
        # Untrusted certificate, and plaintext against TLS: one line, exit 1, quickly.
        assert served.address in one_line_error(cli("health", url, "--timeout", "3", env=env_with()), "health")
        assert served.address in one_line_error(cli("health", f"grpc://{served.address}", "--timeout", "3",
                                                    env=env_with()), "health")


def test_cache_size_and_store_from_the_environment(small_store: Path, tmp_path: Path) -> None:
    with serve_process(small_store, env=env_with()) as served:
        server = f"grpc://{served.address}"
        env = env_with(SHARDSTORE_STORE=server, SHARDSTORE_CACHE_SIZE="1GiB")
        listed = cli("ls", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [m["ref"] for m in json.loads(listed.stdout)["models"]] == ["small:v1"]
        pulled = cli("pull", "small:v1", str(tmp_path / "out"), "--json", env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert json.loads(pulled.stdout)["tensors"] == 5
        inspected = cli("inspect", "small:v1", "--json", env=env)
        assert inspected.returncode == 0 and json.loads(inspected.stdout)["ref"] == "small:v1"
        # A command that needs a store, not a server, says so in one line.
        line = one_line_error(cli("gc", env=env), "gc")
        assert f"{server} (from $SHARDSTORE_STORE): a shardstore server, not a store" in line
        # A size that does not parse is an error, never silently the default.
        garbage = env_with(SHARDSTORE_STORE=server, SHARDSTORE_CACHE_SIZE="lots")
        line = one_line_error(cli("pull", "small:v1", str(tmp_path / "again"), env=garbage), "pull")
        assert line.endswith("$SHARDSTORE_CACHE_SIZE: not a size: 'lots' (e.g. 512MiB, 20GiB, 1048576)")
    # Flags go through the same parser.
    result = cli("push", str(tmp_path / "out"), "x:v1", "--chunk-size", "lots", env=env_with())
    assert result.returncode == 2 and "not a size: 'lots'" in result.stderr


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_the_api_refuses_a_timeout_that_would_fail_every_call(timeout: float) -> None:
    import shardstore
    from shardstore.errors import InvalidInputError

    # Refused as the client is made, before any connection: port 1 is never tried.
    with pytest.raises(InvalidInputError, match="the timeout must be more than 0 seconds"):
        shardstore.open("grpc://127.0.0.1:1/small:v1", timeout=timeout)
