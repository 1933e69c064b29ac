"""TLS and mutual TLS for server and client, from PEM files.

The server presents ``cert``/``key``; with ``client_ca`` it also demands a
client certificate signed by that CA (mutual TLS) and refuses the handshake
otherwise. A TLS server has no plaintext port at all, so a plaintext client
never gets as far as an RPC. The client trusts ``ca`` (default: the system
roots) and, for mutual TLS, presents its own ``cert``/``key``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from shardstore.errors import InvalidInputError

PathLike = str | os.PathLike[str]


def read_pem(path: PathLike, what: str) -> bytes:
    """The bytes of a PEM file, or a one-line error naming it (grpc itself would fail late and obscurely)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise InvalidInputError(f"{what} {path}: not a PEM file")
    return data


def check_key_pair(cert: PathLike, key: PathLike) -> None:
    """Refuse a certificate and key that do not belong together, naming both files.

    grpc finds out only when it binds, logs "Invalid private key" from its C core and reports the
    port as unusable; OpenSSL says what is wrong at once. The password callback refuses encrypted
    keys instead of prompting on the terminal: grpc cannot use them either.
    """
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Security level 0: whether a key is long enough or a signature strong enough is grpc's call
    # (BoringSSL serves an RSA-1024 key that OpenSSL's default level refuses as EE_KEY_TOO_SMALL).
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key), password=lambda: b"")
    except ssl.SSLError as exc:
        reason = exc.reason or "a file is not the PEM certificate or key its flag takes"
        raise InvalidInputError(f"TLS certificate {cert} and key {key} are not a pair ({reason}): give the PEM "
                                "certificate to --tls-cert and its own unencrypted private key to --tls-key") from None


@dataclass(frozen=True)
class ServerTls:
    cert: PathLike
    key: PathLike
    client_ca: PathLike | None = None  # given: mutual TLS, a client certificate signed by it is required

    def credentials(self) -> grpc.ServerCredentials:
        pair = (read_pem(self.key, "TLS key"), read_pem(self.cert, "TLS certificate"))
        check_key_pair(self.cert, self.key)
        client_ca = read_pem(self.client_ca, "TLS client CA") if self.client_ca is not None else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)


@dataclass(frozen=True)
class ClientTls:
    ca: PathLike | None = None  # None: the system's trusted roots
    cert: PathLike | None = None  # with key: the client certificate for mutual TLS
    key: PathLike | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidInputError("a TLS client certificate needs its key, and a key its certificate "
                                    "(--tls-cert and --tls-key go together)")

    def credentials(self) -> grpc.ChannelCredentials:
        key = read_pem(self.key, "TLS key") if self.key is not None else None
        cert = read_pem(self.cert, "TLS certificate") if self.cert is not None else None
        if self.cert is not None and self.key is not None:  # __post_init__: both or neither
            check_key_pair(self.cert, self.key)
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "TLS CA") if self.ca is not None else None,
            private_key=key,
            certificate_chain=cert,
        )
