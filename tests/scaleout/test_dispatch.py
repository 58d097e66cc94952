"""The front's dispatcher without a cluster: routing keys, retries, cancellation and deadlines
against a stand-in for Ray Serve's DeploymentHandle that plays scripted replica streams.
(The same paths on a real local Ray instance: test_ray_serve.py, marked slow.)"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("ray", reason="ray is an optional extra (pip install 'sdserve[ray]')")

from ray.exceptions import ActorDiedError  # noqa: E402

from sdserve.engine import EngineEvent  # noqa: E402
from sdserve.engine.request import EmbeddingEntry, EngineRequest, StackEntry  # noqa: E402
from sdserve.errors import Cancelled, DeadlineExceeded, InvalidArgument, Unavailable  # noqa: E402
from sdserve.scaleout.config import LEAST_LOADED, RayConfig  # noqa: E402
from sdserve.scaleout.dispatch import RayDispatcher  # noqa: E402
from sdserve.scaleout.report import ReplicaCollector, ReplicaReport  # noqa: E402
from sdserve.scaleout.route import stack_key  # noqa: E402

HOLD = object()  # a stream item: block until cancelled


def request(adapters=(), embeddings=(), request_id="r1", deadline=None) -> EngineRequest:
    return EngineRequest(model="tiny-sd1", prompt="a cat", negative_prompt=None, seed=1, steps=2,
                         guidance_scale=7.5, scheduler="euler", width=64, height=64, num_images=1,
                         adapters=tuple(adapters), embedding_refs=tuple(embeddings), request_id=request_id,
                         deadline=deadline)


def lora(digest: str, scale: float = 1.0) -> StackEntry:
    return StackEntry(name=digest, source=f"/store/{digest}", scale=scale, start=0.0, end=1.0, digest=digest)


class Stream:
    def __init__(self, items: list) -> None:
        self.items = items
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self):
        return self._play()

    async def _play(self):
        for item in self.items:
            await asyncio.sleep(0)
            if item is HOLD:
                await asyncio.sleep(3600)
            if isinstance(item, BaseException):
                raise item
            yield item


class Handle:
    """Plays one scripted stream per `generate.remote` call and records the options and arguments."""

    def __init__(self, *scripts: list) -> None:
        self.scripts = list(scripts)
        self.options_seen: list[dict] = []
        self.remaining_seen: list[float | None] = []
        self.streams: list[Stream] = []
        self.generate = self

    def options(self, **options):
        self.options_seen.append(options)
        return self

    def remote(self, _request, remaining):
        self.remaining_seen.append(remaining)
        self.streams.append(Stream(self.scripts.pop(0)))
        return self.streams[-1]


def run(dispatcher: RayDispatcher, engine_request: EngineRequest, cancel_after: float | None = None) -> list:
    heard: list[EngineEvent] = []

    async def main():
        dispatcher.submit(engine_request, heard.append)
        if cancel_after is not None:
            await asyncio.sleep(cancel_after)
            dispatcher.cancel(engine_request.request_id)
        while dispatcher._tasks:
            await asyncio.sleep(0.001)

    asyncio.run(asyncio.wait_for(main(), 10))
    return heard


def done(request_id="r1") -> EngineEvent:
    return EngineEvent("done", request_id)


def test_stack_key_is_the_set_of_digests():
    a, b = lora("a" * 64), lora("b" * 64, scale=0.3)
    assert stack_key(request()) == ""
    assert stack_key(request([a, b])) == stack_key(request([lora("b" * 64), lora("a" * 64, scale=-2)]))
    assert stack_key(request([a])) != stack_key(request([a, b]))
    embedding = EmbeddingEntry(name="tok", source="/store/e", token="<tok>", digest="a" * 64)
    assert stack_key(request([a], [embedding])) == stack_key(request([a]))  # one file, one residency
    assert len(stack_key(request([a]))) == 32


def test_affine_routing_sends_the_stack_key_as_multiplexed_model_id():
    handle = Handle(["replica-1", done()], ["replica-2", done()], ["replica-1", done()])
    dispatcher = RayDispatcher(handle, RayConfig(replicas=2))
    run(dispatcher, request([lora("a" * 64)]))
    run(dispatcher, request(request_id="r2"))
    blind = RayDispatcher(handle, RayConfig(replicas=2, routing=LEAST_LOADED))
    run(blind, request([lora("a" * 64)], request_id="r3"))
    assert handle.options_seen == [
        {"stream": True, "multiplexed_model_id": stack_key(request([lora("a" * 64)]))},
        {"stream": True},  # no adapters: nothing to be affine to
        {"stream": True},
    ]
    assert dispatcher.served_by == {"r1": "replica-1", "r2": "replica-2"}


def test_a_dead_replica_is_retried_and_the_listener_hears_one_outcome():
    step = EngineEvent("step", "r1", step=1, total_steps=2)
    handle = Handle(["replica-1", step, ActorDiedError()], ["replica-2", step, done()])
    dispatcher = RayDispatcher(handle, RayConfig(replicas=2, retries=1))
    heard = run(dispatcher, request())
    assert [e.kind for e in heard] == ["step", "step", "done"]
    assert dispatcher.retried == 1 and dispatcher.served_by["r1"] == "replica-2"


def test_retries_spent_ends_with_unavailable_and_a_cut_stream_counts_as_a_failure():
    handle = Handle(["replica-1", ActorDiedError()], ["replica-2"])  # the 2nd stream ends with no outcome
    heard = run(RayDispatcher(handle, RayConfig(replicas=2, retries=1)), request())
    assert [e.kind for e in heard] == ["error"]
    assert isinstance(heard[0].error, Unavailable)


def test_a_replica_error_event_is_passed_on_not_retried():
    refused = EngineEvent("error", "r1", error=InvalidArgument("bad", field="prompt"))
    handle = Handle(["replica-1", refused], ["replica-2", done()])
    heard = run(RayDispatcher(handle, RayConfig(replicas=2)), request())
    assert heard == [refused] and len(handle.streams) == 1


def test_cancel_tears_down_the_replica_stream_and_reports_cancelled():
    handle = Handle(["replica-1", EngineEvent("step", "r1", step=1, total_steps=2), HOLD])
    heard = run(RayDispatcher(handle, RayConfig(replicas=2)), request(), cancel_after=0.05)
    assert [e.kind for e in heard] == ["step", "error"] and isinstance(heard[-1].error, Cancelled)
    assert handle.streams[0].cancelled


def test_deadline_travels_as_a_duration_and_a_passed_one_is_not_sent():
    handle = Handle(["replica-1", done()])
    run(RayDispatcher(handle, RayConfig()), request(deadline=time.monotonic() + 30))
    assert 25 < handle.remaining_seen[0] <= 30
    heard = run(RayDispatcher(handle, RayConfig()), request(deadline=time.monotonic() - 1))
    assert isinstance(heard[0].error, DeadlineExceeded) and len(handle.streams) == 1


def test_replica_gauges_show_running_and_waiting_adapters_and_reported_loads():
    """vLLM's lora_requests_info shape per replica: a request the replica's engine admitted is
    running, one sent but not yet admitted is waiting; loads come from the replicas' reports."""
    a, b = lora("a" * 64), lora("b" * 64)
    admitted = EngineEvent("admitted", "r1", total_steps=2)
    handle = Handle(["replica-1", admitted, HOLD], ["replica-1", HOLD],
                    ["replica-2", ReplicaReport("replica-2", loads=3, hits=1, misses=3), done("r3")])
    dispatcher = RayDispatcher(handle, RayConfig(replicas=2, stacks_per_replica=4))
    collector = ReplicaCollector(dispatcher.book)
    seen = {}

    async def main():
        dispatcher.submit(request([a], request_id="r1"), lambda _e: None)
        dispatcher.submit(request([b], request_id="r2"), lambda _e: None)
        dispatcher.submit(request(request_id="r3"), lambda _e: None)
        while "r3" in dispatcher._tasks or len(dispatcher.book.placed) < 2:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        seen["during"] = dispatcher.book.adapters()
        seen["metrics"] = {m.name: m.samples for m in collector.collect()}
        dispatcher.cancel("r1")
        dispatcher.cancel("r2")
        while dispatcher._tasks:
            await asyncio.sleep(0.001)

    asyncio.run(asyncio.wait_for(main(), 10))
    assert seen["during"] == {"replica-1": ({"a" * 16}, {"b" * 16}), "replica-2": (set(), set())}
    info = {s.labels["replica"]: s.labels for s in seen["metrics"]["sdserve_replica_lora_requests_info"]}
    assert info["replica-1"]["running_lora_adapters"] == "a" * 16
    assert info["replica-1"]["waiting_lora_adapters"] == "b" * 16 and info["replica-1"]["max_lora"] == "4"
    loads = {s.labels["replica"]: s.value for s in seen["metrics"]["sdserve_replica_adapter_loads"]}
    assert loads == {"replica-2": 3}
    assert dispatcher.book.placed == {} and dispatcher.book.total_loads() == 3


def test_ray_config_refuses_what_cannot_run():
    with pytest.raises(InvalidArgument, match="--replicas"):
        RayConfig(replicas=0)
    with pytest.raises(InvalidArgument, match="--routing"):
        RayConfig(routing="random")


def test_the_fronts_admission_holds_cluster_quotas_and_releases_one_engines_worth_per_replica():
    from sdserve.scaleout.cluster import cluster_admission
    from sdserve.server.config import AdmissionConfig

    one = AdmissionConfig(max_pending_cost=1000, max_tenant_pending_cost=500, max_inflight_cost=200)
    three = cluster_admission(one, RayConfig(replicas=3))
    assert (three.max_pending_cost, three.max_tenant_pending_cost, three.max_inflight_cost) == (1000, 500, 600)
    assert cluster_admission(one, RayConfig(replicas=1)) == one
