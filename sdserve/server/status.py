"""Typed errors -> gRPC status codes: the one place the mapping lives.

Handlers raise `SdserveError`s; the decorators here turn them into a status with the error's
message (which names the field and leaks no internals). Anything else is a bug: it is logged
with its trace on the server and the client gets INTERNAL with a generic message.

An INTERNAL error the engine raised around a failure of the request's own model work (`Internal`
with a `__cause__`: the UNet call, its scheduler step, preparing it, decoding) also tells the
client that cause, short: the exception's type and first line, with paths and addresses
replaced (`short_cause`), appended to the message; the trailing metadata `sdserve-cause` carries
the chain of causes, each as short (`sdserve client --verbose` prints it). Tracebacks stay in the
server log. Unexpected exceptions of the server's own code keep the generic message: their text
may hold anything the server knows (another tenant's names, say).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from sdserve.api.convert import Malformed, check_parsed
from sdserve.errors import CAUSE_METADATA_KEY, SdserveError

log = logging.getLogger("sdserve.server")

STATUS_CODES: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "CANCELLED": grpc.StatusCode.CANCELLED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}
INTERNAL_MESSAGE = "internal error; the server log has details"
CAUSE_CHARS = 200  # of one cause; a tensor shape mismatch fits, a dumped tensor does not
MAX_CAUSES = 4

# A word holding a slash or backslash is a path (or a URL); hex numbers of 6+ digits are memory
# addresses; IPv4 addresses with their port. Each becomes a placeholder in what clients read.
_SCRUB = (
    (re.compile(r"""[^\s'"(),;\[\]]*[/\\][^\s'"(),;\[\]]*"""), "<path>"),
    (re.compile(r"\b0x[0-9a-fA-F]{6,}\b"), "<address>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<address>"),
)

# Called with (method name, status code name) once per finished call, for metrics.
Outcome = Callable[[str, str], None]

T = TypeVar("T")


def code_of(error: SdserveError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


def short_cause(error: BaseException) -> str:
    """`Type: first line of the message`, at most CAUSE_CHARS, no paths or addresses."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    for pattern, placeholder in _SCRUB:
        text = pattern.sub(placeholder, text)
    if len(text) > CAUSE_CHARS:
        text = text[: CAUSE_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def cause_chain(error: BaseException) -> list[str]:
    """The short form of `error` and of each exception behind it (`raise ... from`, or raised
    while handling), outermost first, at most MAX_CAUSES."""
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(chain) < MAX_CAUSES:
        seen.add(id(current))
        chain.append(short_cause(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


async def _abort(context: grpc.aio.ServicerContext, method: str, error: BaseException, outcome: Outcome) -> None:
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(error, SdserveError):
        code, message = code_of(error), str(error)
        cause = error.__cause__
        if error.status == "INTERNAL" and cause is not None:
            # The engine's failure of this request's own model work: the client learns what broke.
            message = f"{message}: {short_cause(cause)}"
            trailers = ((CAUSE_METADATA_KEY, " <- ".join(cause_chain(cause))),)
        if error.status == "INTERNAL" and not error.logged:  # the operator needs the trace
            log.error("%s failed: %s", method, message, exc_info=cause or error)
    else:
        log.error("%s failed", method, exc_info=error)
        code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    outcome(method, code.name)
    await context.abort(code, message, trailing_metadata=trailers)


def _outcome_of(servicer: Any) -> Outcome:
    return getattr(servicer, "outcome", None) or (lambda method, code: None)


def unary_method(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate a unary or stream-in handler `async def f(self, request, context)`; the servicer's
    `outcome(method, code)` (if any) hears how each call ended."""
    method = handler.__name__

    @functools.wraps(handler)
    async def run(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        outcome = _outcome_of(self)
        try:
            _refuse_malformed(self, request, context)
            response = await handler(self, request, context)
        except asyncio.CancelledError:
            outcome(method, "CANCELLED")
            raise
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, method, exc, outcome)
            raise AssertionError("unreachable: context.abort raises") from None
        outcome(method, "OK")
        return response

    return run


def stream_method(handler: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """Decorate a server-streaming handler `async def f(self, request, context)` that yields."""
    method = handler.__name__

    @functools.wraps(handler)
    async def run(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        outcome = _outcome_of(self)
        try:
            _refuse_malformed(self, request, context)
            async for item in handler(self, request, context):
                yield item
        except asyncio.CancelledError:
            outcome(method, "CANCELLED")
            raise
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, method, exc, outcome)
            return
        outcome(method, "OK")

    return run


def _refuse_malformed(servicer: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
    """A request that did not parse is refused with INVALID_ARGUMENT, after authentication:
    an unauthenticated caller hears UNAUTHENTICATED whatever it sent."""
    if isinstance(request, Malformed):
        core = getattr(servicer, "core", None)
        if core is not None:
            core.begin(context)
        check_parsed(request)


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises AbortError to unwind the handler; it already set the status.
    return isinstance(exc, grpc.aio.AbortError)
