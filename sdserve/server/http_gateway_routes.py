"""The HTTP gateway's routes: HTTP + JSON in, one gRPC call to this server out, JSON back.

    GET    /                      the playground page (and /playground.js, /playground.css)
    GET    /v1/health             grpc.health.v1 Check: 200 SERVING, 503 otherwise (no key needed)
    GET    /v1/models             Models.ListModels
    GET    /v1/adapters           Adapters.ListAdapters (?family=sd1)
    GET    /v1/adapters/NAME      Adapters.GetAdapter
    DELETE /v1/adapters/NAME      Adapters.DeleteAdapter (?shared=true)
    POST   /v1/adapters           Adapters.UploadAdapter: the file as the body, the header as
                                  ?name=&family=&kind=&shared=&sha256=&model= (sha256 computed if absent)
    POST   /v1/generate           ImageGeneration.Generate: GenerateRequest as JSON -> GenerateResponse
    POST   /v1/generate:stream    ImageGeneration.GenerateStream as server-sent events: one
                                  `event: queued|progress|result` per GenerateEvent, `event: error` on failure

Bodies and responses are the proto's JSON mapping with its field names (`json_format`, bytes
as base64), as JSON request files are. A gRPC status maps to one HTTP status (`HTTP_STATUS`),
the body `{"code": "INVALID_ARGUMENT", "message": "<the gRPC message>"}` (plus `cause`, the
`sdserve-cause` trailer, when there is one). A body that is not a request is refused after the
caller is authenticated (a probe call), as the gRPC server refuses a malformed message: an
unauthenticated caller hears 401 whatever it sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import select
import socket
import ssl
import tempfile
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import grpc

from sdserve.api import convert
from sdserve.errors import CAUSE_METADATA_KEY, SdserveError
from sdserve.server.http_gateway import READ_TIMEOUT_SECONDS, Limits
from sdserve.server.status import INTERNAL_MESSAGE

log = logging.getLogger("sdserve.server")

HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,  # the client closed the request (nginx's and grpc-gateway's code)
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}  # anything else (INTERNAL, UNKNOWN, DATA_LOSS): 500

# Request headers relayed as gRPC metadata (lower case); every other header stays here. The W3C
# trace context lets an HTTP caller's trace continue into the call's spans ([server] tracing).
FORWARDED_HEADERS = ("authorization", "sdserve-priority", "traceparent", "tracestate")
PLAYGROUND_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
# The page loads nothing from elsewhere and runs no inline script; images are data: URLs.
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
API_PATHS = ("/v1/health", "/v1/models", "/v1/adapters", "/v1/generate", "/v1/generate:stream")
UPLOAD_PARAMS = ("name", "family", "kind", "shared", "sha256", "model")
UPLOAD_CHUNK = 1 << 20
DISCONNECT_POLL_SECONDS = 0.25


class HttpError(Exception):
    """A refusal the gateway answers itself (before any gRPC call), in gRPC's terms."""

    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status  # when gRPC's code has no HTTP status of its own (405)


@cache
def _playground(name: str) -> bytes:
    return resources.files("sdserve.server.playground").joinpath(name).read_bytes()


class Calls:
    """The gRPC side: stubs on the private channel."""

    def __init__(self, stubs: convert.Stubs, channel: grpc.Channel) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.stubs = stubs
        self.health = health_pb2_grpc.HealthStub(channel)
        self.health_request = health_pb2.HealthCheckRequest
        self.serving = health_pb2.HealthCheckResponse.SERVING


