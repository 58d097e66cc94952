"""The ImageGeneration service: Generate and GenerateStream.

A call's path: authenticate, convert from pb, map adapter names to the registry's files,
validate against the model (cheap, no weights), admit by cost (or refuse at once), wait in the
fair queue, run on the engine thread, encode PNGs off the event loop, convert back.

The engine calls a Job's listener on the engine thread; the Job hops each event to the event
loop with call_soon_threadsafe, so everything else here runs on the loop (one owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sdserve.api import convert
from sdserve.api.types import AdapterSpec
from sdserve.engine import EngineEvent, GenerationResult, RequestSpec
from sdserve.engine.png import encode_png
from sdserve.engine.prompt_syntax import A1111, extract_lora_tags
from sdserve.engine.request import EngineRequest
from sdserve.errors import InvalidArgument, ResourceExhausted, SdserveError, Unavailable
from sdserve.server import status
from sdserve.server.admission import Hold, Ticket, estimated_cost
from sdserve.server.conditioning import UploadedConditioning
from sdserve.server.config import TenantConfig
from sdserve.server.core import Core, priority_of
from sdserve.server.request_log import RequestLog, status_of
from sdserve.server.tracing import RequestTracer
from sdserve.server.variants import EAGER, Variant

log = logging.getLogger("sdserve.server")

# Request fields whose entries name adapter files, and the registry kind each must be.
NAMED_FILE_FIELDS = (("adapters", "lora"), ("embeddings", "embedding"), ("hypernetworks", "hypernetwork"))


class Job:
    """One Generate call from admission until the call ends.

    Its ticket counts against the tenant until the response is delivered or the call ends
    (`call_ended`, the call's done callback), not only until the engine is done with it: a
    response nobody reads holds its images in memory, so unread calls must hit the tenant's
    bound like running ones do.
    """

    def __init__(self, core: Core, loop: asyncio.AbstractEventLoop, arrived: float) -> None:
        self.core = core
        self.loop = loop
        self.arrived = arrived
        self.events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.ticket: Ticket | None = None
        self.released_at: float | None = None
        self.ended = False  # the call is over (delivered, cancelled, failed)
        self.cancelling = False  # the engine was asked to drop the request
        self.cut_off: SdserveError | None = None  # why the server ended the request itself

    def release(self, ticket: Ticket) -> None:
        """Admission's callback (on the loop): hand the request to the engine thread."""
        self.released_at = time.monotonic()
        self.core.metrics.track_rows(ticket.request.request_id, ticket.request.rows)
        self.core.engine_thread.submit(ticket.request, self.listener)

    def listener(self, event: EngineEvent) -> None:
        """Runs on the engine thread."""
        # A closed loop means the server is gone and nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._on_event, event)

    def _on_event(self, event: EngineEvent) -> None:
        ticket = self.ticket
        if event.kind in ("done", "error") and ticket is not None:
            if event.kind == "done" and not self.ended:
                self.core.admission.computed(ticket)  # engine room freed; the tenant's share is not
            else:
                self.core.admission.finish(ticket)
            self.core.jobs.pop(event.request_id, None)
            self.gauges()
        self.events.put_nowait(event)

    def gauges(self) -> None:
        self.core.metrics.pending_cost.set(self.core.admission.pending_cost)
        self.core.metrics.inflight_cost.set(self.core.admission.inflight_cost)

    def abandon(self) -> None:
        """The caller went away (cancelled, deadline): free the request's queue slot or rows.
        A request already computed keeps its ticket until the call ends (`call_ended`)."""
        ticket = self.ticket
        if ticket is None or ticket.finished or ticket.computed or self.cancelling:
            return
        if not self.core.admission.withdraw(ticket):
            self.cancelling = True  # once: the engine's error event finishes the ticket
            self.core.engine_thread.cancel(ticket.request.request_id)
        else:
            self.core.jobs.pop(ticket.request.request_id, None)
            self.gauges()
            if self.cut_off is not None:  # the handler waits on events: wake it with the reason
                self.events.put_nowait(EngineEvent("error", ticket.request.request_id, error=self.cut_off))

    def cut(self, reason: SdserveError) -> None:
        """The server ends the request (drain grace over): the caller hears `reason`."""
        self.cut_off = reason
        self.abandon()

    def call_ended(self) -> None:
        """The call's done callback: the response was delivered, or the call ended without it."""
        self.ended = True
        ticket = self.ticket
        if ticket is None or ticket.finished:
            return
        if ticket.computed:
            self.core.admission.finish(ticket)
            self.gauges()
        else:
            self.abandon()  # still queued or running: the engine's error event finishes it


class GenerationService:
    def __init__(self, core: Core, tracer: RequestTracer | None = None) -> None:
        self.core = core
        self.outcome = core.metrics.outcome
        self.tracer = tracer  # None: tracing off, no span is made (tracing.py)
        self.conditioning = UploadedConditioning(core.registry, core.engine)

    @status.unary_method
    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        result = None
        async for event in self._run(request, context, stream=False):
            result = event
        return result

    @status.stream_method
    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for event in self._run(request, context, stream=True):
            yield event

    async def _run(self, request_pb: Any, context: grpc.aio.ServicerContext, stream: bool) -> AsyncIterator[Any]:
        """One call, ending in its one structured log line (request_log.py) however it ends, and
        with tracing on, its span tree (tracing.py), made from the same entry."""
        entry = RequestLog("GenerateStream" if stream else "Generate", time.monotonic())
        tracer = self.tracer
        parent = tracer.parent_context(context) if tracer is not None else None
        try:
            async for event in self._serve(request_pb, context, stream, entry):
                yield event
        except BaseException as error:
            self._ended(entry, error, parent)
            raise
        self._ended(entry, None, parent)

    def _ended(self, entry: RequestLog, error: BaseException | None, parent: Any) -> None:
        if self.tracer is not None and not entry.emitted:
            try:
                self.tracer.record(entry, status_of(error), parent, time.monotonic())
            except Exception:  # a tracing fault must not fail the call it describes
                log.warning("could not record the trace of request %s", entry.request_id, exc_info=True)
        entry.emit(error)

    async def _serve(self, request_pb: Any, context: grpc.aio.ServicerContext, stream: bool,
                     entry: RequestLog) -> AsyncIterator[Any]:
        core = self.core
        arrived = entry.arrived
        tenant = core.begin(context)
        entry.tenant = tenant.name
        priority = priority_of(context)
        spec = convert.spec_from_pb(request_pb)
        entry.model, entry.steps = spec.model, spec.steps or None
        info = core.model_info(spec.model)
        # The estimated cost is held while the request is validated, so the requests of a burst
        # behind it are refused at arrival. Loaded: refuse what will not fit before spending time
        # on validation. Idle, a request is validated first (nothing is held if it cannot fit),
        # so an invalid one hears what is wrong with it.
        estimate = estimated_cost(spec, info.defaults, info.limits)
        loaded = core.admission.loaded
        try:
            hold = core.admission.hold(estimate, tenant.name, refuse=loaded)
        except ResourceExhausted:
            core.metrics.refused_by(tenant.name)
            raise
        pinned: list[str] = []  # registry files this call uses: kept on disk until it ends
        try:
            spec, tags_from = self._lora_tags(spec)
            spec, used = self._resolve_adapters(tenant, spec, info.name, info.family, pinned, tags_from)
            if spec.controlnets or spec.ip_adapters:
                # Uploaded ControlNets / IP-Adapters by name (server/conditioning.py); a first use
                # unpacks the file, so on a worker thread.
                spec, conditioning_used, pending = self.conditioning.resolve(tenant.name, spec, info.name,
                                                                             info.family, pinned)
                used += conditioning_used
                if pending:
                    await asyncio.to_thread(self.conditioning.make_servable, pending)
            entry.use_digests([use.sha256 for use in used])
            # A stack a compiled variant holds runs on it (stack dropped: it is in the weights).
            routed, variant = core.variants.route(info.name, spec)
            remaining = context.time_remaining()
            deadline = arrived + remaining if remaining is not None else None
            request_id = uuid.uuid4().hex[:16]
            entry.request_id = request_id
            # Validation builds a noise scheduler and may decode images or read embedding files: on a
            # worker thread, so the event loop keeps refusing, cancelling and answering meanwhile.
            validate = functools.partial(core.engine.validate, request_id=request_id, tenant=tenant.name,
                                         deadline=deadline)
            try:
                engine_request = await asyncio.to_thread(validate, routed)
            except InvalidArgument as error:
                if variant is None:
                    raise
                if info.name in core.variants.compiled_only:
                    # The engine names its model, here a server directory: the caller hears its own name.
                    raise InvalidArgument(error.message.replace(variant.engine_model, info.name),
                                          field=error.field) from None
                # The variant's backend refuses what the eager base serves (e.g. a ControlNet unit
                # on an ONNX variant): the request runs eagerly, as if no variant matched.
                variant = None
                engine_request = await asyncio.to_thread(validate, spec)
            # A model served directly as an ONNX export runs on onnxruntime without any variant.
            backend = variant.backend if variant is not None else (info.backend or EAGER)
            served_by = (info.name, variant, backend)
            entry.steps = engine_request.steps
            entry.backend = backend
            entry.variant = variant.name if variant is not None else ""
            async for event in self._admitted(context, stream, tenant, priority, engine_request, arrived, used,
                                              served_by, entry, hold):
                yield event
        finally:
            core.admission.drop(hold)
            for sha256 in pinned:
                core.registry.unpin(sha256)

    async def _admitted(
        self, context: grpc.aio.ServicerContext, stream: bool, tenant: TenantConfig, priority: int,
        engine_request: EngineRequest, arrived: float, used: list[convert.AdapterUse],
        served_by: tuple[str, Variant | None, str], entry: RequestLog, hold: Hold | None,
    ) -> AsyncIterator[Any]:
        """Admit a validated request, then relay its engine events to the caller."""
        core = self.core
        request_id = engine_request.request_id
        if core.draining:  # the drain began while this request was being validated
            raise Unavailable("the server is shutting down; retry shortly or on another replica")
        job = Job(core, asyncio.get_running_loop(), arrived)
        if self.tracer is not None:  # before admission, which may hand it to the engine at once
            self.tracer.track(request_id, engine_request.rows)
        try:
            job.ticket = core.admission.admit(engine_request, tenant.name, job.release, priority, hold)
        except ResourceExhausted:
            core.metrics.refused_by(tenant.name)
            raise
        core.jobs[request_id] = job
        context.add_done_callback(lambda _context: job.call_ended())
        job.gauges()
        log.debug("request %s from %s admitted (cost %d)", request_id, tenant.name, job.ticket.cost)
        try:
            if stream:
                yield convert.queued_event(request_id, core.admission.queued + core.admission.running - 1)
            while True:
                event = await job.events.get()
                if event.kind == "step":
                    if stream:
                        preview = encode_png(event.preview, "") if event.preview is not None else b""
                        yield convert.progress_event(event.step, event.total_steps, preview)
                elif event.kind == "error":
                    assert event.error is not None
                    error = job.cut_off or event.error
                    if error.status == "INTERNAL":
                        # The one log line of a failed request: which, whose, on what, with the trace
                        # of its cause (the client hears only the cause's short form, status.py).
                        log.error("request %s of tenant %s on model %s failed: %s", request_id, tenant.name,
                                  engine_request.model, error, exc_info=error.__cause__ or error)
                        error.logged = True
                    raise error
                elif event.kind == "done":
                    assert event.result is not None
                    response = await self._response(job, event.result, used, served_by, entry)
                    yield convert.result_event(response) if stream else response
                    return
        finally:
            if "queue" not in entry.timings and job.released_at is not None:
                entry.timings["queue"] = job.released_at - arrived  # failed or cancelled after release
            job.abandon()

    def _lora_tags(self, spec: RequestSpec) -> tuple[RequestSpec, int]:
        """An A1111-syntax prompt's `<lora:NAME:scale>` tags leave the text and join the adapter
        stack after the request's own entries (resolved like them, within the caller's tenant).
        -> (the spec, the stack index where the tags' entries begin)."""
        own = len(spec.adapters)
        syntax = spec.prompt_syntax if spec.prompt_syntax is not None else self.core.engine.config.prompt_syntax
        if syntax != A1111:
            return spec, own  # plain text: a tag is words like any other
        prompt, tags = extract_lora_tags(spec.prompt)
        if not tags:
            return spec, own
        tagged = tuple(AdapterSpec(name=tag.name, scale=tag.scale) for tag in tags)
        return dataclasses.replace(spec, prompt=prompt, adapters=spec.adapters + tagged), own

    def _resolve_adapters(
        self, tenant: TenantConfig, spec: RequestSpec, model: str, family: str, pinned: list[str],
        tags_from: int | None = None,
    ) -> tuple[RequestSpec, list[convert.AdapterUse]]:
        """Registered names -> this server's files, for every request field that names adapter
        files (LoRAs, embeddings, hypernetworks). Clients never name files (ARCHITECTURE rule 8).
        Each file is pinned (appended to `pinned`) so a delete cannot pull it from under the call.
        Stack entries from `tags_from` on came from the prompt's <lora:> tags: errors name "prompt"."""
        changes: dict[str, tuple] = {}
        used: list[convert.AdapterUse] = []
        for field_name, kind in NAMED_FILE_FIELDS:
            entries = getattr(spec, field_name)
            resolved = []
            for index, entry in enumerate(entries):
                where = f"{field_name}[{index}]"
                name_field = f"{where}.name"
                if field_name == "adapters" and tags_from is not None and index >= tags_from:
                    name_field = "prompt"  # a <lora:NAME> tag: the caller wrote it in the prompt
                if entry.path:
                    raise InvalidArgument(
                        "the server does not read client paths; upload the file and give its name",
                        field=f"{where}.path",
                    )
                if not entry.name:
                    raise InvalidArgument(f"must name a registered {kind}", field=f"{where}.name")
                record = self.core.registry.resolve(tenant.name, entry.name, field=name_field, pin=True)
                pinned.append(record.sha256)
                if record.kind != kind:
                    raise InvalidArgument(
                        f"{entry.name!r} is registered as kind {record.kind!r}, not {kind!r}", field=name_field
                    )
                if record.family != family:
                    raise InvalidArgument(
                        f"{kind} {entry.name!r} is for {record.family} models; model {model!r} is {family}",
                        field=name_field,
                    )
                misfit = record.misfit(model)
                if misfit is not None:  # found at upload: refused here, before the engine loads it
                    fits = f"; it fits {', '.join(repr(m) for m in record.fits)}" if record.fits else ""
                    raise InvalidArgument(f"{kind} {entry.name!r} does not fit model {model!r}: {misfit}{fits}",
                                          field=name_field)
                path = str(self.core.registry.blob_path(record.sha256))
                # The digest travels with the file (every kind carries it), so the engine never
                # hashes a registry file and its store finds what it holds by the digest alone.
                resolved.append(dataclasses.replace(entry, path=path, sha256=record.sha256))
                used.append(convert.AdapterUse(entry.name, record.sha256, record.shared, kind))
            if entries:
                changes[field_name] = tuple(resolved)
        return (dataclasses.replace(spec, **changes) if changes else spec), used

    async def _response(self, job: Job, result: GenerationResult, used: list[convert.AdapterUse],
                        served_by: tuple[str, Variant | None, str], entry: RequestLog) -> Any:
        request = result.request
        # PNG encoding is CPU work proportional to pixels: keep it off the event loop.
        images = await asyncio.to_thread(
            lambda: [(encode_png(image, result.parameters(k)), request.width, request.height)
                     for k, image in enumerate(result.images)]
        )
        timings = dict(result.timings)
        released = job.released_at or job.arrived
        timings["queue"] = (released - job.arrived) + timings.get("queue", 0.0)
        timings["total"] = time.monotonic() - job.arrived
        entry.timings = timings
        metrics = self.core.metrics
        # The model as the caller named it (a variant's engine model is a server directory).
        model, variant, backend = served_by
        metrics.served(model, backend, entry.tenant, timings["queue"], timings["total"])
        metrics.served_by(model, backend, variant.name if variant is not None else "")
        return convert.generate_response(request.request_id, model, request.seed, images, timings, used,
                                         backend=backend, variant=variant.name if variant is not None else "")
