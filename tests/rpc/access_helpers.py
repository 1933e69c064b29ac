"""Helpers for the access-control, TLS and deadline tests: a real `shardstore serve` process, test certificates."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

READ_TOKEN = "read-token-0123456789abcdef"
WRITE_TOKEN = "write-token-0123456789abcdef"
TEAM_TOKEN = "team-token-0123456789abcdef"  # write, but only models under team/
UNKNOWN_TOKEN = "unknown-token-0123456789abcdef"
DELETE_TOKEN = "delete-token-0123456789abcdef"  # may also remove refs (shardstore rm)
TOKENS = f"{READ_TOKEN}:read,{WRITE_TOKEN}:write,{TEAM_TOKEN}:write:team/,{DELETE_TOKEN}:delete"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``shardstore ARGS`` in a child process."""
    return subprocess.run([sys.executable, "-m", "shardstore", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    ready: dict[str, Any]

    @property
    def address(self) -> str:
        return str(self.ready["address"])


@contextmanager
def serve_process(store: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    """``shardstore serve --port 0 --json`` on ``store``; stopped with SIGTERM (and checked to exit 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardstore", "serve", "--store", str(store), "--port", "0", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"serve exited: {proc.wait(timeout=30)} {proc.stderr.read() if proc.stderr else ''}"
        served = ServeProcess(proc, json.loads(line))
        yield served
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def env_with(**values: str) -> dict[str, str]:
    """This environment (with the test's SHARDSTORE_CACHE) less token and serve settings, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHARDSTORE_TOKEN", "SHARDSTORE_SERVE_"))}
    env.update(values)
    return env


def one_line_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The CLI's single error line (exit 1, no traceback)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shardstore {command}: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# -- certificates --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """PEM files made by :func:`make_certs`."""

    folder: Path

    def __call__(self, name: str) -> str:
        """``certs("ca.pem")``, ``certs("server.key")``: the path as a string, as a flag takes it."""
        return str(self.folder / name)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)))


def _ca(folder: Path, stem: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(f"shardstore {stem}", _name(f"shardstore {stem}"), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    _write(folder, stem, key, cert)
    return key, cert


def _leaf(folder: Path, stem: str, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
          usage: x509.ObjectIdentifier, names: Sequence[x509.GeneralName] = ()) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(stem, ca[1].subject, key)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    _write(folder, stem, key, builder.sign(ca[0], hashes.SHA256()))


def make_certs(folder: Path) -> Certs:
    """ca.pem, server.pem/.key (SANs 127.0.0.1 and localhost), client.pem/.key, and an unrelated other-ca's client."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    _leaf(folder, "server", ca, ExtendedKeyUsageOID.SERVER_AUTH,
          [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    _leaf(folder, "client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    other = _ca(folder, "other-ca")
    _leaf(folder, "stranger", other, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Certs(folder)