def _flag(value: str, name: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0", ""):
        return False
    raise HttpError("INVALID_ARGUMENT", f"{name}: must be true or false")


def _query(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=16)
    except ValueError:
        raise HttpError("INVALID_ARGUMENT", "the query string is malformed") from None
    for key, values in params.items():
        if key not in allowed:
            raise HttpError("INVALID_ARGUMENT",
                            f"unknown query parameter {key[:32]!r}; parameters are {', '.join(allowed) or 'none'}")
        if len(values) > 1:
            raise HttpError("INVALID_ARGUMENT", f"query parameter {key!r} is given more than once")
    return {key: values[0] for key, values in params.items()}


def handler_class(calls: Calls, limits: Limits) -> type[BaseHTTPRequestHandler]:
    return type("GatewayHandler", (GatewayHandler,), {"calls": calls, "limits": limits})


class GatewayHandler(BaseHTTPRequestHandler):
    calls: Calls
    limits: Limits
    server_version = "sdserve"
    sys_version = ""
    timeout = READ_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass  # each relayed call has its log line on the gRPC side (request_log.py)

    # -- dispatch --------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path
        try:
            self._same_origin()
            if path in PLAYGROUND_FILES and method == "GET":
                self._static(path)
            elif path == "/v1/health" and method == "GET":
                self._health()
            elif path == "/v1/models" and method == "GET":
                _query(url.query, ())
                self._unary(self.calls.stubs.models.ListModels, convert.request_message("ListModelsRequest"))
            elif path == "/v1/adapters" and method == "GET":
                params = _query(url.query, ("family",))
                request = convert.request_message("ListAdaptersRequest", family=params.get("family", ""))
                self._unary(self.calls.stubs.adapters.ListAdapters, request)
            elif path == "/v1/adapters" and method == "POST":
                self._upload(_query(url.query, UPLOAD_PARAMS))
            elif path.startswith("/v1/adapters/") and method in ("GET", "DELETE"):
                name = unquote(path.removeprefix("/v1/adapters/"))
                if method == "GET":
                    _query(url.query, ())
                    self._unary(self.calls.stubs.adapters.GetAdapter,
                                convert.request_message("GetAdapterRequest", name=name))
                else:
                    shared = _flag(_query(url.query, ("shared",)).get("shared", ""), "shared")
                    self._unary(self.calls.stubs.adapters.DeleteAdapter,
                                convert.request_message("DeleteAdapterRequest", name=name, shared=shared))
            elif path in ("/v1/generate", "/v1/generate:stream") and method == "POST":
                _query(url.query, ())
                self._generate(stream=path.endswith(":stream"))
            elif self._known(path):
                raise HttpError("UNIMPLEMENTED", f"{method} is not served on {path[:64]}", http_status=405)
            else:
                raise HttpError("NOT_FOUND", "no such endpoint; see docs/api.md (HTTP)")
        except HttpError as error:
            self._error(error.code, error.message, http_status=error.http_status)
        except grpc.RpcError as error:
            self._rpc_error(error)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away or stalled: nobody to answer
        except Exception:  # a bug here: the client hears what a bug in a servicer gives (status.py)
            log.exception("HTTP %s %s failed", method, path[:64])
            with contextlib.suppress(OSError):
                self._error("INTERNAL", INTERNAL_MESSAGE)

    def _same_origin(self) -> None:
        """Refuse a call a browser makes from another site's page: a form or `fetch` there can
        POST without a preflight, and on a keyless server it would run as the anonymous tenant.
        Browsers send `Origin` on such calls; curl and the gRPC-style clients send none."""
        origin = self.headers.get("Origin")
        if origin is None:
            return
        scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
        if origin != f"{scheme}://{self.headers.get('Host', '')}":
            raise HttpError("PERMISSION_DENIED", "cross-origin requests are refused; use the page this server serves at /")

    @staticmethod
    def _known(path: str) -> bool:
        return path in PLAYGROUND_FILES or path in API_PATHS or path.startswith("/v1/adapters/")

    # -- responses -------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any, extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode() + b"\n", "application/json", extra)

    def _error(self, code: str, message: str, cause: str | None = None, http_status: int | None = None) -> None:
        body = {"code": code, "message": message}
        if cause:
            body["cause"] = cause
        extra = {"WWW-Authenticate": "Bearer"} if code == "UNAUTHENTICATED" else None
        self._json(http_status or HTTP_STATUS.get(code, 500), body, extra)

    def _rpc_error(self, error: grpc.RpcError) -> None:
        code, message, cause = _status_of(error)
        self._error(code, message, cause)

    def _static(self, path: str) -> None:
        name, content_type = PLAYGROUND_FILES[path]
        self._send(200, _playground(name), content_type, {"Content-Security-Policy": PAGE_POLICY})

    # -- calls -----------------------------------------------------------------------------------

    def _metadata(self) -> list[tuple[str, str]]:
        return [(key, self.headers[key]) for key in FORWARDED_HEADERS if self.headers.get(key) is not None]

    def _unary(self, method: Any, request: Any) -> None:
        response = method(request, metadata=self._metadata())
        self._json(200, convert.to_dict(response))

    def _health(self) -> None:
        try:
            status = self.calls.health.Check(self.calls.health_request(service=""), timeout=5.0).status
        except grpc.RpcError:
            status = None
        serving = status == self.calls.serving
        self._json(200 if serving else 503, {"status": "SERVING" if serving else "NOT_SERVING"})

    def _authenticate(self) -> None:
        """A cheap authenticated call: a caller whose key the server refuses hears that first."""
        self.calls.stubs.models.ListModels(convert.request_message("ListModelsRequest"), metadata=self._metadata())

    def _body_length(self, limit: int) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise HttpError("INVALID_ARGUMENT", "chunked request bodies are not accepted; send Content-Length")
        text = self.headers.get("Content-Length")
        if text is None:
            raise HttpError("INVALID_ARGUMENT", "the request needs a Content-Length header")
        try:
            length = int(text)
        except ValueError:
            raise HttpError("INVALID_ARGUMENT", "Content-Length must be a number of bytes") from None
        if length < 0:
            raise HttpError("INVALID_ARGUMENT", "Content-Length must be a number of bytes")
        if length > limit:
            self.close_connection = True  # its body stays unread
            raise HttpError("RESOURCE_EXHAUSTED", f"the request body has {length} bytes, more than the limit of {limit}",
                            http_status=413)
        return length

    def _continue(self) -> None:
        """Answer `Expect: 100-continue` (curl sends it for bodies over 1 MiB, then waits a second
        for it): the body is wanted. The stdlib answers it only under HTTP/1.1, which this is not."""
        if self.headers.get("Expect", "").lower() == "100-continue" and self.request_version >= "HTTP/1.1":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()

    def _read_request(self) -> Any:
        """The body as a GenerateRequest; a body that is not one is refused after authentication."""
        length = self._body_length(self.limits.json_body_bytes)
        self._continue()
        body = self.rfile.read(length)
        try:
            data = json.loads(body)
            message = convert.pb_from_dict(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
            self._authenticate()
            detail = f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise HttpError("INVALID_ARGUMENT", f"the request body is not valid JSON{detail}") from None
        except SdserveError as exc:
            self._authenticate()
            raise HttpError(exc.status, str(exc)) from None
        size = message.ByteSize()
        if size > self.limits.message_bytes:
            raise HttpError("RESOURCE_EXHAUSTED",
                            f"the request is {size} bytes as protobuf, more than the limit of {self.limits.message_bytes}",
                            http_status=413)
        return message

    def _generate(self, stream: bool) -> None:
        message = self._read_request()
        stubs = self.calls.stubs.generation
        if not stream:
            future = stubs.Generate.future(message, metadata=self._metadata())
            self._wait(future)
            self._json(200, convert.to_dict(future.result()))
            return
        call = stubs.GenerateStream(message, metadata=self._metadata())
        try:
            # The first event comes after admission: a refusal is still an HTTP status, not an event.
            first = next(call)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self._event(first)
            try:
                for event in call:
                    self._event(event)
            except grpc.RpcError as error:
                code, text, cause = _status_of(error)
                body = {"code": code, "message": text, **({"cause": cause} if cause else {})}
                self._sse("error", body)
        except StopIteration:
            raise HttpError("INTERNAL", "the stream ended without an event") from None
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            call.cancel()  # the reader went away: the server frees the request's queue slot or rows
            raise

    def _event(self, event: Any) -> None:
        self._sse(event.WhichOneof("event") or "event", convert.to_dict(event))

    def _sse(self, name: str, data: Any) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def _wait(self, future: Any) -> None:
        """Wait for a unary call; cancel it when the client hangs up (so admission frees its room)."""
        while not future.done():
            try:
                future.exception(timeout=DISCONNECT_POLL_SECONDS)
            except grpc.FutureTimeoutError:
                if self._hung_up():
                    future.cancel()
                    raise BrokenPipeError("the HTTP client closed the connection") from None
            except grpc.FutureCancelledError:
                raise BrokenPipeError("the call was cancelled") from None

    def _hung_up(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            # A request is all read: what is readable now is the client's EOF (or stray bytes).
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # TLS sockets take no recv flags: not detected there
            return False

    def _upload(self, params: dict[str, str]) -> None:
        length = self._body_length(self.limits.upload_bytes)
        self._authenticate()  # before reading up to max_adapter_bytes of someone's body
        self._continue()
        if not params.get("name"):
            raise HttpError("INVALID_ARGUMENT", "header.name: the query needs ?name=")
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
            hasher, left = hashlib.sha256(), length
            while left:
                piece = self.rfile.read(min(UPLOAD_CHUNK, left))
                if not piece:
                    raise HttpError("INVALID_ARGUMENT", f"data: the body ended {left} bytes short of Content-Length")
                hasher.update(piece)
                spool.write(piece)
                left -= len(piece)
            header = {
                "name": params["name"], "family": params.get("family", ""), "kind": params.get("kind", ""),
                "shared": _flag(params.get("shared", ""), "shared"),
                "sha256": params.get("sha256") or hasher.hexdigest(), "size": length,
            }
            if params.get("model"):
                if "model" not in convert.request_message("AdapterHeader").DESCRIPTOR.fields_by_name:
                    raise HttpError("INVALID_ARGUMENT", "model: this server's uploads take no target model")
                header["model"] = params["model"]
            spool.seek(0)
            response = self.calls.stubs.adapters.UploadAdapter(_upload_chunks(header, spool), metadata=self._metadata())
        self._json(200, convert.to_dict(response))


def _upload_chunks(header: dict[str, Any], spool: Any) -> Iterator[Any]:
    message = convert.request_message("AdapterHeader")
    for key, value in header.items():  # set one by one: request_message's own first argument is `kind`
        setattr(message, key, value)
    yield convert.request_message("UploadAdapterChunk", header=message)
    while piece := spool.read(UPLOAD_CHUNK):
        yield convert.request_message("UploadAdapterChunk", data=piece)


def _status_of(error: grpc.RpcError) -> tuple[str, str, str | None]:
    """(code name, message, cause trailer or None) of a failed call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else ""
    cause = None
    for key, value in (error.trailing_metadata() if hasattr(error, "trailing_metadata") else None) or ():
        if key == CAUSE_METADATA_KEY:
            cause = value if isinstance(value, str) else value.decode(errors="replace")
    return code.name, message or code.name, cause
