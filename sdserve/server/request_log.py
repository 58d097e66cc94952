"""The one structured log line of each Generate call (issue 23 item 9).

Every Generate / GenerateStream call, whatever its outcome (served, refused by admission, invalid,
failed in the engine, cancelled by its caller), ends in exactly one INFO record on the logger
`sdserve.requests`, whose message is one JSON object:

    {"event":"request","method":"Generate","request_id":"9f0c...","tenant":"alice","model":"tiny-sd1",
     "adapters":["3fa9c1d2e4b5"],"steps":20,"backend":"eager","variant":"","status":"OK",
     "queue_s":0.012,"adapter_load_s":0.0,"denoise_s":0.41,"decode_s":0.03,"total_s":0.47}

Fields not reached before the call ended are empty ("" / [] / null): a refused call has no
request id, a call that never reached the engine no phase times. `adapters` are the first 12 hex
digits of the sha256 of each LoRA, embedding and hypernetwork file the request used (digests, not
names: names are per tenant and chosen by users). A separate logger so operators can route the
lines (e.g. to a JSON sink) without the server's other INFO messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from sdserve.errors import SdserveError

log = logging.getLogger("sdserve.requests")

DIGEST_CHARS = 12
PHASES = ("queue", "adapter_load", "denoise", "decode")


def status_of(error: BaseException | None) -> str:
    """The gRPC status name the caller hears for `error` (status.py's mapping, by name)."""
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"  # the caller went away (or the stream was closed under the handler)
    if isinstance(error, SdserveError):
        return error.status
    return "INTERNAL"


@dataclass
class RequestLog:
    """What is known of one call so far; filled in as the call goes, emitted once at its end."""

    method: str
    arrived: float  # time.monotonic() at arrival
    request_id: str = ""
    tenant: str = ""
    model: str = ""
    adapters: list[str] = field(default_factory=list)  # short sha256 digests, stack order
    steps: int | None = None
    backend: str = ""
    variant: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds by phase (PHASES)
    emitted: bool = False

    def use_digests(self, digests: list[str]) -> None:
        self.adapters = [digest[:DIGEST_CHARS] for digest in digests]

    def fields(self, status: str) -> dict:
        record: dict = {"event": "request", "method": self.method, "request_id": self.request_id,
                        "tenant": self.tenant, "model": self.model, "adapters": self.adapters,
                        "steps": self.steps, "backend": self.backend, "variant": self.variant, "status": status}
        for phase in PHASES:
            value = self.timings.get(phase)
            record[f"{phase}_s"] = round(value, 4) if value is not None else None
        record["total_s"] = round(time.monotonic() - self.arrived, 4)
        return record

    def emit(self, error: BaseException | None) -> None:
        """Log the call's line (once; a second call is ignored)."""
        if self.emitted:
            return
        self.emitted = True
        if log.isEnabledFor(logging.INFO):
            log.info(json.dumps(self.fields(status_of(error)), separators=(",", ":")))
