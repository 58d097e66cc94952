"""The HTTP/JSON gateway: sdserve.v1 over HTTP/1.0 and JSON, and the playground page at `/`.

Every HTTP call becomes one gRPC call to this server's own servicers, over a private Unix-socket
port the gRPC server binds for the gateway alone (in a fresh 0700 directory), with the caller's
`Authorization` header forwarded as metadata. Authentication, admission, validation, the error
messages, metrics and the per-request log line are therefore the gRPC path's own, not a copy
that could drift. The Unix socket (not the public port) keeps the hop working whatever `host`
is bound and whether or not the public port speaks TLS; only this server's user can open it.

The HTTP side is the stdlib's `ThreadingHTTPServer`: one thread per connection, at most
`max_concurrent_streams` connections at once (one more is answered 503 and closed), each socket
operation bounded by `READ_TIMEOUT_SECONDS`, so a slow or silent client holds one thread for a
bounded time. With `[server] tls_cert` set, the gateway speaks HTTPS with the same certificate
(and client CA: mutual TLS), and nothing in plaintext. Routes: `http_gateway_routes.py`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

from sdserve.api import convert
from sdserve.server.config import Config, ServerConfig

log = logging.getLogger("sdserve.server")

READ_TIMEOUT_SECONDS = 60.0  # one socket read or write of a client; a whole upload may take longer


@dataclass(frozen=True)
class Limits:
    """What one HTTP request may send, derived from the gRPC server's own limits."""

    json_body_bytes: int  # a JSON request body: the gRPC message limit plus base64's 4/3 and slack
    message_bytes: int  # the request as protobuf: the gRPC server's max_receive_message_bytes
    upload_bytes: int  # an adapter upload's body: [registry] max_adapter_bytes

    @classmethod
    def of(cls, config: Config) -> Limits:
        message = config.server.max_receive_message_bytes
        return cls(json_body_bytes=message * 4 // 3 + (1 << 20), message_bytes=message,
                   upload_bytes=config.registry.max_adapter_bytes)


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The HTTPS context of a TLS-configured server (None without `tls_cert`): the gRPC port's
    certificate, key and client CA, so HTTP is never the plaintext door to a TLS server."""
    if not config.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls_client_ca)
    return context


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on open connections and TLS handshakes off the accept loop."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int,
                 context: ssl.SSLContext | None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        if context is not None:
            # The handshake runs on the connection's own thread at its first read (under the
            # handler's timeout), so a client that never finishes it cannot stall accept().
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\n\r\n"
                                b'{"code": "UNAVAILABLE", "message": "too many HTTP connections; retry shortly"}\n')
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up or times out mid-request is not a server fault worth a traceback.
        log.debug("HTTP connection ended with an error", exc_info=True)


class HttpGateway:
    """Built before the gRPC server starts (it binds the private port), started after it."""

    def __init__(self, config: Config, grpc_server: grpc.aio.Server) -> None:
        self.config = config
        self.limits = Limits.of(config)
        self._context = ssl_context(config.server)  # bad TLS files fail start-up, as for gRPC
        self._dir = Path(tempfile.mkdtemp(prefix="sdserve-http-"))  # mode 0700: this user only
        self.grpc_target = f"unix:{self._dir / 'grpc.sock'}"
        if grpc_server.add_insecure_port(self.grpc_target) == 0:
            raise OSError("could not bind the HTTP gateway's private gRPC socket")
        self._channel: grpc.Channel | None = None
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def scheme(self) -> str:
        return "https" if self._context is not None else "http"

    def start(self) -> int:
        """Bind the HTTP port and serve on a thread; -> the bound port."""
        from sdserve.server.http_gateway_routes import Calls, handler_class

        server = self.config.server
        options = [
            # The gateway relays what a client may send and receive over gRPC, no more.
            ("grpc.max_send_message_length", server.max_receive_message_bytes),
            ("grpc.max_receive_message_length", server.max_send_message_bytes),
        ]
        self._channel = grpc.insecure_channel(self.grpc_target, options=options)
        calls = Calls(convert.stubs(self._channel), self._channel)
        host = server.http_host or server.host
        self._http = _HTTPServer((host, server.http_port or 0), handler_class(calls, self.limits),
                                 server.max_concurrent_streams, self._context)
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="sdserve-http", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop accepting; calls still relayed are cancelled with the channel (their handlers
        answer CANCELLED); remove the private socket."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        shutil.rmtree(self._dir, ignore_errors=True)
