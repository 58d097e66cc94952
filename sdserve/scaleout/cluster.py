"""Start (or join) Ray, deploy the engine replicas, and run the single server's front on them.

`sdserve serve --ray` calls `serve_ray`. Without an address it starts a local Ray instance and
shuts it down on exit; with one (`auto`, `ray://head:10001`) it joins that cluster and deletes
only its own Serve application on exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from typing import Any

from sdserve.scaleout.config import RayConfig
from sdserve.scaleout.dispatch import RayDispatcher
from sdserve.scaleout.report import ReplicaCollector
from sdserve.server.app import Server
from sdserve.server.config import AdmissionConfig, Config

log = logging.getLogger("sdserve.scaleout")


def start_ray(ray_config: RayConfig, **local_options: Any) -> bool:
    """Join `ray_config.address`, or start a local instance (-> True: the caller stops it).
    `local_options` go to ray.init for a local instance (tests bound its CPUs and memory)."""
    import ray

    if ray.is_initialized():
        return False
    if ray_config.address:
        ray.init(address=ray_config.address, log_to_driver=True)
        return False
    for attempt in (1, 2):
        try:
            ray.init(include_dashboard=False, **local_options)
            return True
        except Exception as error:  # ray raises a bare Exception when its raylet starts late
            # Ray gives its raylet a fixed 30 s to register; a loaded machine can miss that once.
            if attempt == 2 or "timed out during startup" not in str(error):
                raise
            log.warning("the local Ray instance did not start in time; trying once more")
            ray.shutdown()
    raise AssertionError("unreachable")


def deploy(config: Config, ray_config: RayConfig) -> Any:
    """Deploy `ray_config.replicas` engine replicas; -> the deployment's handle once all run.
    No Ray HTTP or gRPC proxy is started: the sdserve front is the ingress (docs/scaleout.md)."""
    from ray import serve

    from sdserve.scaleout.replica import deployment

    serve.start(proxy_location="Disabled")
    return serve.run(deployment(config, ray_config), name=ray_config.app_name, route_prefix=None)


def undeploy(ray_config: RayConfig, started_ray: bool) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(ray_config.app_name)
        if started_ray:
            serve.shutdown()
    finally:
        if started_ray:
            ray.shutdown()


def cluster_admission(admission: AdmissionConfig, ray_config: RayConfig) -> AdmissionConfig:
    """The front's admission for the whole deployment: `[admission]`'s pending bounds (the
    server's and each tenant's) are the cluster's quotas, held by the one front however many
    replicas run; `max_inflight_cost` is what one engine runs at once, so the front releases
    that much per replica. A pending bound below the scaled release bound limits it first."""
    return dataclasses.replace(admission, max_inflight_cost=admission.max_inflight_cost * ray_config.replicas)


class RayServer(Server):
    """The single server whose engine thread is a RayDispatcher: requests run on replicas.

    Server.start builds and starts a local EngineThread; it is stopped at once and replaced
    (the servicers look the thread up on Core at each call). The front still loads its models:
    validation reads their configs and upload checks their LoRA targets.
    """

    def __init__(self, config: Config, handle: Any, ray_config: RayConfig) -> None:
        super().__init__(dataclasses.replace(config, admission=cluster_admission(config.admission, ray_config)))
        self.dispatcher = RayDispatcher(handle, ray_config)

    async def start(self) -> None:
        await super().start()
        assert self.core is not None
        local, self.core.engine_thread = self.core.engine_thread, self.dispatcher
        await asyncio.to_thread(local.stop)
        self.metrics.registry.register(ReplicaCollector(self.dispatcher.book))


async def run_front(config: Config, handle: Any, ray_config: RayConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain as the single server does."""
    server = RayServer(config, handle, ray_config)
    await server.start()
    log.info("sdserve: serving %s on %s:%d (pid %d) with %d Ray Serve replica(s), %s routing",
             ", ".join(server.core.served), config.server.host, server.port, os.getpid(), ray_config.replicas,
             ray_config.routing)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(server.drain()))
    await server.wait_stopped()
    log.info("sdserve: stopped")
    return 0


def serve_ray(config: Config, ray_config: RayConfig) -> int:
    """`sdserve serve --ray`: Ray up, replicas deployed, the front served; Ray down on exit."""
    logging.basicConfig(
        level=getattr(logging, config.server.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    started = start_ray(ray_config)
    if ray_config.attach:  # the application is the operator's (a Serve config file): left running
        from sdserve.scaleout.app import attach

        handle, ray_config = attach(config, ray_config)
        log.info("sdserve: attached to the Ray Serve application %r (%d replica(s), %s routing)",
                 ray_config.app_name, ray_config.replicas, ray_config.routing)
        return asyncio.run(run_front(config, handle, ray_config))
    try:
        log.info("sdserve: deploying %d engine replica(s) on Ray", ray_config.replicas)
        handle = deploy(config, ray_config)
        return asyncio.run(run_front(config, handle, ray_config))
    finally:
        undeploy(ray_config, started)
