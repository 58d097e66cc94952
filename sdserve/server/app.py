"""The server process: build the pieces, serve, and drain on SIGTERM.

Start-up loads every configured model (so the first request does not pay for it), starts the
engine thread, the gRPC server (sdserve.v1 services, grpc.health.v1, reflection) and the
metrics endpoint. Shutdown drains: health turns NOT_SERVING, new sdserve.v1 calls get
UNAVAILABLE, running and queued requests get `grace_seconds` to finish; what is left is
cancelled, then the gRPC server and the engine thread stop.

If the engine thread dies (a bug), nothing can compute any more: health turns NOT_SERVING,
every call the engine held or would get ends with UNAVAILABLE at once (there is nothing to
drain), the server stops and `serve` returns EXIT_ENGINE_DIED, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from sdserve.api import convert
from sdserve.engine import Engine, EngineEvent, ModelStore
from sdserve.engine.loop import EngineThread
from sdserve.engine.png import warm_up
from sdserve.errors import InvalidArgument, NotFound, Unavailable
from sdserve.paths import cache_root
from sdserve.server.adapters_service import AdaptersService, ModelsService
from sdserve.server.admission import Admission
from sdserve.server.auth import Authenticator
from sdserve.server.config import Config, ServerConfig
from sdserve.server.core import Core
from sdserve.server.generation import GenerationService
from sdserve.server.http_gateway import HttpGateway
from sdserve.server.metrics import Metrics
from sdserve.server.registry import Registry
from sdserve.server.tls import describe as describe_transport
from sdserve.server.tls import server_credentials
from sdserve.server.tracing import make_tracer
from sdserve.server.variants import VariantRouter, load_variants

log = logging.getLogger("sdserve.server")

EXIT_ENGINE_DIED = 70  # sysexits' EX_SOFTWARE: an internal error, not bad input or config


def data_dir(config: Config) -> Path:
    if config.registry.data_dir:
        return Path(config.registry.data_dir).expanduser()
    return cache_root() / "server"


class Server:
    def __init__(self, config: Config, engine: Engine | None = None) -> None:
        self.config = config
        if engine is None:
            store = ModelStore(config.engine, default_model=config.models.default_model, vaes=config.models.vae)
            engine = Engine(config.engine, models=store)
        self.engine = engine
        # TLS files are read and checked first: a bad one fails start-up before any model loads.
        self._credentials = server_credentials(config.server)
        # Clients name ControlNet and IP-Adapter models; only the operator's configured ones
        # resolve, never a directory a request names.
        engine.serve_conditioning_models(config.models.controlnets, config.models.ip_adapters)
        self.metrics = Metrics(tenant_labels=config.server.metrics_tenant_labels)
        # None unless [server] tracing is on; a missing `otel` extra fails start-up here, before models load.
        self.tracer = make_tracer(config.server.tracing, config.server.otlp_endpoint,
                                  tenant_attribute=config.server.metrics_tenant_labels)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self.http: HttpGateway | None = None  # the HTTP/JSON gateway, with [server] http_port
        self.core: Core | None = None
        self.adapters_service: AdaptersService | None = None
        self._grpc: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self.engine_failure: BaseException | None = None  # why the engine thread died, if it did
        self._engine_watcher: asyncio.Task | None = None

    async def start(self) -> None:
        config = self.config
        served = {}
        names = list(dict.fromkeys((config.models.default_model, *config.models.serve)))
        # A configured ControlNet / IP-Adapter that fits none of them is refused before any weights load.
        self.engine.check_conditioning_models([self.engine.model_info(name) for name in names])
        for name in names:
            info = self.engine.model_info(name)
            log.info("loading model %r (%s)", name, info.family)
            await asyncio.to_thread(self.engine.load_model, name)  # weights load once, before serving
            served[name] = info
        eager = list(served)
        variants = await asyncio.to_thread(self._load_variants, served)
        engine_thread = EngineThread(self.engine)
        # The engine thread dies on its own thread; the watcher hears it on this loop.
        loop, engine_died = asyncio.get_running_loop(), asyncio.Event()
        engine_thread.death_hooks.append(lambda _exc: _call_soon(loop, engine_died.set))
        engine_thread.start()
        self.engine.observers.append(self.metrics.on_engine_event)
        engine_thread.step_hooks.append(self.metrics.on_step)
        if self.tracer is not None:
            self.engine.observers.append(self.tracer.on_engine_event)
            engine_thread.step_hooks.append(self.tracer.on_step)
        self.metrics.watch_adapters(lambda: self.engine.residency_stats(eager))
        self.core = Core(
            config=config,
            engine=self.engine,
            engine_thread=engine_thread,
            admission=Admission(config.admission),
            registry=Registry(data_dir(config)),
            auth=Authenticator(config.tenants),
            metrics=self.metrics,
            served=served,
            default_model=config.models.default_model,
            variants=variants,
        )
        for name in served:  # what uploads are validated against, read before any request wraps layers
            await asyncio.to_thread(self.core.model_targets, name)
        # The response path's first-use imports, here rather than under the first requests.
        await asyncio.to_thread(warm_up, [info.path for info in served.values()])
        server = grpc.aio.server(options=grpc_options(config.server))
        self.adapters_service = AdaptersService(self.core)
        convert.add_services(server, GenerationService(self.core, self.tracer), self.adapters_service, ModelsService(self.core))
        health_pb2_grpc_add(self.health, server)
        reflection.enable_server_reflection((*convert.SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{config.server.host}:{config.server.port}"
        if self._credentials is not None:
            self.port = server.add_secure_port(address, self._credentials)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {config.server.host}:{config.server.port}")
        if config.server.http_port is not None:
            self.http = HttpGateway(config, server)  # binds its private gRPC socket: before start()
        await server.start()
        self._grpc = server
        for name in ("", *convert.SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._engine_watcher = asyncio.create_task(self._watch_engine(engine_died), name="sdserve-engine-watcher")
        if self.http is not None:
            await asyncio.to_thread(self.http.start)
        if config.server.metrics_port is not None:
            self.metrics_port = self.metrics.serve(
                config.server.metrics_host, config.server.metrics_port, config.server.metrics_token_sha256
            )

    def _load_variants(self, served: dict) -> VariantRouter:
        """Read and check every [[variants]] entry, load its directory's weights, and add the
        models served only compiled to `served` (their base weights are never loaded)."""
        bases = {}
        for index, variant in enumerate(self.config.variants):
            try:
                bases[variant.model] = served.get(variant.model) or self.engine.model_info(variant.model)
            except NotFound:
                raise InvalidArgument(f"variants[{index}].model: unknown model {variant.model!r}") from None
        router = load_variants(self.config.variants, {m: info.path for m, info in bases.items()}, served)
        for variant in router.variants:
            log.info("loading variant %r of %r (%s)", variant.name, variant.model, variant.backend)
            self.engine.load_model(variant.engine_model)
        for model in router.compiled_only:
            served[model] = bases[model]
        return router

    async def _watch_engine(self, died: asyncio.Event) -> None:
        """Wait until the engine thread dies or the server stops; on a death, stop serving."""
        waits = [asyncio.ensure_future(died.wait()), asyncio.ensure_future(self._stopped.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if died.is_set():
            await self._engine_died()

    async def _engine_died(self) -> None:
        """No drain: the engine is gone, so no queued or running request can ever finish.
        The engine thread logged the cause with its trace; this says what the server does."""
        core = self.core
        assert core is not None
        self.engine_failure = core.engine_thread.failure or RuntimeError("the engine thread ended")
        was_draining = core.draining
        core.draining = True  # calls being validated now are refused before they reach the engine
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        log.critical("the engine stopped: health NOT_SERVING, ending %d call(s) with UNAVAILABLE, shutting down",
                     len(core.jobs))
        reason = Unavailable("the engine stopped; retry on another replica")
        for job in list(core.jobs.values()):
            job.cut(reason)  # still queued for admission: withdrawn, its caller hears `reason`
        for request_id, job in list(core.jobs.items()):
            # Released to the engine: the error event the engine would have sent never comes.
            job.listener(EngineEvent("error", request_id, error=reason))
        deadline = time.monotonic() + 2.0  # let the handlers tell their callers why
        while core.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not was_draining:  # a drain under way stops the server itself, its jobs now ended
            await self.stop()

    async def drain(self, grace: float | None = None) -> None:
        """Stop taking work, let running requests finish within `grace` seconds, then stop."""
        core = self.core
        if core is None or core.draining:
            return
        grace = self.config.server.grace_seconds if grace is None else grace
        core.draining = True
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        log.info("draining: %d request(s) running or queued, grace %.0f s", len(core.jobs), grace)
        deadline = time.monotonic() + grace
        while core.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if core.jobs:
            log.warning("grace period over: ending %d request(s) with UNAVAILABLE", len(core.jobs))
            cut = Unavailable("the server shut down before this request finished; retry on another replica")
            for job in list(core.jobs.values()):
                job.cut(cut)
            # Let the handlers tell their callers why before the gRPC server stops.
            deadline = time.monotonic() + 2.0
            while core.jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        await self.stop()

    async def stop(self) -> None:
        if self.http is not None:
            await asyncio.to_thread(self.http.stop)  # its relayed calls end with the gRPC server's
            self.http = None
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
            self._grpc = None
        if self.adapters_service is not None:
            self.adapters_service.close()  # validation workers
        if self.core is not None:
            await asyncio.to_thread(self.core.engine_thread.stop)
            self.core.registry.close()
        self.metrics.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # flushes the spans still batched (export may wait)
        self._stopped.set()
        watcher, self._engine_watcher = self._engine_watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            await watcher  # it returns on _stopped; awaited so no loop closes under it

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments that bound what one peer can hold: message sizes, streams per
    connection, how long dead or idle connections and old connections live."""
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    return [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.keepalive_time_ms", ms(config.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_seconds)),
        ("grpc.max_connection_idle_ms", ms(config.max_connection_idle_seconds)),
        ("grpc.max_connection_age_ms", ms(config.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", ms(config.max_connection_age_grace_seconds)),
        # Clients' keepalive pings are welcome, but not more often than every 10 s.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """`callback` on `loop` from another thread; nothing if the loop is closed (server gone)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def health_pb2_grpc_add(servicer: health.aio.HealthServicer, server: grpc.aio.Server) -> None:
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def describe_access(config: Config) -> str:
    tenants = config.tenants
    if len(tenants) == 1 and not tenants[0].key_sha256:
        return f"one tenant {tenants[0].name!r} with no API key: anyone who can reach the port can call it"
    keyed = sum(1 for t in tenants if t.key_sha256)
    text = f"{len(tenants)} tenant(s), {keyed} with API keys (authorization: Bearer <key>)"
    if config.open_access:
        text += "; calls without a key act as the keyless tenant"
    return text


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT, then drain; -> the process's exit status (0, or
    EXIT_ENGINE_DIED when the engine thread died)."""
    logging.basicConfig(
        level=getattr(logging, config.server.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log.info(
        "sdserve: starting on %s:%d (%s), model %r, %s",
        config.server.host,
        config.server.port,
        describe_transport(config.server),
        config.models.default_model,
        describe_access(config),
    )
    if not config.server.tls_cert and any(t.key_sha256 for t in config.tenants) and not _loopback(config.server.host):
        log.warning("sdserve: API keys will cross the network readable: set [server] tls_cert and tls_key")
    server = Server(config)
    await server.start()
    log.info("sdserve: serving %s on %s:%d (pid %d)", ", ".join(server.core.served), config.server.host, server.port, os.getpid())
    if server.http is not None:
        log.info("sdserve: HTTP/JSON gateway and playground on %s://%s:%d/", server.http.scheme,
                 config.server.http_host or config.server.host, server.http.port)
    if server.metrics_port is not None:
        log.info("sdserve: metrics on http://%s:%d/metrics%s", config.server.metrics_host, server.metrics_port,
                 " (bearer token required)" if config.server.metrics_token_sha256 else "")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(server.drain()))
    await server.wait_stopped()
    if server.engine_failure is not None:
        log.critical("sdserve: stopped because the engine died (exit status %d)", EXIT_ENGINE_DIED)
        return EXIT_ENGINE_DIED
    log.info("sdserve: stopped")
    return 0
