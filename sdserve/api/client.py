"""A small Python client for an sdserve server.

    from sdserve.client import Client
    with Client("127.0.0.1:50051", api_key=None) as client:
        response = client.generate({"prompt": "a red circle", "steps": 4})
        open("out.png", "wb").write(response.images[0].png)
        info = client.upload_adapter("style.safetensors", name="style", family="sd1")
        client.generate({"prompt": "...", "adapters": [{"name": "style", "scale": 0.8}]})

Requests are dicts with GenerateRequest's field names (the same JSON as `sdserve generate
--requests` reads) or GenerateRequest messages. In a dict, an image field (`init_image`, `mask`,
`controlnets[i].image`, `ip_adapters[i].image`) takes raw bytes, a `pathlib.Path`, a PIL image
(sent as PNG) or base64 text as in JSON:

    client.generate({"prompt": "a house", "init_image": Path("in.png"), "strength": 0.6,
                     "controlnets": [{"model": "edges", "image": open("edges.png", "rb").read()}]})

Errors arrive as grpc.RpcError with the server's status code and a message naming the field; a request that failed inside the model
is INTERNAL with the cause's short form in the message, and `cause_of(error)` returns the
server's chain of causes (type and message each, no paths, no traces).

TLS: `Client(target, tls=True)` checks the server against the system's CAs, `ca=` against
yours (a PEM file path or bytes); `cert=` and `key=` add a client certificate for a server that
asks for one (mutual TLS). An API key sent without TLS crosses the network readable.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from sdserve.errors import CAUSE_METADATA_KEY

CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # responses carry every image of a request as PNG

Pem = str | os.PathLike[str] | bytes  # a PEM file's path, or its bytes


def _convert() -> ModuleType:
    """The schema module, imported on first use: protobuf and sdserve's stubs cost ~0.07 s that
    `health()` (`sdserve client health`) does not need (docs/benchmarks.md, "CLI start-up")."""
    from sdserve.api import convert

    return convert


def _pem(source: Pem | None) -> bytes | None:
    return source if source is None or isinstance(source, bytes) else Path(source).read_bytes()


def tls_credentials(ca: Pem | None = None, cert: Pem | None = None, key: Pem | None = None) -> grpc.ChannelCredentials:
    """Channel credentials: the server checked against `ca` (None: the system's CAs), and the
    client certificate `cert` with its `key` when the server asks for one (mutual TLS)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(root_certificates=_pem(ca), private_key=_pem(key), certificate_chain=_pem(cert))


def cause_of(error: grpc.RpcError) -> str | None:
    """The causes the server told with an INTERNAL status (its `sdserve-cause` trailer), outermost
    first, joined by " <- "; None when it told none."""
    trailers = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    return next((value for key, value in trailers or () if key == CAUSE_METADATA_KEY), None)


def image_bytes(value: Any) -> Any:
    """An image field's value as the schema takes it: bytes (a PNG/JPEG file's contents) as they
    are, a path (`pathlib.Path` or any `os.PathLike`) read, a PIL image encoded as PNG; a `str`
    stays base64 text (the JSON form), anything else goes on to be refused naming its field."""
    if isinstance(value, os.PathLike):
        return Path(value).read_bytes()
    if hasattr(value, "save") and hasattr(value, "mode") and hasattr(value, "size"):  # PIL.Image.Image
        import io

        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    return value


class Client:
    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = None,
        *,
        tls: bool = False,
        ca: Pem | None = None,
        cert: Pem | None = None,
        key: Pem | None = None,
    ) -> None:
        """`tls`, or any of `ca`/`cert`/`key`, connects over TLS (see the module's docstring)."""
        self.target = target
        self.timeout = timeout
        self._metadata: list[tuple[str, str]] = [("authorization", f"Bearer {api_key}")] if api_key else []
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),  # requests may carry images
        ]
        if tls or ca is not None or cert is not None or key is not None:
            self._channel = grpc.secure_channel(target, tls_credentials(ca, cert, key), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)

    @functools.cached_property
    def _stubs(self) -> Any:
        return _convert().stubs(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _meta(self, priority: int | None = None) -> list[tuple[str, str]]:
        meta = list(self._metadata)
        if priority is not None:
            meta.append(("sdserve-priority", str(priority)))
        return meta

    @staticmethod
    def _request(request: dict[str, Any] | Any) -> Any:
        if not isinstance(request, dict):
            return request
        return _convert().pb_from_dict(_convert().map_bytes_fields(request, image_bytes))

    # -- generation ------------------------------------------------------------------------------

    def generate(self, request: dict[str, Any] | Any, *, timeout: float | None = None, priority: int | None = None) -> Any:
        """Run one request; returns the GenerateResponse (images[i].png, seed, timings, adapters)."""
        return self._stubs.generation.Generate(
            self._request(request), timeout=timeout or self.timeout, metadata=self._meta(priority)
        )

    def generate_future(self, request: dict[str, Any] | Any, *, timeout: float | None = None, priority: int | None = None) -> Any:
        """Start one request without waiting: a grpc Future (`.result()`, `.cancel()`)."""
        return self._stubs.generation.Generate.future(
            self._request(request), timeout=timeout or self.timeout, metadata=self._meta(priority)
        )

    def generate_stream(self, request: dict[str, Any] | Any, *, timeout: float | None = None, priority: int | None = None) -> Any:
        """Events (queued, progress per step, result); the returned call can be `.cancel()`ed."""
        return self._stubs.generation.GenerateStream(
            self._request(request), timeout=timeout or self.timeout, metadata=self._meta(priority)
        )

    # -- adapters --------------------------------------------------------------------------------

    def upload_adapter(
        self,
        source: str | os.PathLike[str] | bytes,
        *,
        name: str,
        family: str = "",
        kind: str = "lora",
        shared: bool = False,
        sha256: str | None = None,
        timeout: float | None = None,
        model: str = "",
    ) -> Any:
        """Upload a safetensors file (path or bytes); returns its AdapterInfo.

        The server validates it against `model` (a served model's name) when given, else against
        every served model of `family` (of any family when both are ""), and accepts it if it fits
        at least one; AdapterInfo.models lists the models it fits."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        header = _convert().UploadHeader(
            name=name,
            kind=kind,
            family=family,
            sha256=sha256 or hashlib.sha256(data).hexdigest(),
            shared=shared,
            size=len(data),
            model=model,
        )
        return self.upload_chunks(_convert().upload_chunks(header, data, CHUNK_BYTES), timeout=timeout)

    def upload_chunks(self, chunks: Iterator[Any], *, timeout: float | None = None) -> Any:
        """Send a prepared upload stream (tests use this to send malformed streams)."""
        return self._stubs.adapters.UploadAdapter(chunks, timeout=timeout or self.timeout, metadata=self._meta())

    def list_adapters(self, family: str = "") -> Any:
        request = _convert().request_message("ListAdaptersRequest", family=family)
        return self._stubs.adapters.ListAdapters(request, timeout=self.timeout, metadata=self._meta())

    def get_adapter(self, name: str) -> Any:
        request = _convert().request_message("GetAdapterRequest", name=name)
        return self._stubs.adapters.GetAdapter(request, timeout=self.timeout, metadata=self._meta())

    def delete_adapter(self, name: str, *, shared: bool = False) -> Any:
        request = _convert().request_message("DeleteAdapterRequest", name=name, shared=shared)
        return self._stubs.adapters.DeleteAdapter(request, timeout=self.timeout, metadata=self._meta())

    # -- models and health -------------------------------------------------------------------------

    def list_models(self) -> Any:
        request = _convert().request_message("ListModelsRequest")
        return self._stubs.models.ListModels(request, timeout=self.timeout, metadata=self._meta())

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... from the standard grpc.health.v1 service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
