"""The front's engine thread for scale-out: sends admitted requests to Ray Serve replicas.

`RayDispatcher` has the surface the servicers use of `engine.loop.EngineThread` (submit,
cancel, alive, stop, step_hooks, death_hooks, failure), so the single server's admission, jobs
and listeners work unchanged. Each submitted request becomes a task on the server's event loop
that streams the replica's events to the request's listener.

Routing: with "affine" or "multiplex" routing a request carries its stack key (route.stack_key)
as Ray Serve's multiplexed model id. "affine" deployments route it with router.StackAffinityRouter
(the stack's home replica by rendezvous hashing); "multiplex" ones with Ray's multiplexing, which
prefers a replica that served the same stack and otherwise picks the least loaded of two. A
request without adapters, or with "least_loaded" routing, carries no id.

Shared store: with `store_url` the request's files (LoRAs, embeddings, hypernetworks) are put in
the shared adapter store (store.AdapterStore) before the request is sent, each digest once per
front; the replica reads them from there (replica.py). A put that fails answers UNAVAILABLE.

Failure: if the replica dies (or Ray cannot reach one), the request is sent again, up to
`retries` times; the same EngineRequest with the same seed gives the same image. After that the
caller hears UNAVAILABLE. A cancelled call (caller gone, deadline) cancels the replica's stream,
which cancels the request in that replica's engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sdserve.engine import EngineEvent
from sdserve.engine.engine import Listener
from sdserve.engine.request import EngineRequest
from sdserve.errors import Cancelled, DeadlineExceeded, Internal, SdserveError, Unavailable
from sdserve.scaleout.config import AFFINE, MULTIPLEX, RayConfig
from sdserve.scaleout.report import ReplicaBook, ReplicaReport
from sdserve.scaleout.route import stack_key

log = logging.getLogger("sdserve.scaleout")

_SERVED_BY_KEPT = 4096  # recent request id -> replica id pairs kept for logs and tests


class RayDispatcher:
    """Stands in for the server's EngineThread; all methods but `stop` run on the server's loop."""

    def __init__(self, handle: Any, ray_config: RayConfig) -> None:
        self.handle = handle  # DeploymentHandle of the EngineReplica deployment
        self.ray_config = ray_config
        self.step_hooks: list[Callable[[float], None]] = []  # steps happen on replicas: never called
        self.death_hooks: list[Callable[[BaseException], None]] = []
        self.failure: BaseException | None = None
        self.served_by: OrderedDict[str, str] = OrderedDict()  # request id -> replica id
        self.retried = 0  # requests sent again after their replica failed
        self.book = ReplicaBook(max_stacks=ray_config.stacks_per_replica)  # per-replica gauges
        self._tasks: dict[str, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.store = None  # store.AdapterStore when ray_config.store_url is set
        if ray_config.store_url is not None:
            from sdserve.scaleout.store import AdapterStore

            self.store = AdapterStore(ray_config.store_url)
        self.stored: set[str] = set()  # digests this front has put (or found) in the store
        self._putting: dict[str, asyncio.Future] = {}  # digest -> its put under way

    def start(self) -> RayDispatcher:
        return self

    @property
    def alive(self) -> bool:
        return not self._stopped

    def submit(self, request: EngineRequest, listener: Listener | None = None) -> None:
        self._loop = asyncio.get_running_loop()  # admission releases requests on the server's loop
        request_id = request.request_id
        task = self._loop.create_task(self._run(request, listener or (lambda _event: None)),
                                      name=f"sdserve-dispatch-{request_id}")
        self._tasks[request_id] = task
        task.add_done_callback(lambda _task: self._ended(request_id))

    def cancel(self, request_id: str) -> None:
        """The request's listener hears Cancelled once its replica stream is torn down."""
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self._tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._tasks

    def stop(self, timeout: float | None = 10.0) -> None:
        """Called from a worker thread at server stop: cancel what is still on replicas."""
        self._stopped = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for task in list(self._tasks.values()):
                loop.call_soon_threadsafe(task.cancel)

    async def _run(self, request: EngineRequest, listener: Listener) -> None:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        request_id = request.request_id
        key = stack_key(request) if self.ray_config.routing in (AFFINE, MULTIPLEX) else ""
        options: dict[str, Any] = {"stream": True}
        if key:
            options["multiplexed_model_id"] = key
        if self.store is not None:
            try:
                request = await self._publish(request)
            except asyncio.CancelledError:
                listener(EngineEvent("error", request_id, error=Cancelled("the request was cancelled")))
                return
            except SdserveError as error:
                listener(EngineEvent("error", request_id, error=error))
                return
            except Exception:  # a bug: the call must still end, not wait for an event never sent
                log.exception("request %s: putting its files in the adapter store failed", request_id)
                listener(EngineEvent("error", request_id, error=Internal("the shared adapter store failed")))
                return
        failures = 0
        while True:
            remaining = request.deadline - time.monotonic() if request.deadline is not None else None
            if remaining is not None and remaining <= 0:
                listener(EngineEvent("error", request_id, error=DeadlineExceeded("the request's deadline passed")))
                return
            stream = None
            try:
                stream = self.handle.options(**options).generate.remote(request, remaining)
                async for item in stream:
                    if isinstance(item, str):  # the replica says who it is first
                        self._note_replica(request_id, item)
                        self.book.sent(request, item)
                        continue
                    if isinstance(item, ReplicaReport):
                        self.book.report(item)
                        continue
                    if item.kind == "admitted":
                        self.book.admitted(request_id)
                    listener(item)
                    if item.kind in ("done", "error"):
                        return
                raise Unavailable("the replica's stream ended before the request did")
            except asyncio.CancelledError:
                if stream is not None:
                    stream.cancel()  # the replica's generator is cancelled: its engine drops the request
                listener(EngineEvent("error", request_id, error=Cancelled("the request was cancelled")))
                return
            except (RayError, RayServeException, Unavailable) as error:
                failures += 1
                if failures > self.ray_config.retries:
                    log.warning("request %s: replica failed %d time(s), giving up: %s", request_id, failures,
                                type(error).__name__)
                    listener(EngineEvent("error", request_id, error=Unavailable(
                        "the replica running this request failed; retry shortly")))
                    return
                self.retried += 1
                log.warning("request %s: replica failed (%s), sending it again", request_id, type(error).__name__)

    async def _publish(self, request: EngineRequest) -> EngineRequest:
        """Put every file `request` names in the shared store unless this front already has;
        -> the request with every digest filled in. The copies run in worker threads (a file can
        be hundreds of MB and a store remote); concurrent requests naming one new file share
        one put, which a cancelled request does not cancel for the others."""
        from sdserve.scaleout.store import request_files, with_digests

        if any(not digest for _source, digest in request_files(request)):
            try:
                request = await asyncio.to_thread(with_digests, request)
            except OSError as error:
                log.error("request %s: hashing its files failed: %r", request.request_id, error)
                raise Unavailable("an adapter file could not be read") from None
        for source, digest in request_files(request):
            if digest in self.stored:
                continue
            put = self._putting.get(digest)
            if put is None:
                put = asyncio.ensure_future(asyncio.to_thread(self.store.put, source, digest))
                self._putting[digest] = put
                put.add_done_callback(lambda done, digest=digest: self._put_ended(digest, done))
            try:
                await asyncio.shield(put)
            except ValueError as error:  # the file does not hash to the registry's digest
                log.error("request %s: not putting %s in the adapter store: %s", request.request_id, digest, error)
                raise Internal("an adapter file does not match its recorded sha256") from None
            except Exception as error:
                log.error("request %s: putting %s in the adapter store %s failed: %r", request.request_id, digest,
                          self.store.url, error)
                raise Unavailable("the shared adapter store could not be written; retry shortly") from None
        return request

    def _put_ended(self, digest: str, put: asyncio.Future) -> None:
        self._putting.pop(digest, None)
        if not put.cancelled() and put.exception() is None:
            self.stored.add(digest)  # a failed put is tried again by the next request naming it

    def _ended(self, request_id: str) -> None:
        self._tasks.pop(request_id, None)
        self.book.ended(request_id)

    def _note_replica(self, request_id: str, replica: str) -> None:
        self.served_by[request_id] = replica
        while len(self.served_by) > _SERVED_BY_KEPT:
            self.served_by.popitem(last=False)
