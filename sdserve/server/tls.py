"""TLS for the gRPC port: the server's certificate and key, and an optional client CA (mutual TLS).

The files are read and checked once, when the Server is built (before any model loads), so a
missing file, a file that is not PEM or a key that does not belong to its certificate is one
line at start-up (`sdserve serve` exits 2), not a failed handshake on the first call. The
standard library's `ssl` does the checking: `load_cert_chain` refuses a key that does not match
its certificate, `load_verify_locations` a CA file without a certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from sdserve.errors import InvalidArgument
from sdserve.server.config import ServerConfig


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"[server] {key}: cannot read {path} ({exc.strerror or exc.__class__.__name__})") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The port's credentials from `config`'s tls_* files; None when TLS is off (no tls_cert)."""
    if not config.tls_cert:
        return None
    cert, key = _read("tls_cert", config.tls_cert), _read("tls_key", config.tls_key)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            Path(config.tls_cert).expanduser(), Path(config.tls_key).expanduser()
        )
    except ssl.SSLError as exc:
        # ssl's reasons: KEY_VALUES_MISMATCH, or a PEM routine that found no certificate or key.
        why = "does not belong to tls_cert" if "KEY_VALUES_MISMATCH" in str(exc) else "is not a PEM certificate and key"
        what = "tls_key" if "KEY_VALUES_MISMATCH" in str(exc) else "tls_cert/tls_key"
        raise InvalidArgument(f"[server] {what} {why} ({exc.reason or exc.__class__.__name__})") from None
    client_ca = None
    if config.tls_client_ca:
        client_ca = _read("tls_client_ca", config.tls_client_ca)
        try:
            ssl.create_default_context(ssl.Purpose.SERVER_AUTH).load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidArgument(f"[server] tls_client_ca is not a PEM CA certificate ({exc.__class__.__name__})") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def describe(config: ServerConfig) -> str:
    """How the port is secured, for the start-up log line."""
    if not config.tls_cert:
        return "plaintext (no TLS)"
    return "TLS, client certificates required (mutual TLS)" if config.tls_client_ca else "TLS"
