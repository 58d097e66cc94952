"""One engine replica: a Ray Serve deployment holding an Engine and its engine thread.

The front validates, admits and resolves adapter names; a replica receives the resulting
EngineRequest and streams its EngineEvents back ("admitted", "step", "done", "error"), exactly
what the in-process engine thread would have told the front's listener. A replica reads adapter
files by the paths the front's registry gave (one directory every replica reads), or, with a
store URL, from local copies of the shared store's objects (store.py) that it fetches once and
checks; either way an upload is servable everywhere once UploadAdapter returns.

Ray is imported here: import this module only where a deployment is built or runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from sdserve.engine import Engine, EngineEvent, ModelStore
from sdserve.engine.loop import EngineThread
from sdserve.engine.request import EngineRequest
from sdserve.errors import Unavailable
from sdserve.paths import cache_root
from sdserve.scaleout.config import AFFINE, MULTIPLEX, RayConfig
from sdserve.scaleout.report import ReplicaReport
from sdserve.scaleout.store import AdapterStore, StoreCorrupt, localize, request_files
from sdserve.server.config import Config

log = logging.getLogger("sdserve.scaleout")


class EngineReplica:
    """The deployment's class (wrapped by `deployment`); Ray builds one per replica."""

    def __init__(self, config: Config, ray_config: RayConfig) -> None:
        import torch

        # Ray sets OMP_NUM_THREADS to the replica's CPUs; torch reads it only at import in some
        # builds, so say it again: two replicas on two cores must not each take both.
        torch.set_num_threads(max(1, int(ray_config.cpus_per_replica)))
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        store = ModelStore(config.engine, default_model=config.models.default_model, vaes=config.models.vae)
        self.engine = Engine(config.engine, models=store)
        self.engine.serve_conditioning_models(config.models.controlnets, config.models.ip_adapters)
        self.models = list(dict.fromkeys((config.models.default_model, *config.models.serve)))
        self.config, self.ray_config = config, ray_config
        for name in self.models:
            self.engine.load_model(name)
            self.engine.lora_targets(name)  # described before any request wraps its layers
        for variant in config.variants:
            # The front routes a matching stack to the variant's directory (server/variants.py) and
            # sends the request with that directory as its model: loaded here now, so that no
            # request pays for it. The front checked the directory's record at its own start.
            self.engine.load_model(str(Path(variant.dir).expanduser().resolve()))
        self.thread = EngineThread(self.engine, name=f"sdserve-engine-{self.replica_id}").start()
        self.store = None  # store.AdapterStore when ray_config.store_url is set
        if ray_config.store_url is not None:
            self.store = AdapterStore(ray_config.store_url)
        # On this replica's node: replicas of one node share it (fetches land by atomic renames).
        self.cache_dir = Path(config.registry.data_dir or cache_root() / "server") / "store-cache"

        async def note_stack(key: str) -> str:
            # What multiplexing "loads" is only the routing fact that this replica holds the
            # stack: the engine's residency store loads the weights (and evicts them by its
            # own budget) when the request is admitted.
            return key

        self._hold_stack = serve.multiplexed(max_num_models_per_replica=ray_config.stacks_per_replica)(note_stack)
        log.info("replica %s (pid %d) serving %s", self.replica_id, os.getpid(), ", ".join(self.models))

    async def generate(self, request: EngineRequest, remaining: float | None) -> AsyncIterator[EngineEvent | ReplicaReport | str]:
        """Run `request`: yield this replica's id, then the request's events until "done" or
        "error", with a ReplicaReport just before that last one. `remaining` is the seconds
        left to its deadline (monotonic clocks differ between machines, so the front sends a
        duration and the replica makes it a deadline of its own)."""
        key = serve.get_multiplexed_model_id()
        if key and self.ray_config.routing == MULTIPLEX:
            # Only Ray's multiplexed routing learns from this: each stack new to the replica's LRU
            # is pushed to the controller and broadcast to the routers, work that the affine
            # router (its homes are a hash, its memory its own) has no use for.
            await self._hold_stack(key)
        if not self.thread.alive:
            # Raised, not sent as the request's error: the front hears a replica failure and
            # sends the request elsewhere; check_health has Ray replace this replica.
            raise Unavailable("this replica's engine stopped")
        if self.store is not None and request_files(request):
            # Store reads can be slow (remote, large files): off the replica's event loop. A store
            # that cannot be read raises Unavailable from here, so the front tries another replica.
            try:
                request = await asyncio.to_thread(localize, request, self.store, self.cache_dir)
            except StoreCorrupt as error:  # every replica would read the same bytes: no retry
                yield self.replica_id
                yield self.report()
                yield EngineEvent("error", request.request_id, error=error)
                return
        yield self.replica_id
        deadline = time.monotonic() + remaining if remaining is not None else None
        request = dataclasses.replace(request, deadline=deadline)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def listener(event: EngineEvent) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        finished = False
        self.thread.submit(request, listener)
        try:
            while True:
                event = await events.get()
                if event.kind in ("done", "error"):
                    finished = True
                    yield self.report()
                yield event
                if finished:
                    return
        finally:
            if not finished:  # the front cancelled the call (its caller left, or its deadline)
                self.thread.cancel(request.request_id)

    def report(self) -> ReplicaReport:
        stats = self.engine.residency_stats(self.models)
        return ReplicaReport(self.replica_id, loads=sum(s.loads for s in stats), hits=sum(s.hits for s in stats),
                             misses=sum(s.misses for s in stats))

    def describe(self) -> dict[str, Any]:
        """How this replica was built, for a front attaching to a deployed application (app.attach)."""
        from sdserve.scaleout.app import describe

        return describe(self.config, self.ray_config, self.models)

    def check_health(self) -> None:
        """Ray Serve calls this every health_check_period_s: a replica whose engine thread died
        (a bug; the thread logged its trace) can run nothing, so Ray replaces it."""
        if not self.thread.alive:
            raise RuntimeError("the engine thread died")

    def __del__(self) -> None:
        thread = getattr(self, "thread", None)
        if thread is not None:
            thread.stop(timeout=5.0)


def deployment(config: Config, ray_config: RayConfig) -> Any:
    """The bound Ray Serve application: `ray_config.replicas` EngineReplicas of `config`."""
    options: dict[str, Any] = {}
    if ray_config.routing == AFFINE:
        from ray.serve.config import RequestRouterConfig

        from sdserve.scaleout.router import StackAffinityRouter

        options["request_router_config"] = RequestRouterConfig(
            request_router_class=StackAffinityRouter,
            request_router_kwargs={"spill_threshold": ray_config.spill_threshold,
                                   "remembered": ray_config.stacks_per_replica},
        )
    return serve.deployment(
        EngineReplica,
        name="EngineReplica",
        **options,
        num_replicas=ray_config.replicas,
        max_ongoing_requests=ray_config.max_ongoing_requests,
        ray_actor_options={"num_cpus": ray_config.cpus_per_replica, "num_gpus": ray_config.gpus_per_replica},
        # A replica loads its models before it counts as started; tiny models take seconds,
        # real ones (and a cold disk) minutes.
        health_check_period_s=5.0,
        health_check_timeout_s=60.0,
    ).bind(config, ray_config)
