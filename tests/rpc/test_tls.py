"""TLS and mutual TLS with certificates made at test time: the right peers get in, every other one a clear line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import shardstore
from rpc.access_helpers import READ_TOKEN, Certs, cli, env_with, make_certs, one_line_error, serve_process
from rpc.grpc_helpers import push_small_model
from shardstore.errors import InvalidInputError, StoreError
from shardstore.repo.refs import parse_ref
from shardstore.rpc.background import BackgroundServer
from shardstore.rpc.client import GrpcClient
from shardstore.rpc.tls import ClientTls, ServerTls
from shardstore.store import LocalStore


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, Path]:
    return push_small_model(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(small: tuple[LocalStore, Path], certs: Certs) -> Iterator[BackgroundServer]:
    with BackgroundServer(small[0], tls=ServerTls(certs("server.pem"), certs("server.key"))) as server:
        yield server


@pytest.fixture
def mtls_server(small: tuple[LocalStore, Path], certs: Certs) -> Iterator[BackgroundServer]:
    tls = ServerTls(certs("server.pem"), certs("server.key"), client_ca=certs("ca.pem"))
    with BackgroundServer(small[0], tls=tls) as server:
        yield server


def _resolve(address: str, tls: ClientTls | None) -> str:
    with GrpcClient(address, tls=tls, retries=1, backoff=0.01, timeout=10) as client:
        return client.resolve(parse_ref("small:v1"))


def test_tls_pull_is_byte_exact(tls_server: BackgroundServer, certs: Certs, small: tuple[LocalStore, Path],
                                tmp_path: Path) -> None:
    report = shardstore.pull(f"grpcs://{tls_server.address}/small:v1", tmp_path / "out",
                             tls=ClientTls(ca=certs("ca.pem")))
    assert report.shards_fetched > 1
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (small[1] / "model.safetensors").read_bytes()


def test_plaintext_client_is_refused_by_a_tls_server_with_a_hint(tls_server: BackgroundServer) -> None:
    with pytest.raises(StoreError, match=r"if the server uses TLS, connect with grpcs:// or --tls-ca") as caught:
        _resolve(tls_server.address, None)
    assert "\n" not in str(caught.value)


def test_untrusted_server_certificate_is_refused(tls_server: BackgroundServer, certs: Certs) -> None:
    with pytest.raises(StoreError, match="not signed by a CA this client trusts"):
        _resolve(tls_server.address, ClientTls(ca=certs("other-ca.pem")))


def test_tls_client_against_a_plaintext_server_says_so(small: tuple[LocalStore, Path], certs: Certs) -> None:
    with BackgroundServer(small[0]) as server, pytest.raises(StoreError, match="does not speak TLS"):
        _resolve(server.address, ClientTls(ca=certs("ca.pem")))


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_server: BackgroundServer, certs: Certs) -> None:
    with pytest.raises(StoreError, match="--tls-cert/--tls-key"):
        _resolve(mtls_server.address, ClientTls(ca=certs("ca.pem")))
    stranger = ClientTls(ca=certs("ca.pem"), cert=certs("stranger.pem"), key=certs("stranger.key"))
    with pytest.raises(StoreError):
        _resolve(mtls_server.address, stranger)
    member = ClientTls(ca=certs("ca.pem"), cert=certs("client.pem"), key=certs("client.key"))
    assert len(_resolve(mtls_server.address, member)) == 64
    assert len(_resolve(mtls_server.address.replace("127.0.0.1", "localhost"), member)) == 64  # the DNS SAN


def test_bad_tls_files_are_one_line_errors(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="go together"):
        ClientTls(ca=certs("ca.pem"), cert=certs("client.pem"))
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(InvalidInputError, match=f"TLS certificate {not_pem}: not a PEM file"):
        ServerTls(not_pem, certs("server.key")).credentials()
    with pytest.raises(InvalidInputError, match=r"TLS CA /nonexistent/ca\.pem: No such file"):
        ClientTls(ca="/nonexistent/ca.pem").credentials()


def test_a_certificate_and_a_key_that_are_not_a_pair_are_one_line_errors(small: tuple[LocalStore, Path],
                                                                          certs: Certs) -> None:
    # grpc would log "Invalid private key" from its C core and then call the port unusable.
    for cert, key in (("server.pem", "client.key"), ("server.key", "server.key"), ("server.pem", "server.pem")):
        with pytest.raises(InvalidInputError) as caught:
            ServerTls(certs(cert), certs(key)).credentials()
        assert f"TLS certificate {certs(cert)} and key {certs(key)} are not a pair" in str(caught.value)
    with pytest.raises(InvalidInputError, match="are not a pair"):
        ClientTls(ca=certs("ca.pem"), cert=certs("client.pem"), key=certs("server.key")).credentials()
    result = cli("serve", "--store", str(small[0].root), "--port", "0", "--tls-cert", certs("server.pem"),
                 "--tls-key", certs("client.key"), env=env_with())
    line = one_line_error(result, "serve")
    assert "are not a pair (KEY_VALUES_MISMATCH)" in line and "in use" not in line, line
    assert "Invalid private key" not in result.stderr


def test_a_short_rsa_key_that_grpc_serves_is_not_refused(tmp_path: Path) -> None:
    # OpenSSL's default security level calls an RSA-1024 key too small; grpc (BoringSSL) serves it, so the
    # pair check must only ask whether the two files belong together.
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "short.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "short.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                                           serialization.NoEncryption()))
    ServerTls(tmp_path / "short.pem", tmp_path / "short.key").credentials()
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "other.key").write_bytes(other.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.TraditionalOpenSSL,
                                                             serialization.NoEncryption()))
    with pytest.raises(InvalidInputError, match="are not a pair"):
        ServerTls(tmp_path / "short.pem", tmp_path / "other.key").credentials()


def test_serve_with_a_missing_key_file_fails_naming_it(small: tuple[LocalStore, Path], certs: Certs) -> None:
    result = cli("serve", "--store", str(small[0].root), "--port", "0", "--tls-cert", certs("server.pem"),
                 "--tls-key", "/nonexistent/server.key", env=env_with())
    assert "TLS key /nonexistent/server.key: No such file" in one_line_error(result, "serve")
    result = cli("serve", "--store", str(small[0].root), "--port", "0", "--tls-cert", certs("server.pem"),
                 env=env_with())
    assert "needs both --tls-cert and --tls-key" in one_line_error(result, "serve")


def test_cli_over_mutual_tls_with_a_token(small: tuple[LocalStore, Path], certs: Certs, tmp_path: Path) -> None:
    """The deployment shape: mTLS and tokens together, the real serve process, the real CLI."""
    store, model = small
    env = env_with(SHARDSTORE_TOKENS=f"{READ_TOKEN}:read")
    with serve_process(store.root, "--require-token", "--tls-cert", certs("server.pem"), "--tls-key",
                       certs("server.key"), "--tls-client-ca", certs("ca.pem"), env=env) as served:
        assert served.ready["tls"] is True
        mtls = ["--tls-ca", certs("ca.pem"), "--tls-cert", certs("client.pem"), "--tls-key", certs("client.key")]
        pulled = cli("pull", f"grpcs://{served.address}/small:v1", str(tmp_path / "out"), "--json", "--token",
                     READ_TOKEN, *mtls, env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert json.loads(pulled.stdout)["tensors"] == 5
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
        # Plaintext: refused before any RPC, one line with the fix in it.
        line = one_line_error(cli("ls", "--store", f"grpc://{served.address}", "--token", READ_TOKEN, env=env), "ls")
        assert "grpcs://" in line
        # grpcs:// trusts the system roots (here: grpc's roots file pointed at the test CA) without --tls-ca.
        roots = {**env, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": certs("ca.pem")}
        listed = cli("ls", "--store", f"grpcs://{served.address}", "--token", READ_TOKEN, "--json",
                     "--tls-cert", certs("client.pem"), "--tls-key", certs("client.key"), env=roots)
        assert listed.returncode == 0, listed.stderr
        assert [m["ref"] for m in json.loads(listed.stdout)["models"]] == ["small:v1"]
        # TLS is fine but the token is missing: the token check still runs behind TLS.
        line = one_line_error(cli("ls", "--store", f"grpcs://{served.address}", *mtls, env=env), "ls")
        assert "requires a token" in line
