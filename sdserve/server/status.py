"""Typed errors -> gRPC status codes: the one place the mapping lives.

Handlers raise `SdserveError`s; the decorators here turn them into a status with the error's
message (which names the field and leaks no internals). Anything else is a bug: it is logged
with its trace on the server and the client gets INTERNAL with a generic message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from sdserve.api.convert import Malformed, check_parsed
from sdserve.errors import SdserveError

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

# Called with (method name, status code name) once per finished call, for metrics.
Outcome = Callable[[str, str], None]

T = TypeVar("T")


def code_of(error: SdserveError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, method: str, error: BaseException, outcome: Outcome) -> None:
    if isinstance(error, SdserveError):
        code, message = code_of(error), str(error)
        if error.status == "INTERNAL":  # the client hears a safe message; the operator needs the cause
            log.error("%s failed: %s", method, message, exc_info=error.__cause__ or error)
    else:
        log.error("%s failed", method, exc_info=error)
        code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    outcome(method, code.name)
    await context.abort(code, message)


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
