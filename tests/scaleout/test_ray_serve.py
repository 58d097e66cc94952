"""Scale-out on a local Ray instance: the sdserve front with 2 Ray Serve engine replicas.

One Ray instance per module (bounded: 2 CPUs, a small object store, no dashboard), shut down in
the fixture's finalizer. The oracle is the in-process engine (tests/server/conftest.py): what
the front returns through replicas must be its images (<= 2/255), however requests are spread.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

ray = pytest.importorskip("ray", reason="ray is an optional extra (pip install 'sdserve[ray]')")

# Ray's start and each replica's (a fresh interpreter importing torch and loading tiny-sd1) take
# 1-2.5 min on this shared 2-core machine: far past the default suite's 60 s for tests/scaleout.
pytestmark = pytest.mark.slow

from sdserve.scaleout.cluster import RayServer, deploy, start_ray, undeploy  # noqa: E402
from sdserve.scaleout.config import LEAST_LOADED, RayConfig  # noqa: E402
from sdserve.scaleout.route import key_of_digests  # noqa: E402
from sdserve.scaleout.router import rank_replicas  # noqa: E402
from tests.server.conftest import (  # noqa: E402
    MODEL,
    ServerThread,
    make_config,
    max_diff,
    png_pixels,
    reference_images,
    wait_for,
)

RAY_CONFIG = RayConfig(replicas=2, cpus_per_replica=1.0, app_name="sdserve-test")


class RayServerThread(ServerThread):
    def __init__(self, config, handle, ray_config: RayConfig) -> None:
        super().__init__(config)
        self.server = RayServer(config, handle, ray_config)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # the shared machine's load is not ours
    config = make_config(tmp_path_factory.mktemp("scaleout-registry"))
    started = start_ray(RAY_CONFIG, num_cpus=2, object_store_memory=100 * 1024 * 1024,
                        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    try:
        handle = deploy(config, RAY_CONFIG)
        front = RayServerThread(config, handle, RAY_CONFIG).start()
    except BaseException:
        undeploy(RAY_CONFIG, started)
        raise
    yield front
    try:
        front.stop()
    finally:
        undeploy(RAY_CONFIG, started)


def _check_same(response, expected, request) -> None:
    assert len(response.images) == len(expected)
    for image, want in zip(response.images, expected):
        assert max_diff(png_pixels(image.png), want) <= 2, f"{request}: differs from the in-process engine"


def _replica_of(front, response) -> str:
    return front.server.dispatcher.served_by[response.request_id]


def test_concurrent_stacks_from_two_tenants_match_the_engine_and_stick_to_replicas(
        cluster, reference_engine, lora_bytes, tmp_path):
    """16 concurrent calls, 8 stacks (bare and every non-empty set of 3 LoRAs) from 2 tenants: every
    image is the in-process engine's, and each stack runs on its home replica (affine routing)."""
    names = {"ink": "sd1_a", "tint": "sd1_b", "slider": "sd1_c"}
    for tenant in ("alice", "bob"):  # the same files under each tenant's names: one digest each
        for name, key in names.items():
            cluster.client(tenant).upload_adapter(lora_bytes[key], name=name, family="sd1")
    files = {}
    for key in names.values():
        files[key] = tmp_path / f"{key}.safetensors"
        files[key].write_bytes(lora_bytes[key])
    stacks = {"alice": [[], [("ink", 1.0)], [("tint", 0.8)], [("slider", -1.0)], [("ink", 0.7), ("tint", 0.5)]],
              "bob": [[("ink", 0.6), ("slider", 1.0)], [("tint", 1.0), ("slider", -0.5)],
                      [("ink", 0.5), ("tint", 0.5), ("slider", 0.5)]]}
    every = [(tenant, stack) for tenant, tenant_stacks in stacks.items() for stack in tenant_stacks]
    assert len(every) == 8
    calls = []
    for index in range(16):
        tenant, stack = every[index % 8]
        request = {"model": MODEL, "prompt": ["a red circle", "a cat"][index // 8], "seed": 300 + index,
                   "steps": 2}
        sent = {**request, "adapters": [{"name": n, "scale": s} for n, s in stack]}
        local = {**request, "adapters": [{"path": str(files[names[n]]), "scale": s} for n, s in stack]}
        calls.append((cluster.client(tenant), sent, local, (tenant, tuple(n for n, _ in stack))))
    with ThreadPoolExecutor(len(calls)) as pool:
        responses = list(pool.map(lambda call: call[0].generate(call[1], timeout=90), calls))
    replicas_by_stack: dict[tuple, set[str]] = {}
    for response, (_, sent, local, stack_id) in zip(responses, calls):
        _check_same(response, reference_images(reference_engine, local), sent)
        if stack_id[1]:
            replicas_by_stack.setdefault(stack_id, set()).add(_replica_of(cluster, response))
    assert len(set(cluster.server.dispatcher.served_by.values())) == 2  # both replicas served
    # The front's metrics endpoint carries the replicas' gauges (vLLM's lora_requests_info shape).
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{cluster.server.metrics_port}/metrics", timeout=10).read()
    assert b"sdserve_replica_lora_requests_info{" in metrics and b"sdserve_replica_adapter_loads_total{" in metrics
    # A stack's home is fixed by its digests (router.rank_replicas); under the burst a busy home
    # may have spilled some calls to the stack's second choice. Sent again one by one (no
    # replica busier than the other), each goes to its home.
    replica_ids = sorted(set(cluster.server.dispatcher.served_by.values()))
    for stack_id in replicas_by_stack:
        call = next(c for c in calls if c[3] == stack_id)
        key = key_of_digests(hashlib.sha256(lora_bytes[names[name]]).hexdigest() for name in stack_id[1])
        again = call[0].generate(call[1], timeout=60)
        assert _replica_of(cluster, again) == rank_replicas(key, replica_ids, {})[0][0], f"{stack_id} left its home"


def test_an_upload_serves_on_both_replicas(cluster, reference_engine, lora_bytes, tmp_path):
    """Uploaded through the front, used at once by requests spread over both replicas (routing
    blind to adapters, 4 concurrent calls on 2 replicas): every one is the engine's image."""
    from sdserve.scaleout.dispatch import RayDispatcher

    cluster.client("bob").upload_adapter(lora_bytes["sd1_c"], name="fresh", family="sd1")
    local_file = tmp_path / "fresh.safetensors"
    local_file.write_bytes(lora_bytes["sd1_c"])
    blind = RayDispatcher(cluster.server.dispatcher.handle, RayConfig(replicas=2, routing=LEAST_LOADED))
    core = cluster.core
    client = cluster.client("bob")
    previous, core.engine_thread = core.engine_thread, blind
    try:
        seen: set[str] = set()
        for attempt in range(3):  # power-of-two choices: 4 concurrent calls reach both replicas
            requests = [{"model": MODEL, "prompt": "a cat", "seed": 400 + 4 * attempt + i, "steps": 3,
                         "adapters": [{"name": "fresh", "scale": 1.0}]} for i in range(4)]
            with ThreadPoolExecutor(4) as pool:
                responses = list(pool.map(lambda r: client.generate(r, timeout=60), requests))
            for response, request in zip(responses, requests):
                local = {**request, "adapters": [{"path": str(local_file), "scale": 1.0}]}
                _check_same(response, reference_images(reference_engine, local), request)
                seen.add(blind.served_by[response.request_id])
            if len(seen) == 2:
                break
        assert len(seen) == 2, "every call went to one replica"
        # Each replica parsed the uploaded file itself (its report's loads), from the shared store.
        assert set(blind.book.reports) == seen and all(r.loads >= 1 for r in blind.book.reports.values())
    finally:
        core.engine_thread = previous
    # Tenant isolation as on one server: bob's upload does not exist for alice, through the front.
    alice = cluster.client("alice")
    assert "fresh" not in {a.name for a in alice.list_adapters().adapters}
    with pytest.raises(grpc.RpcError) as refused:
        alice.generate({"model": MODEL, "prompt": "a cat", "seed": 1, "steps": 1,
                        "adapters": [{"name": "fresh", "scale": 1.0}]}, timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details().startswith("adapters[0].name:")


def test_a_killed_replica_neither_loses_nor_hangs_requests_and_comes_back(cluster, reference_engine):
    """Kill the replica running a burst's requests: each call ends before its deadline with the
    engine's image (sent again to the other replica) or UNAVAILABLE; Ray starts a new replica."""
    client = cluster.client("alice")
    requests = [{"model": MODEL, "prompt": "a red circle", "seed": 500 + i, "steps": 8} for i in range(4)]
    dispatcher = cluster.server.dispatcher
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_timed, client, request) for request in requests]
        # Once a request runs on a replica, kill that replica's actor (no graceful shutdown).
        assert wait_for(lambda: len(dispatcher.served_by) > 0 and any(
            f.running() for f in futures), timeout=30)
        assert wait_for(lambda: bool(_running_replicas(cluster)), timeout=30)
        victim = _running_replicas(cluster)[0]
        ray.kill(_replica_actor(victim), no_restart=True)
        outcomes = [f.result(timeout=90) for f in futures]
    for (outcome, elapsed), request in zip(outcomes, requests):
        assert elapsed < 60, "a call outlived its deadline"
        if isinstance(outcome, grpc.RpcError):
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome
        else:
            _check_same(outcome, reference_images(reference_engine, request), request)
    assert sum(not isinstance(o, grpc.RpcError) for o, _ in outcomes) >= 1
    # Ray Serve's controller notices the dead actor and starts a replacement (~50 s here: a
    # fresh worker imports torch and loads the model on a loaded 2-core machine).
    assert wait_for(lambda: _replica_count("RUNNING") == 2 and victim not in _replica_names(), timeout=240)
    after = client.generate(requests[0], timeout=60)
    _check_same(after, reference_images(reference_engine, requests[0]), requests[0])


def _timed(client, request):
    started = time.monotonic()
    try:
        outcome = client.generate(request, timeout=60)
    except grpc.RpcError as error:
        outcome = error
    return outcome, time.monotonic() - started


def _replica_names() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::sdserve-test#")]


def _replica_actor(name: str):
    return ray.get_actor(name, namespace="serve")


def _running_replicas(cluster) -> list[str]:
    """Names of replica actors whose replica id served a request that is still running."""
    running = set(cluster.server.dispatcher._tasks)
    ids = {replica for request, replica in cluster.server.dispatcher.served_by.items() if request in running}
    return [name for name in _replica_names() if any(name.endswith(f"#{replica}") for replica in ids)]


def _replica_count(state: str) -> int:
    from ray import serve

    status = serve.status().applications.get("sdserve-test")
    if status is None:
        return 0
    deployment = status.deployments["EngineReplica"]
    return deployment.replica_states.get(state, 0)
