"""The HTTP gateway of a TLS-configured server speaks HTTPS only, with the gRPC port's certificate
and client CA (mutual TLS): a client with the CA and a client certificate gets the gRPC image;
plaintext HTTP and a client without a certificate are refused at the handshake. Slow: a server of
its own (~10 s to start on a shared 2-core machine).
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import ssl
from dataclasses import replace

import pytest

from sdserve.client import Client
from tests.server.conftest import KEYS, ServerThread, make_config, max_diff, png_pixels
from tests.server.test_tls import pki  # noqa: F401 (the CA, server and client certificates fixture)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")]

REQUEST = {"prompt": "a red circle", "steps": 2, "seed": 5, "width": 32, "height": 32}


def _https(port: int, context: ssl.SSLContext, method: str, path: str, body: bytes | None = None):
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Authorization": f"Bearer {KEYS['alice']}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_https_with_the_servers_certificate_and_client_ca(pki, tmp_path):  # noqa: F811
    config = make_config(tmp_path / "registry")
    config = replace(config, server=replace(config.server, http_port=0, metrics_port=None,
                                            tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                                            tls_client_ca=str(pki / "ca.pem")))
    thread = ServerThread(config).start()
    try:
        port = thread.server.http.port
        assert thread.server.http.scheme == "https"
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        assert _https(port, context, "GET", "/v1/health") == (200, {"status": "SERVING"})
        status, body = _https(port, context, "POST", "/v1/generate", json.dumps(REQUEST).encode())
        assert status == 200, body
        with Client(f"127.0.0.1:{thread.server.port}", api_key=KEYS["alice"], tls=True, ca=pki / "ca.pem",
                    cert=pki / "client.pem", key=pki / "client.key") as client:
            expected = client.generate(REQUEST)
        png = base64.b64decode(body["images"][0]["png"])
        assert max_diff(png_pixels(png), png_pixels(expected.images[0].png)) == 0
        # Plaintext HTTP is not served on the port at all.
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            plain.request("GET", "/v1/health")
            plain.getresponse().read()
        plain.close()
        # Mutual TLS: without a client certificate the handshake fails.
        bare = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _https(port, bare, "GET", "/v1/health")
    finally:
        thread.stop()
