"""The typed errors of sdserve, one small hierarchy shared by every package.

Each class names the gRPC status it maps to (the mapping itself lives in `sdserve.server`).
Messages say what was wrong with the input and never carry paths, addresses or stack traces
of the server; `field` names the offending request field where there is one.

This module is a leaf: it imports nothing of sdserve, so every package (adapters included)
may raise these errors without breaking the one-way import rule.
"""

from __future__ import annotations

from typing import ClassVar

# gRPC trailing metadata of an INTERNAL status whose cause the server tells (server/status.py):
# the chain of causes, each "Type: message" without paths; `sdserve.client.cause_of` reads it.
CAUSE_METADATA_KEY = "sdserve-cause"


class SdserveError(Exception):
    """Base of every error sdserve raises on purpose."""

    status: ClassVar[str] = "INTERNAL"
    logged = False
    """Set when the server has logged this error with its request and trace, so the status
    mapping (server/status.py) does not log it again."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field and not self.message.startswith(self.field):
            return f"{self.field}: {self.message}"
        return self.message


class InvalidArgument(SdserveError):
    """The request (or an uploaded file) breaks a rule; the message names the field and the rule."""

    status = "INVALID_ARGUMENT"


class NotFound(SdserveError):
    status = "NOT_FOUND"


class PermissionDenied(SdserveError):
    status = "PERMISSION_DENIED"


class Unauthenticated(SdserveError):
    status = "UNAUTHENTICATED"


class ResourceExhausted(SdserveError):
    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(SdserveError):
    status = "DEADLINE_EXCEEDED"


class Cancelled(SdserveError):
    status = "CANCELLED"


class Unavailable(SdserveError):
    status = "UNAVAILABLE"


class Internal(SdserveError):
    status = "INTERNAL"


class AdapterError(InvalidArgument):
    """An adapter file is unusable: the message names the file (by its given name) and the problem."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"adapter {name!r}: {problem}", field="adapters")
        self.adapter_name = name
        self.problem = problem

    def renamed(self, name: str) -> AdapterError:
        """The same problem, told about the file as another request named it."""
        return AdapterError(name, self.problem)


class UnsupportedAdapterKind(AdapterError):
    """A known adapter kind that this version does not serve yet (kohya diff, LyCORIS kinds other
    than LoHa and LoKr, DoRA on a LoHa/LoKr module; DoRA on LoRA pairs is served)."""

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(name, f"adapter kind {kind!r} is not supported yet")
        self.kind = kind

    def renamed(self, name: str) -> UnsupportedAdapterKind:
        return UnsupportedAdapterKind(name, self.kind)
