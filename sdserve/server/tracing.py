"""OpenTelemetry traces of Generate calls (issue 23 item 9), behind the `otel` extra.

With `[server] tracing = "console" | "otlp"`, each Generate / GenerateStream call becomes one span
tree, recorded when the call ends from the timestamps the request log line already has:

    sdserve.request            arrival -> call end (SERVER kind; model, adapters by digest, steps, status)
      admission                arrival -> the engine admits it into a batch (validation + fair queue)
      adapter_load             only when its adapters were cold: waiting for them to load
      denoise                  the engine's steps; one event "step" per UNet call it took part in
                               (step index, rows of the whole batch that call ran)
      decode                   VAE decode of its latents

The spans are made after the fact with explicit start/end times, so nothing is threaded through
the engine's loop: the engine thread only appends (step, time, batch rows) per running request,
one tuple per step, via an engine observer and a step hook (as metrics.py counts UNet rows). One
event per step, not one span, keeps 50 steps x many requests cheap to record and to export.
An incoming W3C `traceparent` (gRPC metadata) makes the request span a child of the caller's trace.

With tracing "off" (the default) the server makes no tracer, and this module imports nothing of
opentelemetry: the import happens in `make_tracer` only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sdserve.errors import InvalidArgument
from sdserve.server.request_log import RequestLog

if TYPE_CHECKING:
    from sdserve.engine import EngineEvent

MODES = ("off", "console", "otlp")
EXTRA_HINT = "pip install 'sdserve[otel]'"


def make_tracer(mode: str, otlp_endpoint: str = "", tenant_attribute: bool = False) -> RequestTracer | None:
    """The server's tracer for `[server] tracing` (None when off). Exporters batch in the background;
    the OTLP exporter reads the standard OTEL_EXPORTER_OTLP_* variables for what is not configured."""
    if mode == "off":
        return None
    if mode not in MODES:
        raise InvalidArgument(f"[server] tracing must be one of {', '.join(MODES)}, not {mode!r}")
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise InvalidArgument(f"[server] tracing = {mode!r} needs OpenTelemetry: {EXTRA_HINT}") from None
    if mode == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise InvalidArgument(
                f"[server] tracing = 'otlp' needs the OTLP exporter: {EXTRA_HINT}") from None
        exporter = OTLPSpanExporter(endpoint=otlp_endpoint) if otlp_endpoint else OTLPSpanExporter()
    # Resource.create reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; "sdserve" unless they say otherwise.
    provider = TracerProvider(resource=Resource.create({"service.name": "sdserve"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return RequestTracer(provider, tenant_attribute=tenant_attribute)


class RequestTracer:
    """Records each call's span tree when the call ends. `provider`: an SDK TracerProvider
    (tests pass one with an in-memory exporter). Not the global provider: sdserve's spans go to
    the exporter its config names, whatever else the process has set up."""

    def __init__(self, provider: Any, tenant_attribute: bool = False) -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self.tracer = provider.get_tracer("sdserve.server")
        self.tenant_attribute = tenant_attribute  # tenant names only where metrics may carry them
        self._trace = trace
        self._propagate = propagate
        # Engine-thread bookkeeping. Dict and list operations are atomic under the GIL; the loop
        # only adds (track) and removes (record) whole entries.
        self._rows: dict[str, int] = {}  # request id -> its rows (images), while running
        self._steps: dict[str, list[tuple[int, float, int]]] = {}  # request id -> (step, time, batch rows)
        self._this_step: list[tuple[str, int]] = []  # (request id, step index) of the UNet call under way
        self._step_time: float | None = None

    # -- engine thread -----------------------------------------------------------------------

    def track(self, request_id: str, rows: int) -> None:
        """The call was admitted (on the loop): its steps will be recorded."""
        self._rows[request_id] = rows
        self._steps[request_id] = []

    def on_engine_event(self, event: EngineEvent) -> None:
        """An engine observer: every step event of one engine step comes right after its UNet call,
        before any "done" of that step (decode follows the step events)."""
        if event.kind == "step":
            if self._step_time is None:
                self._step_time = time.monotonic()
            self._this_step.append((event.request_id, event.step))
        elif event.kind in ("done", "error"):
            # The call may end (and `record` run) as soon as the loop hears this: the step's
            # events must be in before, not at the step hook, which runs after decode.
            self._flush()

    def on_step(self, elapsed: float) -> None:
        """An EngineThread step hook: the step (UNet call, and decode if any) is over."""
        self._flush()

    def _flush(self) -> None:
        """The engine step's step events are all in: record them with the step's batch rows."""
        stepped, self._this_step = self._this_step, []
        at, self._step_time = self._step_time, None
        if not stepped or at is None:
            return
        batch_rows = sum(self._rows.get(request_id, 0) for request_id, _ in stepped)
        for request_id, step in stepped:
            steps = self._steps.get(request_id)
            if steps is not None:  # None: not traced, or its call already ended
                steps.append((step, at, batch_rows))

    # -- event loop --------------------------------------------------------------------------

    def parent_context(self, context: Any) -> Any:
        """The caller's trace from its gRPC metadata (`traceparent`, W3C), or None."""
        metadata = getattr(context, "invocation_metadata", None)
        carrier = {key.lower(): value for key, value in (metadata() or ())} if metadata is not None else {}
        if "traceparent" not in carrier:
            return None
        return self._propagate.extract(carrier)

    def record(self, entry: RequestLog, status: str, parent: Any, ended: float) -> None:
        """Make the call's spans from its log entry (monotonic seconds) and drop its step records."""
        recorded = self._steps.pop(entry.request_id, None) if entry.request_id else None
        self._rows.pop(entry.request_id, None)
        steps = list(recorded or ())  # a copy: a step of a cancelled request may still land
        # Monotonic seconds -> the epoch nanoseconds spans carry (one offset per call: no drift).
        offset_ns = time.time_ns() - time.monotonic_ns()

        def ns(monotonic: float) -> int:
            return int(monotonic * 1e9) + offset_ns

        trace = self._trace
        attributes: dict[str, Any] = {
            "sdserve.method": entry.method, "sdserve.model": entry.model, "sdserve.adapters": entry.adapters,
            "sdserve.status": status, "sdserve.backend": entry.backend, "sdserve.request_id": entry.request_id,
        }
        if entry.steps is not None:
            attributes["sdserve.steps"] = entry.steps
        if entry.variant:
            attributes["sdserve.variant"] = entry.variant
        if self.tenant_attribute and entry.tenant:
            attributes["sdserve.tenant"] = entry.tenant
        root = self.tracer.start_span("sdserve.request", context=parent, kind=trace.SpanKind.SERVER,
                                      attributes=attributes, start_time=ns(entry.arrived))
        if status != "OK":
            root.set_status(trace.Status(trace.StatusCode.ERROR, status))
        inside = trace.set_span_in_context(root)
        timings = entry.timings
        cursor = entry.arrived  # each phase starts where the one before ended (request_log's durations)
        for phase in ("queue", "adapter_load", "denoise", "decode"):
            seconds = timings.get(phase)
            if seconds is None or (phase == "adapter_load" and seconds <= 0):
                continue
            name = "admission" if phase == "queue" else phase
            span = self.tracer.start_span(name, context=inside, start_time=ns(cursor))
            if phase == "denoise":
                for step, at, batch_rows in steps:
                    span.add_event("step", {"sdserve.step": step, "sdserve.batch_rows": batch_rows},
                                   timestamp=ns(at))
            cursor += max(seconds, 0.0)
            span.end(end_time=ns(min(cursor, ended)))
        root.end(end_time=ns(ended))

    def shutdown(self) -> None:
        """Flush what the batch processor holds (server stop; a second call does nothing)."""
        provider, self.provider = self.provider, None
        if provider is not None:
            provider.shutdown()
